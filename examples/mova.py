"""MOVA (openmoss/MOVA-360p / MOVA-720p): an image and a prompt -> a video with its generated sound track (mp4).

Convert the release once (its folder has video_dit/, video_dit_2/, audio_dit/, dual_tower_bridge/, audio_vae/,
video_vae/, text_encoder/, tokenizer/; MOVA-360p uses MOVA-720p's audio_vae/ when it has none):

    diffusers-wan convert MOVA-360p MOVA-360p-diffusers

then:

    python examples/mova.py MOVA-360p-diffusers cat.png "Two cute orange cats, wearing boxing gloves, fight." \
        --height 352 --width 640 --output mova.mp4

The audio (48 kHz mono, from the DAC audio VAE) is muxed into the mp4 (ffmpeg of imageio-ffmpeg, AAC).  The
command line does the same: ``diffusers-wan generate --model MOVA-360p-diffusers --image cat.png --prompt ...``
(the sound is generated for ``--fps``, 24 by default).

Without a model folder (or with --tiny) it builds a tiny random-weight release, converts it, writes a first frame if
none is given, and runs on the CPU, so the script itself can be checked anywhere:

    python examples/mova.py --tiny --output mova_tiny.mp4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusers_wan_ext import MovaPipeline
from diffusers_wan_ext.utils.media import add_audio_track, write_video

# DiffSynth-Studio's MOVA example negative prompt
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指"
)


def write_mp4_with_audio(frames, audio: np.ndarray, sample_rate: int, fps: float, output: str) -> str:
    """``frames`` (``[F, H, W, 3]`` in [0, 1] or PIL images) as H.264 and ``audio`` (mono) as AAC in one mp4."""
    out = write_video(list(frames), output, fps=fps)
    return str(add_audio_track(out, audio, sample_rate))


def _tiny_inputs(args) -> None:
    """A tiny converted MOVA folder and a first frame when none is given (32 x 48, 9 frames at 12 fps, 2 steps)."""
    from diffusers_wan_ext.families.mova import make_tiny_mova_release
    from diffusers_wan_ext.release_converter import convert_release

    work = Path(tempfile.mkdtemp(prefix="mova-tiny-"))
    release = make_tiny_mova_release(work / "MOVA-360p-tiny")
    args.model = str(convert_release(release, work / "MOVA-360p-tiny-diffusers", dtype="fp32", progress=False))
    args.height, args.width, args.num_frames, args.frame_rate, args.steps = 32, 48, 9, 12.0, 2
    args.max_sequence_length, args.dtype = 16, "fp32"
    if args.image is None:
        args.image = str(work / "first_frame.png")
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(args.image)


def main(argv=None):
    parser = argparse.ArgumentParser(description="MOVA: image + prompt -> video with audio (mp4).")
    parser.add_argument("model", nargs="?", help="converted MOVA folder (model_index.json: MovaPipeline)")
    parser.add_argument("image", nargs="?", help="first frame (image file)")
    parser.add_argument("prompt", nargs="?", default="A fox barks in the snow.")
    parser.add_argument("--negative-prompt", default=NEGATIVE_PROMPT)
    parser.add_argument("--output", default="mova.mp4")
    parser.add_argument("--height", type=int, default=352, help="352 for MOVA-360p, 720 for MOVA-720p")
    parser.add_argument("--width", type=int, default=640, help="640 for MOVA-360p, 1280 for MOVA-720p")
    parser.add_argument("--num-frames", type=int, default=121, help="4k + 1")
    parser.add_argument("--frame-rate", type=float, default=24.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight model on the CPU (smoke test)")
    args = parser.parse_args(argv)
    tiny = args.tiny or args.model is None
    if tiny:
        _tiny_inputs(args)
    elif args.image is None:
        parser.error("give the first frame (an image file) after the model folder")

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # the two VAEs load in float32 (per-component dtype): a later ``.to(torch.float32)`` would make Diffusers warn
    pipe = MovaPipeline.from_pretrained(args.model, dtype={"default": dtype, "vae": torch.float32,
                                                           "audio_vae": torch.float32})
    if torch.cuda.is_available() and not tiny:
        pipe.enable_model_cpu_offload()
    out = pipe(
        image=args.image, prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height,
        width=args.width, num_frames=args.num_frames, frame_rate=args.frame_rate, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
        generator=torch.Generator().manual_seed(args.seed),
    )
    print(write_mp4_with_audio(out.frames[0], out.audio[0], out.audio_sample_rate, args.frame_rate, args.output))


if __name__ == "__main__":
    main()
