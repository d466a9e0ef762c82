"""``diffusers-wan generate`` (a video from a converted folder), ``demo`` (the tiny end-to-end run) and ``variants``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import load_image

from ..conversion.release_io import DTYPES
from ..demo import run_demo, write_video
from ..families import FAMILIES
from ..utils.validation import validate_video_size

__all__ = ["cmd_demo", "cmd_generate", "cmd_variants"]


def add_family_inputs(args: argparse.Namespace, pipe, kw: dict) -> None:
    """The families' own ``generate`` options, checked against the loaded pipeline (e.g. Wan2.2-Animate's videos)."""
    for family in FAMILIES:
        given = {i.argument: getattr(args, i.argument) for i in family.generate_inputs
                 if getattr(args, i.argument, None) is not None}
        ours = any(isinstance(pipe, cls) for cls in family.pipeline_classes)
        if given and not ours:
            flags = "/".join(i.flag for i in family.generate_inputs if i.argument in given)
            raise ValueError(f"generate: {flags} is for {family.title} folders; {args.model} is a "
                             f"{type(pipe).__name__}")
        if ours:
            family.prepare_generate(pipe, args.model, given, kw)


def cmd_generate(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    upgrade = next((f.generate_pipeline[type(pipe).__name__] for f in FAMILIES
                    if type(pipe).__name__ in f.generate_pipeline), None)
    if upgrade is not None and not isinstance(pipe, upgrade):
        pipe = upgrade(**pipe.components)  # the family's pipeline for file inputs and input checks
    defaults = {}
    rec = Path(args.model) / "wan_variant.json"
    if rec.exists():
        defaults = json.loads(rec.read_text())
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.offload and device == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    kw = dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt,
        height=args.height or defaults.get("height", 480), width=args.width or defaults.get("width", 832),
        num_frames=args.num_frames or defaults.get("num_frames", 81),
        num_inference_steps=args.steps or defaults.get("num_inference_steps", 50),
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else defaults.get("guidance_scale", 5.0),
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    )
    validate_video_size(
        kw["height"], kw["width"], kw["num_frames"],
        spatial_factor=getattr(pipe, "vae_scale_factor_spatial", 8),
        temporal_factor=getattr(pipe, "vae_scale_factor_temporal", 4),
        patch=pipe.transformer.config.patch_size[1] if getattr(pipe, "transformer", None) is not None else 2,
    )
    if args.image:
        kw["image"] = load_image(args.image)
    if args.last_image:
        kw["last_image"] = load_image(args.last_image)
    add_family_inputs(args, pipe, kw)
    frames = pipe(**kw).frames[0]
    out = write_video(frames, args.output, fps=args.fps or defaults.get("fps", 16))
    print(out.resolve())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    print(run_demo(args.output, workdir=args.workdir, steps=args.steps, seed=args.seed))
    return 0


def cmd_variants(args: argparse.Namespace) -> int:
    for family in FAMILIES:
        for v in family.variants:
            print(f"{v.name:24s} {v.arch:10s} {v.pipeline:24s} {v.release}")
    return 0
