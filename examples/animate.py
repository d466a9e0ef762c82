"""Wan2.2-Animate-14B: character animation and replacement with a converted folder.

Convert the release once (the relighting LoRA is converted along with it into ``relighting_lora/``):

    diffusers-wan convert /ckpt/Wan2.2-Animate-14B /ckpt/Wan2.2-Animate-14B-diffusers

Wan-Animate's preprocessing (``wan/modules/animate/preprocess`` of Wan2.2) turns a driving video into
``src_pose.mp4``, ``src_face.mp4`` and ``src_ref.png`` (plus ``src_bg.mp4`` / ``src_mask.mp4`` with
``--replace_flag``).  Pass that folder:

    python examples/animate.py /ckpt/Wan2.2-Animate-14B-diffusers process_results/ --output animate.mp4
    python examples/animate.py /ckpt/Wan2.2-Animate-14B-diffusers process_results/ --replace --output replace.mp4

The output has as many frames as ``src_pose.mp4``; it is generated in segments of ``--segment-frames`` that
continue from the last ``--refert-num`` frames of the previous segment (upstream's ``clip_len`` / ``refert_num``).
"""

import argparse
from pathlib import Path

import torch
from diffusers.utils import export_to_video

from diffusers_wan_ext import WanAnimateExtPipeline


def main(argv=None):
    parser = argparse.ArgumentParser(description="Wan2.2-Animate: animate a character / replace a person.")
    parser.add_argument("model", help="converted Wan2.2-Animate folder (or Wan-AI/Wan2.2-Animate-14B-Diffusers)")
    parser.add_argument("inputs", help="folder with src_ref.png, src_pose.mp4, src_face.mp4 (+ src_bg.mp4, src_mask.mp4)")
    parser.add_argument("--replace", action="store_true", help="replacement mode (uses src_bg.mp4 / src_mask.mp4)")
    parser.add_argument("--relighting-lora", nargs="?", const="auto", default=None,
                        help="load the relighting LoRA (default with --replace): 'auto' = <model>/relighting_lora, "
                             "or a path to relighting_lora.ckpt")
    parser.add_argument("--prompt", default="视频中的人在做动作")  # upstream's default prompt
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--output", default="animate.mp4")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--segment-frames", type=int, default=77)
    parser.add_argument("--refert-num", type=int, default=1, choices=[1, 5])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args(argv)

    src = Path(args.inputs)
    pipe = WanAnimateExtPipeline.from_pretrained(
        args.model, torch_dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32
    )
    if torch.cuda.is_available():
        pipe.enable_model_cpu_offload()
    relight = args.relighting_lora or ("auto" if args.replace else None)
    if relight is not None:
        pipe.load_relighting_lora(args.model if relight == "auto" else relight)
    video = pipe(
        image=src / "src_ref.png",
        pose_video=src / "src_pose.mp4",
        face_video=src / "src_face.mp4",
        background_video=src / "src_bg.mp4" if args.replace else None,
        mask_video=src / "src_mask.mp4" if args.replace else None,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        segment_frame_length=args.segment_frames,
        prev_segment_conditioning_frames=args.refert_num,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).frames[0]
    print(export_to_video(video, args.output, fps=args.fps))


if __name__ == "__main__":
    main()
