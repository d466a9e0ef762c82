"""``diffusers-wan export-dit``: a Diffusers transformer -> one file in the original Wan key layout: plain
safetensors, ComfyUI fp8 (scaled or not) or GGUF (``--format``, :mod:`diffusers_wan_ext.utils.single_file`).  A
transformer folder written by ``convert --keep-quantized`` is read dequantized (GGUF or fp8)."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from ..conversion.dit import export_dit_state_dict
from ..conversion.quantized_dit import GGUF_FOLDER_WEIGHTS
from ..conversion.quantized_torchao import dequantize_torchao_tensors
from ..conversion.release_io import DTYPES
from ..utils.atomic import atomic_write_file, claim_destination
from ..utils.io import ConversionError, load_state_dict, naming
from ..utils.single_file import check_export_path, write_single_file

__all__ = ["cmd_export_dit"]


def cmd_export_dit(args: argparse.Namespace) -> int:
    """Export the transformer; ``DST`` must not exist unless ``--overwrite`` (it is written atomically)."""
    src, dst = Path(args.src), Path(args.dst)
    overwrite = args.overwrite
    fmt = getattr(args, "format", None) or "original"
    check_export_path(dst, fmt)  # before reading anything
    with claim_destination(dst, overwrite=overwrite):  # before reading: an existing DST fails at once
        if src.is_dir():
            index = src / (SAFETENSORS_WEIGHTS_NAME + ".index.json")
            weights = index if index.exists() else src / SAFETENSORS_WEIGHTS_NAME
            if not weights.exists() and (src / GGUF_FOLDER_WEIGHTS).exists():  # convert --keep-quantized (GGUF)
                weights = src / GGUF_FOLDER_WEIGHTS
            if not weights.exists():
                raise ConversionError(f"{src}: no {SAFETENSORS_WEIGHTS_NAME} (or its .index.json) in this folder; "
                                      "pass a Diffusers transformer folder or its safetensors file")
            src = weights
        sd = dequantize_torchao_tensors(load_state_dict(src))  # convert --keep-quantized --fp8-storage torchao
        with naming(src):
            out = export_dit_state_dict(sd)
        if args.prefix:
            out = {args.prefix + k: v for k, v in out.items()}
        if fmt != "original":
            dt = DTYPES[args.dtype] if args.dtype else None
            atomic_write_file(dst, lambda tmp: write_single_file(tmp, out, fmt, prefix=args.prefix, dtype=dt),
                              overwrite=overwrite)
            print(f"exported {len(out)} tensors ({fmt}) -> {dst}")
            return 0
        if args.dtype:
            dt = DTYPES[args.dtype]
            out = {k: v.to(dt) if v.is_floating_point() else v for k, v in out.items()}
        tensors = {k: v.contiguous() for k, v in out.items()}
        atomic_write_file(dst, lambda tmp: save_file(tensors, str(tmp)), overwrite=overwrite)
    print(f"exported {len(out)} tensors -> {dst}")
    return 0
