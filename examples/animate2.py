"""Wan2.2-Animate-2-14B: animate a character (reference image) with the motion of a driving video.

Convert the release once (the distilled DiT with ``--variant wan2.2-animate-2-14b-distilled``):

    diffusers-wan convert /ckpt/Wan2.2-Animate-2-14B /ckpt/Wan2.2-Animate-2-14B-diffusers

then run our classic pipeline (``WanAnimate2Pipeline``; ``DiffusionPipeline.from_pretrained`` loads it):

    python examples/animate2.py /ckpt/Wan2.2-Animate-2-14B-diffusers refimage.jpg refvideo.mp4 --output out.mp4
    python examples/animate2.py /ckpt/Wan2.2-Animate-2-14B-Distilled-diffusers refimage.jpg refvideo.mp4

Defaults follow DiffSynth-Studio's examples: 1280x720 (portrait), 81-frame clips at 24 fps; steps, CFG and
``log_scale`` come from the converted folder's ``model_index.json`` (40 steps at CFG 3; the distilled DiT: 10 steps,
CFG 1, ``log_scale = -1.3``).  The whole driving video is generated, clip
after clip (``--single-clip``: its first ``--clip-frames`` frames only).  ``--vram 24gb`` plans offloading (the
reference K/V cache then stays in CPU memory).

Without a model folder (or with --tiny) it builds a tiny random-weight release, converts it, writes a reference
image and a driving video if none are given, and runs on the CPU, so the script itself can be checked anywhere:

    python examples/animate2.py --tiny --output animate2_tiny.mp4
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

# first: registers WanAnimate2Pipeline and, before Diffusers imports bitsandbytes / torchao, drops their import noise
import diffusers_wan_ext  # noqa: F401

from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video
from PIL import Image

# DiffSynth-Studio's example prompt for the driving video's reference pass ("the person in the video moves, the
# background is still")
PROMPT_REF = "视频中的人在做动作，背景静止"


def _tiny_inputs(args) -> None:
    """A tiny converted Animate-2 folder, and a reference image / driving video (a moving square) when not given."""
    from diffusers_wan_ext.demo import TINY, make_tiny_release
    from diffusers_wan_ext.release_converter import convert_release

    work = Path(tempfile.mkdtemp(prefix="animate2-tiny-"))
    release = make_tiny_release(work / "Wan2.2-Animate-2-tiny", arch="animate2")
    args.model = str(convert_release(release, work / "Wan2.2-Animate-2-tiny-diffusers", dtype="fp32", progress=False,
                                     image_encoder_heads=TINY["clip_heads"]))
    args.height, args.width, args.clip_frames, args.steps, args.dtype = 32, 32, 5, 1, "fp32"
    if args.image is None:
        args.image = str(work / "character.png")
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(args.image)
    if args.video is None:
        frames = np.zeros((9, 32, 32, 3), np.float32)
        for i in range(9):
            frames[i, 8:20, 2 + 2 * i:14 + 2 * i] = 1.0
        args.video = export_to_video(list(frames), str(work / "driving.mp4"), fps=8)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Wan2.2-Animate-2: animate a character with a driving video.")
    parser.add_argument("model", nargs="?", help="converted Wan2.2-Animate-2 folder (diffusers-wan convert)")
    parser.add_argument("image", nargs="?", help="reference image: the character")
    parser.add_argument("video", nargs="?", help="driving video: the motion")
    parser.add_argument("--prompt", default="a person dancing")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--prompt-ref", default=PROMPT_REF, help="describes the driving video (reference pass)")
    parser.add_argument("--height", type=int, default=1280)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--clip-frames", type=int, default=81, help="frames per clip (4n + 1)")
    parser.add_argument("--single-clip", action="store_true", help="only the first clip of the driving video")
    parser.add_argument("--steps", type=int, default=None, help="default: the folder's (40; 10 distilled)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the folder's (3; 1 distilled)")
    parser.add_argument("--log-scale", type=float, default=None, help="default: the folder's (-1.3 distilled)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--vram", default=None, help="e.g. 24gb: plan offloading for this much GPU memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--output", default="animate2.mp4")
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight model on the CPU (smoke test)")
    args = parser.parse_args(argv)
    tiny = args.tiny or args.model is None
    if tiny:
        _tiny_inputs(args)
    elif args.image is None or args.video is None:
        parser.error("give the reference image and the driving video after the model folder")

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=dtype)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    if args.vram:
        pipe.enable_vram_management(args.vram, height=args.height, width=args.width, num_frames=args.clip_frames)
    else:
        pipe.to(device)
    video = pipe(
        image=args.image, driving_video=args.video, prompt=args.prompt, negative_prompt=args.negative_prompt,
        prompt_ref=args.prompt_ref, height=args.height, width=args.width, num_frames=args.clip_frames,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, log_scale=args.log_scale,
        long_video=not args.single_clip, generator=torch.Generator().manual_seed(args.seed),
    ).frames[0]
    export_to_video(list(video), args.output, fps=args.fps)
    print(f"wrote {args.output} ({len(video)} frames)")


if __name__ == "__main__":
    main()
