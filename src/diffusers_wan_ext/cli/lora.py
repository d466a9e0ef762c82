"""``diffusers-wan lora convert | info | export``: LoRAs between the Diffusers, original/ComfyUI, Kohya and DiffSynth
layouts, and to and from a family's own layout (``ModelFamily.own_lora_formats``: LongCat-Video's ``longcat``, read
and described through the Diffusers layout of its transformer)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..conversion.longcat import convert_longcat_lora_state_dict, is_longcat_lora_state_dict
from ..conversion.release_io import DTYPES
from ..families import FAMILIES, ModelFamily
from ..lora import (
    LORA_FORMATS,
    convert_lora_state_dict,
    detect_lora_format,
    export_lora,
    load_lora_file,
    lora_info,
    save_lora_file,
)
from ..utils.atomic import claim_destination
from ..utils.io import naming

__all__ = ["cmd_lora", "convert_lora_file", "export_lora_folder", "family_lora_layout", "lora_file_info"]


def family_lora_layout(sd: dict[str, torch.Tensor], source: str | None) -> str | None:
    """The family layout ``sd`` is in (``--from``, or detected: LongCat-Video's ``longcat``), else ``None``."""
    return "longcat" if source == "longcat" or (source is None and is_longcat_lora_state_dict(sd)) else None


def layout_owner(fmt: str) -> ModelFamily | None:
    """The family whose own LoRA layout ``fmt`` is (LongCat-Video for ``longcat``), ``None`` for a Wan layout."""
    return next((f for f in FAMILIES if fmt in f.own_lora_formats), None)


def lora_file_info(sd: dict[str, torch.Tensor], source: str | None) -> dict:
    """:func:`~diffusers_wan_ext.lora.lora_info` of ``sd``; a family layout (``longcat``) is described through the
    Diffusers modules of its transformer, with ``format`` the layout and ``family`` the family's name."""
    layout = family_lora_layout(sd, source)
    if layout is None:
        return lora_info(sd, source=source)
    info = lora_info(convert_longcat_lora_state_dict(sd), source="diffusers")
    return {**info, "format": layout, "family": layout_owner(layout).name, "tensors": len(sd)}


def print_lora_info(file: str, source: str | None, as_json: bool) -> None:
    with naming(file):
        info = lora_file_info(load_lora_file(file), source)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    owner = layout_owner(info["format"])
    where = "" if owner is None else f"; {owner.short_title}'s own layout, modules named as in Diffusers"
    print(f"format: {info['format']} ({info['tensors']} tensors{where})")
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


def export_formats(layout: str | None, formats: list[str] | None, src: str, detected: str) -> list[str]:
    """``lora export --formats`` for a LoRA in layout ``detected`` (a family's ``layout`` or a Wan one): the default
    (every Wan layout; for a family layout's LoRA the Diffusers and the family's layouts), or one error line when a
    layout cannot hold this LoRA (a family's layout for a Wan DiT LoRA, a Wan layout for a family's LoRA)."""
    family = None if layout is None else layout_owner(layout)
    if formats is None:
        return list(LORA_FORMATS) if family is None else ["diffusers", *family.own_lora_formats]
    for fmt in formats:
        owner = layout_owner(fmt)
        if family is not None and fmt not in ("diffusers", *family.own_lora_formats):
            raise ValueError(f"lora export --formats {fmt}: {src} is a {family.short_title} LoRA ({layout} layout), "
                             f"written in the {', '.join(('diffusers', *family.own_lora_formats))} layouts only (the "
                             f"others name Wan DiT modules)")
        if owner is not None and family is None and detected != "diffusers":
            raise ValueError(f"lora export --formats {fmt}: the layout of {owner.short_title} LoRAs only; {src} is "
                             f"a Wan DiT LoRA ({detected} layout)")
    return list(formats)


def export_lora_folder(src: str, dst: str, formats: list[str] | None, source: str | None,
                       overwrite: bool) -> dict[str, Path]:
    """``lora export``: ``src`` in each of ``formats`` into the folder ``dst`` (a family's own layout through its
    ``export_own_lora``, to the file its ``own_lora_formats`` names); nothing is written when a layout fails."""
    with naming(src):
        raw = load_lora_file(src)
        layout = family_lora_layout(raw, source)
        formats = export_formats(layout, formats, src, layout or source or detect_lora_format(raw))
        sd = (convert_longcat_lora_state_dict(raw) if layout is not None
              else convert_lora_state_dict(raw, "diffusers", source=source))
    own: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}
    for fmt in formats:
        owner = layout_owner(fmt)
        if owner is not None:
            try:
                own[fmt] = (Path(dst) / owner.own_lora_formats[fmt], owner.export_own_lora(fmt, sd))
            except ValueError as e:
                raise ValueError(f"lora export --formats {fmt}: {src} is not a LoRA of a {owner.short_title} "
                                 f"transformer ({e})") from None
    existing = [str(path) for path, _ in own.values() if path.exists()]
    if existing and not overwrite:
        raise ValueError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
    paths = export_lora(sd, dst, formats=[f for f in formats if f not in own], overwrite=overwrite)
    return {**paths, **{fmt: save_lora_file(tensors, path) for fmt, (path, tensors) in own.items()}}


def cmd_lora(args: argparse.Namespace) -> int:
    if args.lora_command == "info":
        print_lora_info(args.file, args.from_format, args.json)
        return 0
    if args.lora_command == "export":
        paths = export_lora_folder(args.src, args.dst, args.formats, args.from_format, args.overwrite)
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
