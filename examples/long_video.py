"""Long videos, far past the 81 frames Wan was trained on: text-to-video with context windows (+ FreeNoise), and
image-to-video continued segment by segment.

    # one 241-frame shot (61 latent frames) denoised in windows of 21 latent frames overlapping by 6
    python examples/long_video.py t2v /ckpt/Wan2.1-T2V-1.3B-diffusers "a red fox trots through deep snow" \
        --num-frames 241 --context-frames 21 --context-overlap 6 --output fox_long.mp4
    # a seamless loop
    python examples/long_video.py t2v /ckpt/Wan2.1-T2V-14B-diffusers "waves rolling onto a beach" \
        --num-frames 161 --schedule uniform_looped --output waves_loop.mp4
    # image-to-video: 3 segments of 81 frames, each starting from the last frame of the previous one (241 frames)
    python examples/long_video.py i2v /ckpt/Wan2.1-I2V-14B-480P-diffusers "the fox keeps walking" \
        --image fox.png --segments 3 --output fox_i2v.mp4

Recommended settings (all window lengths in latent frames, ``(frames - 1) // 4 + 1``):

* Wan2.1 T2V 1.3B / 14B, Wan2.2 T2V-A14B at 480p or 720p: ``--context-frames 21`` (the 81 trained frames),
  ``--context-overlap 4`` to ``8`` (more overlap: smoother, slower -- each step runs about
  ``(T - overlap) / (21 - overlap)`` windows), ``uniform_standard`` with FreeNoise for one continuous shot,
  ``uniform_looped`` for a loop, ``static_standard`` together with step caches (TeaCache / FirstBlockCache keep one
  state per window position, which only ``static_standard`` keeps on the same frames at every step).
* Wan2.2 TI2V-5B (121 frames at 24 fps): ``--context-frames 31``.
* I2V continuation: segments of the trained length (81 frames; 121 for TI2V-5B), a handful of segments (colour
  and detail drift a little at every hand-over); one prompt per segment tells a story (``--prompt-per-segment``).

Without a model folder (or with --tiny) it builds a tiny random-weight release, converts it and runs on the CPU, so
the script itself can be checked anywhere (the output is noise).
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video, load_image

from diffusers_wan_ext import WanExtPipeline
from diffusers_wan_ext.hooks.sliding_window import windowed
from diffusers_wan_ext.runtime.context_windows import (
    CONTEXT_SCHEDULES,
    FUSE_METHODS,
    context_schedule,
    freenoise_latents,
    latent_frames,
)
from diffusers_wan_ext.runtime.long_video import generate_long_video, to_pil

NEGATIVE_PROMPT = "Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality"


def _tiny_folder(arch: str) -> str:
    from diffusers_wan_ext.demo import TINY, make_tiny_release
    from diffusers_wan_ext.release_converter import convert_release

    work = Path(tempfile.mkdtemp(prefix=f"long-video-{arch}-"))
    release = make_tiny_release(work / f"Wan2.1-{arch}-tiny", arch=arch)
    return str(convert_release(release, work / f"Wan2.1-{arch}-tiny-diffusers", dtype="fp32", progress=False,
                               image_encoder_heads=TINY["clip_heads"]))


def text_to_video(args, model, dtype, extra):
    """One long shot: context windows on the transformer(s), FreeNoise initial latents."""
    pipe = WanExtPipeline.from_pretrained(model, dtype=dtype)  # passes the step index the windows move with
    _to_device(pipe, args.tiny)
    schedule = context_schedule(args.schedule, args.context_frames, args.context_overlap,
                                fuse_method=args.fuse_method)
    generator = torch.Generator().manual_seed(args.seed)
    latents = None
    if not args.no_freenoise:
        shape = (1, pipe.vae.config.z_dim, latent_frames(args.num_frames, pipe.vae_scale_factor_temporal),
                 args.height // pipe.vae_scale_factor_spatial, args.width // pipe.vae_scale_factor_spatial)
        latents = freenoise_latents(shape, args.context_frames, args.context_overlap, generator=generator)
    with windowed([pipe.transformer, pipe.transformer_2], schedule=schedule):
        return pipe(args.prompt, negative_prompt=NEGATIVE_PROMPT, height=args.height, width=args.width,
                    num_frames=args.num_frames, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                    generator=generator, latents=latents, **extra).frames[0]


def image_to_video(args, model, dtype, extra):
    """Segments of ``--num-frames`` frames, each starting from the last frame of the one before."""
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    _to_device(pipe, args.tiny)
    if args.image:
        image = load_image(args.image).resize((args.width, args.height))
    else:  # no image given: a colour gradient
        y, x = np.mgrid[0:1:args.height * 1j, 0:1:args.width * 1j]
        image = to_pil(np.stack([x, y, 1 - x], -1))
    prompt = args.prompt.split("|") if args.prompt_per_segment else args.prompt
    return generate_long_video(pipe, prompt, image=image, segments=args.segments, num_frames=args.num_frames,
                               negative_prompt=NEGATIVE_PROMPT, height=args.height, width=args.width,
                               num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                               generator=torch.Generator().manual_seed(args.seed), **extra)


def _to_device(pipe, tiny):
    if torch.cuda.is_available() and not tiny:
        pipe.enable_model_cpu_offload()
        if hasattr(pipe, "set_attention_backend"):
            pipe.set_attention_backend("auto")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Long Wan videos: context windows (T2V), continuation (I2V).")
    parser.add_argument("mode", choices=("t2v", "i2v"))
    parser.add_argument("model", nargs="?", help="converted Diffusers folder (T2V or I2V)")
    parser.add_argument("prompt", nargs="?", default="a red fox trots through deep snow, cinematic")
    parser.add_argument("--image", help="i2v: the first frame (path or URL)")
    parser.add_argument("--output", default="long_video.mp4")
    parser.add_argument("--num-frames", type=int, help="t2v: the whole video (default 241); i2v: per segment (81)")
    parser.add_argument("--segments", type=int, default=3, help="i2v: segments (each continues the last)")
    parser.add_argument("--prompt-per-segment", action="store_true", help="i2v: the prompt is 'first|second|...'")
    parser.add_argument("--schedule", choices=sorted(CONTEXT_SCHEDULES), default="uniform_standard")
    parser.add_argument("--context-frames", type=int, default=21, help="latent frames per window (81 frames = 21)")
    parser.add_argument("--context-overlap", type=int, default=6, help="latent frames shared by neighbouring windows")
    parser.add_argument("--fuse-method", choices=FUSE_METHODS, default="linear")
    parser.add_argument("--no-freenoise", action="store_true", help="t2v: independent noise for every frame")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight model on the CPU (smoke test)")
    args = parser.parse_args(argv)

    args.tiny = args.tiny or args.model is None
    extra = {}
    if args.tiny:
        model, dtype = _tiny_folder(args.mode), torch.float32
        args.height = args.width = 32
        args.steps = 2
        args.num_frames = args.num_frames or (41 if args.mode == "t2v" else 9)  # 11 latent frames / 3 segments
        args.context_frames, args.context_overlap = min(args.context_frames, 5), min(args.context_overlap, 2)
        extra = dict(max_sequence_length=64)
    else:
        model, dtype = args.model, torch.bfloat16
        args.num_frames = args.num_frames or (241 if args.mode == "t2v" else 81)
    run = text_to_video if args.mode == "t2v" else image_to_video
    frames = run(args, model, dtype, extra)
    print(export_to_video(list(frames), args.output, fps=args.fps))


if __name__ == "__main__":
    main()
