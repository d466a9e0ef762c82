"""``diffusers-wan lora convert | info | export``: LoRAs between the Diffusers, original/ComfyUI, Kohya and DiffSynth
layouts; ``lora convert`` also to and from a family's own layout (``ModelFamily.own_lora_formats``: LongCat-Video's
``longcat``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..conversion.longcat import convert_longcat_lora_state_dict, is_longcat_lora_state_dict
from ..conversion.release_io import DTYPES
from ..families import FAMILIES
from ..lora import convert_lora_state_dict, export_lora, load_lora_file, lora_info, save_lora_file
from ..utils.atomic import claim_destination
from ..utils.io import naming

__all__ = ["cmd_lora", "convert_lora_file"]


def print_lora_info(file: str, source: str | None, as_json: bool) -> None:
    with naming(file):
        info = lora_info(load_lora_file(file), source=source)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print(f"format: {info['format']} ({info['tensors']} tensors)")
    for comp, c in info["components"].items():
        alphas = ", ".join(f"{a:g}" for a in c["alphas"]) or "none (scale 1)"
        print(f"{comp}: {c['modules']} modules, rank {', '.join(map(str, c['ranks'])) or '-'}, alpha {alphas}, "
              f"{c['bias']} bias deltas, {c['diff']} full-weight diffs, dtype {', '.join(c['dtypes'])}")
        print("  targets: " + ", ".join(c["targets"]))


def convert_lora_file(sd: dict[str, torch.Tensor], to: str, source: str | None,
                      component: str) -> dict[str, torch.Tensor]:
    """``lora convert``'s tensors: ``sd`` (in ``source``, detected when ``None``) in layout ``to``; a family's own
    layout (LongCat-Video's ``longcat``) is read and written through the Diffusers layout of its transformer."""
    if source == "longcat" or (source is None and is_longcat_lora_state_dict(sd)):
        sd, source = convert_longcat_lora_state_dict(sd), "diffusers"
    owner = next((f for f in FAMILIES if to in f.own_lora_formats), None)
    if owner is None:
        return convert_lora_state_dict(sd, to, source=source, transformer_name=component)
    if component != "transformer":
        raise ValueError(f"lora convert --to {to}: --component {component}; the layout holds the transformer only")
    return owner.export_own_lora(to, convert_lora_state_dict(sd, "diffusers", source=source))


def cmd_lora(args: argparse.Namespace) -> int:
    if args.lora_command == "info":
        print_lora_info(args.file, args.from_format, args.json)
        return 0
    if args.lora_command == "export":
        with naming(args.src):
            sd = convert_lora_state_dict(load_lora_file(args.src), "diffusers", source=args.from_format)
        paths = export_lora(sd, args.dst, formats=args.formats, overwrite=args.overwrite)
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0
    dst = Path(args.dst)
    if dst.is_dir():
        raise ValueError(f"lora convert: DST {dst} is a folder; pass the output file (e.g. {dst}/lora.safetensors)")
    with claim_destination(dst, overwrite=args.overwrite):  # before reading: an existing DST fails at once
        with naming(args.src):
            sd = load_lora_file(args.src)
            out = convert_lora_file(sd, args.to, args.from_format, args.component)
        if args.dtype:
            dt = DTYPES[args.dtype]
            out = {k: v.to(dt) if v.is_floating_point() else v for k, v in out.items()}
        save_lora_file(out, dst, overwrite=args.overwrite)
    print(f"converted {len(sd)} -> {len(out)} tensors ({args.to}) -> {dst}")
    return 0
