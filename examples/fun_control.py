"""Wan-Fun Control (control video, optional start frame / reference image) with a converted folder.

Wan2.1-Fun-1.3B/14B-Control, Wan2.1-Fun-V1.1-1.3B/14B-Control (reference image) or Wan2.2-Fun-A14B-Control,
converted to Diffusers.  The control video (depth, pose, canny, ...) is resized to the output size here and cut to
``--num-frames`` (the pipeline itself never resizes or trims it):

    python examples/fun_control.py /ckpt/Wan2.1-Fun-V1.1-1.3B-Control-diffusers pose.mp4 "a girl dancing" \
        --reference-image character.png --output fun_control.mp4
"""

import argparse

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video, load_image, load_video

import diffusers_wan_ext  # noqa: F401  (registers WanFunControlPipeline & co. with Diffusers)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Wan-Fun Control: video that follows a control video.")
    parser.add_argument("model", help="converted Wan-Fun Control folder (model_index.json: WanFunControlPipeline)")
    parser.add_argument("control_video", help="control video (path or URL of an mp4 / gif)")
    parser.add_argument("prompt")
    parser.add_argument("--image", help="start frame (path or URL)")
    parser.add_argument("--reference-image", help="reference image (Fun-V1.1 / Wan2.2-Fun Control only)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--output", default="fun_control.mp4")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=None,
                        help="4n + 1 (default: the most the control video allows, at most 81)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=16)
    args = parser.parse_args(argv)

    frames = load_video(args.control_video)
    num_frames = args.num_frames or min(81, (len(frames) - 1) // 4 * 4 + 1)
    if len(frames) < num_frames:
        parser.error(f"the control video has {len(frames)} frames, fewer than --num-frames {num_frames}")
    control = [f.convert("RGB").resize((args.width, args.height)) for f in frames[:num_frames]]

    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.bfloat16)
    if torch.cuda.is_available():
        pipe.enable_model_cpu_offload()
    video = pipe(
        control_video=control,
        image=load_image(args.image) if args.image else None,
        reference_image=load_image(args.reference_image) if args.reference_image else None,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=num_frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).frames[0]
    print(export_to_video(video, args.output, fps=args.fps))


if __name__ == "__main__":
    main()
