"""Render a video with trained weights: a LoRA (any format stock Diffusers loads) or a fine-tuned transformer.

    # LoRA (Wan2.1 / one expert)
    python examples/training/validate.py --model_path ./models/Wan2.1-T2V-1.3B-diffusers \\
        --lora ./models/train/Wan2.1-T2V-1.3B_lora --prompt "from sunset to night, a small town" --output lora.mp4
    # Wan2.2 A14B: one LoRA per expert
    python examples/training/validate.py --model_path ./models/Wan2.2-T2V-A14B-diffusers \\
        --lora ./models/train/Wan2.2-T2V-A14B_high_noise_lora \\
        --lora_2 ./models/train/Wan2.2-T2V-A14B_low_noise_lora/pytorch_lora_weights_transformer_2.safetensors \\
        --num_frames 49 --prompt "..."
    # full fine-tuning: the saved transformer folder replaces the pipeline's
    python examples/training/validate.py --model_path ./models/Wan2.1-T2V-1.3B-diffusers \\
        --transformer ./models/train/Wan2.1-T2V-1.3B_full/transformer --prompt "..."
    # conditioning inputs, as in training: --input_image, --end_image, --control_video, --reference_image,
    # --vace_video, --vace_reference_image, --camera_control_direction, --motion_bucket_id, --input_audio,
    # --s2v_pose_video, --animate_pose_video, --animate_face_video, --animate_inpaint_video, --animate_mask_video,
    # --vap_video, --vap_prompt, --longcat_video, --animate2_reference_image, --animate2_reference_video,
    # --animate2_prompt_ref, --wantodance_reference_image, --wantodance_music_path
    # --model NAME (a script name of examples/training/{lora,full}/): the release's sampling defaults (size, frames,
    # steps, guidance) and a check that the inputs the model needs are given, e.g.
    python examples/training/validate.py --model Wan2.2-S2V-14B --model_path ./models/Wan2.2-S2V-14B-diffusers \
        --lora ./models/train/Wan2.2-S2V-14B_lora --input_image person.png --input_audio speech.wav --prompt "..."

The pipeline is the folder's own (``DiffusionPipeline.from_pretrained``); LoRAs go in with the pipeline's
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
    "input_audio": ("audio",),
    "s2v_pose_video": ("pose_video",),
    "animate_pose_video": ("pose_video",),
    "animate_face_video": ("face_video",),
    "animate_inpaint_video": ("background_video",),
    "animate_mask_video": ("mask_video",),
    "vap_video": ("vap_video",),
    "vap_prompt": ("vap_prompt",),
    "longcat_video": ("video",),
    "animate2_reference_image": ("image",),
    "animate2_reference_video": ("driving_video",),
    "animate2_prompt_ref": ("prompt_ref",),
    "wantodance_reference_image": ("image",),
    "wantodance_music_path": ("music",),
}
IMAGES = ("input_image", "end_image", "reference_image", "vace_reference_image", "animate2_reference_image",
          "wantodance_reference_image")
VIDEOS = ("control_video", "vace_video", "s2v_pose_video", "animate_pose_video", "animate_inpaint_video",
          "animate_mask_video", "vap_video", "longcat_video", "animate2_reference_video")
#: videos passed as their own frames (not resized to the video size)
NATIVE_VIDEOS = ("animate_face_video",)
#: the pipelines' name for the frame count (S2V: per clip, Animate: per segment)
FRAME_ARGUMENTS = ("num_frames", "num_frames_per_clip", "segment_frame_length")

#: The 30 models of the training table and the families added since (the scripts in lora/ and full/): the release
#: row whose sampling defaults ``--model`` applies (``diffusers-wan variants``) and the inputs the model needs.
MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Wan2.1-T2V-1.3B": ("wan2.1-t2v-1.3b", ()),
    "Wan2.1-T2V-14B": ("wan2.1-t2v-14b", ()),
    "krea-realtime-video": ("krea-realtime-video", ()),
    "Wan2.1-I2V-14B-480P": ("wan2.1-i2v-14b-480p", ("input_image",)),
    "Wan2.1-I2V-14B-720P": ("wan2.1-i2v-14b-720p", ("input_image",)),
    "Wan2.1-FLF2V-14B-720P": ("wan2.1-flf2v-14b-720p", ("input_image", "end_image")),
    "Wan2.1-Fun-1.3B-InP": ("wan2.1-fun-1.3b-inp", ("input_image",)),
    "Wan2.1-Fun-14B-InP": ("wan2.1-fun-14b-inp", ("input_image",)),
    "Wan2.1-Fun-V1.1-1.3B-InP": ("wan2.1-fun-v1.1-1.3b-inp", ("input_image",)),
    "Wan2.1-Fun-V1.1-14B-InP": ("wan2.1-fun-v1.1-14b-inp", ("input_image",)),
    "Wan2.1-Fun-1.3B-Control": ("wan2.1-fun-1.3b-control", ("control_video",)),
    "Wan2.1-Fun-14B-Control": ("wan2.1-fun-14b-control", ("control_video",)),
    "Wan2.1-Fun-V1.1-1.3B-Control": ("wan2.1-fun-v1.1-1.3b-control", ("control_video",)),
    "Wan2.1-Fun-V1.1-14B-Control": ("wan2.1-fun-v1.1-14b-control", ("control_video",)),
    "Wan2.1-Fun-V1.1-1.3B-Control-Camera": ("wan2.1-fun-v1.1-1.3b-control-camera",
                                            ("input_image", "camera_control_direction")),
    "Wan2.1-Fun-V1.1-14B-Control-Camera": ("wan2.1-fun-v1.1-14b-control-camera",
                                           ("input_image", "camera_control_direction")),
    "Wan2.1-VACE-1.3B-Preview": ("vace-wan2.1-1.3b-preview", ()),
    "Wan2.1-VACE-1.3B": ("wan2.1-vace-1.3b", ()),
    "Wan2.1-VACE-14B": ("wan2.1-vace-14b", ()),
    "Wan2.1-1.3b-speedcontrol-v1": ("wan2.1-t2v-1.3b", ("motion_bucket_id",)),
    "Wan2.2-T2V-A14B": ("wan2.2-t2v-a14b", ()),
    "Wan2.2-I2V-A14B": ("wan2.2-i2v-a14b", ("input_image",)),
    "Wan2.2-TI2V-5B": ("wan2.2-ti2v-5b", ()),
    "Wan2.2-Fun-A14B-InP": ("wan2.2-fun-a14b-inp", ("input_image",)),
    "Wan2.2-Fun-A14B-Control": ("wan2.2-fun-a14b-control", ("control_video",)),
    "Wan2.2-Fun-A14B-Control-Camera": ("wan2.2-fun-a14b-control-camera", ("input_image", "camera_control_direction")),
    "Wan2.2-VACE-Fun-A14B": ("wan2.2-vace-fun-a14b", ()),
    "Wan2.2-S2V-14B": ("wan2.2-s2v-14b", ("input_image", "input_audio")),
    "Wan2.2-Animate-14B": ("wan2.2-animate-14b", ("input_image", "animate_pose_video", "animate_face_video")),
    "Video-As-Prompt-Wan2.1-14B": ("video-as-prompt-wan2.1-14b", ("input_image", "vap_video")),
    "LongCat-Video": ("longcat-video", ()),
    # added since: Wan2.2-Animate-2
    "Wan2.2-Animate-2-14B": ("wan2.2-animate-2-14b", ("animate2_reference_image", "animate2_reference_video")),
    "Wan2.2-Animate-2-14B-Distilled": ("wan2.2-animate-2-14b-distilled",
                                       ("animate2_reference_image", "animate2_reference_video")),
    # Wan-Dancer: the converted folder runs both stages (--lora: the LoRA's transformer / transformer_2 keys)
    "Wan-Dancer-14B-global": ("wan-dancer-14b", ("wantodance_reference_image", "wantodance_music_path")),
    "Wan-Dancer-14B-local": ("wan-dancer-14b", ("wantodance_reference_image", "wantodance_music_path")),
    # MOVA: video + its sound track (muxed into --output); --lora: the high-noise expert, --lora_2: the low-noise one
    "MOVA-360p": ("mova-360p", ("input_image",)),
    "MOVA-720p": ("mova-720p", ("input_image",)),
}
SAMPLING = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "fps")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="the trained model (a script name): its release's sampling defaults and required inputs")
    p.add_argument("--model_path", required=True, help="converted Diffusers pipeline folder")
    p.add_argument("--lora", default=None, help="LoRA folder or file for transformer")
    p.add_argument("--lora_2", default=None, help="LoRA folder or file for transformer_2 (Wan2.2 low-noise expert)")
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--transformer", default=None, help="fine-tuned transformer folder replacing the pipeline's")
    p.add_argument("--transformer_2", default=None, help="fine-tuned transformer_2 folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--height", type=int, default=None, help="default: the --model's release value, else 480")
    p.add_argument("--width", type=int, default=None, help="default: the --model's release value, else 832")
    p.add_argument("--num_frames", type=int, default=None,
                   help="frames (S2V: per clip, Animate: per segment); default: the --model's, else 81")
    p.add_argument("--num_inference_steps", type=int, default=None, help="default: the --model's, else 50")
    p.add_argument("--guidance_scale", type=float, default=None, help="default: the --model's, else 5.0")
    p.add_argument("--max_sequence_length", type=int, default=512)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fps", type=int, default=None, help="default: the --model's, else 16")
    p.add_argument("--output", default="validation.mp4")
    for name in PIPELINE_ARGUMENTS:
        p.add_argument(f"--{name}", default=None, type=float if name == "motion_bucket_id" else str)
    args = p.parse_args(argv)
    apply_model_defaults(args, p.error)
    return args


def apply_model_defaults(args: argparse.Namespace, fail) -> None:
    """Fill the sampling options left out from ``--model``'s release row (or the generic defaults) and check that
    the inputs the model needs are given (``fail`` reports one line)."""
    defaults = dict(height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0, fps=16)
    if args.model is not None:
        from diffusers_wan_ext.families import get_variant

        row, needed = MODELS[args.model]
        variant = get_variant(row)
        defaults.update({k: getattr(variant, k) for k in SAMPLING})
        missing = [f"--{n}" for n in needed if getattr(args, n) is None]
        if missing:
            fail(f"--model {args.model} needs {', '.join(missing)}")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


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
    frames_argument = next((a for a in FRAME_ARGUMENTS if a in accepted), "num_frames")
    call = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                max_sequence_length=args.max_sequence_length, generator=torch.Generator().manual_seed(args.seed),
                output_type="np", **{frames_argument: args.num_frames})
    call = {k: v for k, v in call.items() if k in accepted}
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
        elif name in NATIVE_VIDEOS:
            value = load_video(value)
        call[target] = value
    result = pipe(**call)
    out = write_video(result.frames[0], args.output, fps=args.fps)
    if getattr(result, "audio", None) is not None:  # MOVA: the generated sound track
        from diffusers_wan_ext.utils.media import add_audio_track

        add_audio_track(out, result.audio[0], result.audio_sample_rate)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
