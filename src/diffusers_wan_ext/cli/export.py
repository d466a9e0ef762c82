"""``diffusers-wan export-dit``: a Diffusers transformer -> one safetensors file in the original Wan key layout."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from ..conversion.dit import export_dit_state_dict
from ..conversion.release_io import DTYPES
from ..utils.io import load_state_dict

__all__ = ["cmd_export_dit"]


def cmd_export_dit(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if src.is_dir():
        index = src / (SAFETENSORS_WEIGHTS_NAME + ".index.json")
        sd = load_state_dict(index if index.exists() else src / SAFETENSORS_WEIGHTS_NAME)
    else:
        sd = load_state_dict(src)
    out = export_dit_state_dict(sd)
    if args.prefix:
        out = {args.prefix + k: v for k, v in out.items()}
    if args.dtype:
        dt = DTYPES[args.dtype]
        out = {k: v.to(dt) if v.is_floating_point() else v for k, v in out.items()}
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(args.dst) + ".partial")
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp))
    os.replace(tmp, args.dst)
    print(f"exported {len(out)} tensors -> {args.dst}")
    return 0
