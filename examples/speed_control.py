"""Wan2.1 speed control (``motion_bucket_id``) with a converted folder.

DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1 on Wan2.1-T2V-1.3B, converted to Diffusers (a
``WanSpeedControlPipeline`` folder with a ``motion_controller``).  Larger ids give more motion; DiffSynth-Studio's
example compares 0 and 100.  One video per id:

    python examples/speed_control.py /ckpt/Wan2.1-1.3b-speedcontrol-v1-diffusers "a dog running in a park" \
        --motion-bucket-id 0 100 --output speed.mp4      # writes speed_0.mp4 and speed_100.mp4
"""

import argparse
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video

import diffusers_wan_ext  # noqa: F401  (registers WanSpeedControlPipeline with Diffusers)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Wan2.1 text-to-video with speed control.")
    parser.add_argument("model", help="converted speed-control folder (model_index.json: WanSpeedControlPipeline)")
    parser.add_argument("prompt")
    parser.add_argument("--motion-bucket-id", type=float, nargs="+", default=[100.0],
                        help="one or more ids (larger = more motion); one video each")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--output", default="speed.mp4", help="with several ids, _<id> is added to the name")
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
    out = Path(args.output)
    for bucket in args.motion_bucket_id:
        video = pipe(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            motion_bucket_id=bucket,
            height=args.height,
            width=args.width,
            num_frames=args.num_frames,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator().manual_seed(args.seed),
        ).frames[0]
        path = out if len(args.motion_bucket_id) == 1 else out.with_name(f"{out.stem}_{bucket:g}{out.suffix}")
        print(export_to_video(video, str(path), fps=args.fps))


if __name__ == "__main__":
    main()
