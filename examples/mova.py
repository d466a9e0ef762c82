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
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

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


def main(argv=None):
    parser = argparse.ArgumentParser(description="MOVA: image + prompt -> video with audio (mp4).")
    parser.add_argument("model", help="converted MOVA folder (model_index.json: MovaPipeline)")
    parser.add_argument("image", help="first frame (image file)")
    parser.add_argument("prompt")
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
    args = parser.parse_args(argv)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pipe = MovaPipeline.from_pretrained(args.model, torch_dtype=dtype)
    pipe.vae.to(torch.float32)
    pipe.audio_vae.to(torch.float32)
    if torch.cuda.is_available():
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
