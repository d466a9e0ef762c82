"""VACE (Wan2.1-VACE-1.3B / 14B, VACE-Wan2.1-1.3B-Preview, Wan2.2-VACE-Fun-A14B) with a converted folder.

Converted VACE folders are plain Diffusers: they load as stock ``WanVACEPipeline`` (this package is not needed to run
them).  DiffSynth-Studio's arguments map one to one: ``vace_video`` -> ``video``, ``vace_video_mask`` -> ``mask``
(white = regenerate), ``vace_reference_image`` -> ``reference_images``, ``vace_scale`` -> ``conditioning_scale``.

    python examples/vace.py /ckpt/Wan2.1-VACE-1.3B-diffusers "a dancer on a beach" out.mp4 \
        [--video control.mp4] [--mask mask.mp4] [--reference ref.png] [--scale 1.0]
"""

import argparse

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import load_image, load_video

from diffusers_wan_ext.demo import write_video

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model")
parser.add_argument("prompt")
parser.add_argument("output")
parser.add_argument("--video", help="conditioning video (depth / pose / the video to edit)")
parser.add_argument("--mask", help="mask video: white = generate, black = keep")
parser.add_argument("--reference", action="append", help="reference image(s)")
parser.add_argument("--scale", type=float, default=1.0, help="VACE hint scale (DiffSynth vace_scale)")
parser.add_argument("--height", type=int, default=480)
parser.add_argument("--width", type=int, default=832)
parser.add_argument("--num-frames", type=int, default=81)
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.bfloat16)
if torch.cuda.is_available():
    pipe.enable_model_cpu_offload()


def frames(path):
    return None if path is None else [f.resize((args.width, args.height)) for f in load_video(path)][: args.num_frames]


video = pipe(
    prompt=args.prompt, video=frames(args.video), mask=frames(args.mask),
    reference_images=[load_image(r) for r in args.reference] if args.reference else None,
    conditioning_scale=args.scale, height=args.height, width=args.width, num_frames=args.num_frames,
    num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
).frames[0]
print(write_video(video, args.output, fps=16))
