"""Render a video with trained weights: a LoRA (any format stock Diffusers loads) or a fine-tuned transformer.

    # LoRA (Wan2.1 / one expert)
    python examples/training/validate.py --model_path ./models/Wan2.1-T2V-1.3B-diffusers \\
        --lora ./models/train/Wan2.1-T2V-1.3B_lora --prompt "from sunset to night, a small town" --output lora.mp4
    # Wan2.2 A14B: one LoRA per expert
    python examples/training/validate.py --model_path ./models/Wan2.2-T2V-A14B-diffusers \\
        --lora ./models/train/Wan2.2-T2V-A14B_high_noise_lora \\
        --lora_2 ./models/train/Wan2.2-T2V-A14B_low_noise_lora/transformer_2 --num_frames 49 --prompt "..."
    # full fine-tuning: the saved transformer folder replaces the pipeline's
    python examples/training/validate.py --model_path ./models/Wan2.1-T2V-1.3B-diffusers \\
        --transformer ./models/train/Wan2.1-T2V-1.3B_full/transformer --prompt "..."
    # conditioning inputs, as in training: --input_image, --end_image, --control_video, --reference_image,
    # --vace_video, --vace_reference_image, --camera_control_direction, --motion_bucket_id

The pipeline is the folder's own (``DiffusionPipeline.from_pretrained``); LoRAs go in with stock
``load_lora_weights`` (``load_into_transformer_2=True`` for ``--lora_2``).
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Sequence

import torch

# our input names -> the pipelines' argument names (the first one the pipeline takes is used)
PIPELINE_ARGUMENTS = {
    "input_image": ("image",),
    "end_image": ("end_image", "last_image"),
    "control_video": ("control_video",),
    "reference_image": ("reference_image",),
    "vace_video": ("video",),
    "vace_reference_image": ("reference_images",),
    "camera_control_direction": ("camera_control_direction",),
    "motion_bucket_id": ("motion_bucket_id",),
}
IMAGES, VIDEOS = ("input_image", "end_image", "reference_image", "vace_reference_image"), ("control_video",
                                                                                            "vace_video")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", required=True, help="converted Diffusers pipeline folder")
    p.add_argument("--lora", default=None, help="LoRA folder or file for transformer")
    p.add_argument("--lora_2", default=None, help="LoRA folder or file for transformer_2 (Wan2.2 low-noise expert)")
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--transformer", default=None, help="fine-tuned transformer folder replacing the pipeline's")
    p.add_argument("--transformer_2", default=None, help="fine-tuned transformer_2 folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--num_frames", type=int, default=81)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--max_sequence_length", type=int, default=512)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--output", default="validation.mp4")
    for name in PIPELINE_ARGUMENTS:
        p.add_argument(f"--{name}", default=None, type=float if name == "motion_bucket_id" else str)
    return p.parse_args(argv)


def _lora_location(path: str) -> tuple[str, dict]:
    p = Path(path)
    return (str(p), {}) if p.is_dir() else (str(p.parent), {"weight_name": p.name})


def main(argv: Sequence[str] | None = None) -> Path:
    import diffusers
    from diffusers.utils import load_image, load_video

    import diffusers_wan_ext  # noqa: F401  (registers our pipeline and model classes)
    from diffusers_wan_ext.demo import write_video

    args = parse(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    overrides = {}
    for name in ("transformer", "transformer_2"):
        if getattr(args, name):
            overrides[name] = diffusers.AutoModel.from_pretrained(getattr(args, name), dtype=dtype)
    pipe = diffusers.DiffusionPipeline.from_pretrained(args.model_path, dtype=dtype, **overrides)
    if args.lora:
        location, kwargs = _lora_location(args.lora)
        pipe.load_lora_weights(location, adapter_name="trained", **kwargs)
    if args.lora_2:
        location, kwargs = _lora_location(args.lora_2)
        pipe.load_lora_weights(location, adapter_name="trained_2", load_into_transformer_2=True, **kwargs)
    if args.lora_scale != 1.0:
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name, None)
            if model is not None and getattr(model, "peft_config", None):
                model.set_adapters(list(model.peft_config), weights=args.lora_scale)
    pipe.to(args.device)

    accepted = inspect.signature(pipe.__call__).parameters
    call = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                num_frames=args.num_frames, num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
                generator=torch.Generator().manual_seed(args.seed), output_type="np")
    for name, candidates in PIPELINE_ARGUMENTS.items():
        value = getattr(args, name)
        if value is None:
            continue
        target = next((c for c in candidates if c in accepted), None)
        if target is None:
            raise SystemExit(f"--{name}: {type(pipe).__name__} takes none of {candidates}")
        if name in IMAGES:
            value = load_image(value).resize((args.width, args.height))
            value = [value] if target == "reference_images" else value
        elif name in VIDEOS:
            value = [f.resize((args.width, args.height)) for f in load_video(value)[: args.num_frames]]
        call[target] = value
    frames = pipe(**call).frames[0]
    out = write_video(frames, args.output, fps=args.fps)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
