"""Wan2.2-Animate-2-14B: animate a character (reference image) with the motion of a driving video.

Convert the release once (the distilled DiT with ``--variant wan2.2-animate-2-14b-distilled``):

    diffusers-wan convert /ckpt/Wan2.2-Animate-2-14B /ckpt/Wan2.2-Animate-2-14B-diffusers

The converted folder runs in stock Diffusers' modular Animate-2 pipeline (no classic ``DiffusionPipeline`` yet, see
``docs/animate2.md``):

    python examples/animate2.py /ckpt/Wan2.2-Animate-2-14B-diffusers refimage.jpg refvideo.mp4 --output out.mp4
    python examples/animate2.py /ckpt/Wan2.2-Animate-2-14B-Distilled-diffusers refimage.jpg refvideo.mp4 --distilled

Defaults follow DiffSynth-Studio's examples: 1280x720 (portrait), 81-frame clips, 40 steps at CFG 3 (distilled: 10
steps; stock's distilled pipeline has no ``log_scale``).
"""

import argparse

import torch
from diffusers.modular_pipelines import WanAnimate2Blocks, WanAnimate2DistilledBlocks
from diffusers.utils import export_to_video, load_image, load_video

from diffusers_wan_ext import WanAnimate2ExtTransformer3DModel  # folders of non-release widths hold ours


def main(argv=None):
    parser = argparse.ArgumentParser(description="Wan2.2-Animate-2: animate a character with a driving video.")
    parser.add_argument("model", help="converted Wan2.2-Animate-2 folder (diffusers-wan convert)")
    parser.add_argument("image", help="reference image: the character")
    parser.add_argument("video", help="driving video: the motion")
    parser.add_argument("--distilled", action="store_true", help="the distilled DiT's pipeline (10 steps, no CFG)")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--height", type=int, default=1280)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--segment-frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=None, help="default: 40 (distilled: 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--output", default="animate2.mp4")
    args = parser.parse_args(argv)

    blocks = WanAnimate2DistilledBlocks() if args.distilled else WanAnimate2Blocks()
    pipe = blocks.init_pipeline(args.model)
    pipe.load_components(torch_dtype=torch.bfloat16)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    ours = isinstance(pipe.transformer, WanAnimate2ExtTransformer3DModel)
    print(f"transformer: {type(pipe.transformer).__name__}{' (dense attention, log_scale)' if ours else ''}")
    video = pipe(
        prompt=args.prompt, image=load_image(args.image), driving_video=load_video(args.video), height=args.height,
        width=args.width, segment_frame_length=args.segment_frames,
        num_inference_steps=args.steps or (10 if args.distilled else 40),
        generator=torch.Generator().manual_seed(args.seed), output="videos",
    )
    export_to_video(list(video[0]), args.output, fps=args.fps)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
