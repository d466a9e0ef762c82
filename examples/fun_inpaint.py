"""Wan-Fun InP (first frame, optional last frame) with a converted folder.

Wan2.1-Fun(-V1.1)-1.3B/14B-InP or Wan2.2-Fun-A14B-InP, converted to Diffusers:

    python examples/fun_inpaint.py /ckpt/Wan2.1-Fun-1.3B-InP-diffusers first.png "a corgi on the beach" \
        --end-image last.png --output fun_inpaint.mp4
"""

import argparse

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video, load_image

import diffusers_wan_ext  # noqa: F401  (registers WanFunInpaintPipeline & co. with Diffusers)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Wan-Fun InP: video from a first (and optional last) frame.")
    parser.add_argument("model", help="converted Wan-Fun InP folder (model_index.json: WanFunInpaintPipeline)")
    parser.add_argument("image", help="first frame (path or URL)")
    parser.add_argument("prompt")
    parser.add_argument("--end-image", help="last frame (path or URL)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--output", default="fun_inpaint.mp4")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=81, help="4n + 1")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=16)
    args = parser.parse_args(argv)

    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.bfloat16)
    if torch.cuda.is_available():
        pipe.enable_model_cpu_offload()
    video = pipe(
        image=load_image(args.image),
        end_image=load_image(args.end_image) if args.end_image else None,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).frames[0]
    print(export_to_video(video, args.output, fps=args.fps))


if __name__ == "__main__":
    main()
