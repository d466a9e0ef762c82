"""Reading original checkpoints and writing output folders safely.

Original Wan releases ship DiT weights as (sharded) safetensors and the VAE / umT5 / CLIP weights as raw
``torch.save`` state dicts (``.pth``).  Everything here reads both, validates what it reads and reports problems with
the file and key names involved, so that a half-downloaded shard or a wrong file gives a readable error instead of a
stack trace from deep inside ``torch``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

__all__ = [
    "ConversionError",
    "atomic_output_dir",
    "load_state_dict",
    "load_state_dict_files",
    "raise_for_key_problems",
    "strip_known_prefixes",
]


class ConversionError(ValueError):
    """Raised for any checkpoint that cannot be converted; the message names the file and keys involved."""


def format_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return shown + more


def raise_for_key_problems(
    what: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (), wrong_shapes: Iterable[str] = ()
) -> None:
    """Raise one :class:`ConversionError` naming every missing / unexpected / mis-shaped key (none: no error)."""
    missing, unexpected, wrong_shapes = list(missing), list(unexpected), list(wrong_shapes)
    problems = []
    if missing:
        problems.append(f"missing keys {format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {format_keys(unexpected)}")
    if wrong_shapes:
        problems.append(f"shape mismatch: {format_keys(wrong_shapes)}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.safetensors`` file, a sharded ``*.safetensors.index.json`` or a ``.pth``/``.pt``/``.bin``.

    ``.pth`` files are read with ``torch.load(weights_only=True)``; a pickled module or anything that is not a flat
    mapping of names to tensors is rejected with :class:`ConversionError`.

    Example:
        >>> sd = load_state_dict("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: file not found")
    name = path.name
    if name.endswith(".index.json"):
        return _load_sharded(path)
    if name.endswith(".safetensors"):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as e:  # truncated / corrupt file
            raise ConversionError(
                f"{path}: not a readable safetensors file ({e}). The file may be truncated or still downloading; "
                "re-download it and check its size against the release."
            ) from e
    if name.endswith((".pth", ".pt", ".bin", ".ckpt")):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for corrupt pickles
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception:
                raise ConversionError(
                    f"{path}: cannot be read as a PyTorch state dict ({type(e).__name__}: {e}). "
                    "The file may be truncated or not a weights file."
                ) from e
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ConversionError(f"{path}: expected a flat mapping of parameter names to tensors")
        return dict(obj)
    raise ConversionError(f"{path}: unsupported file type (expected .safetensors, .safetensors.index.json or .pth)")


def _load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ConversionError(f"{index_path}: not a valid safetensors index (needs a 'weight_map')") from e
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_path.parent / s).exists()]
    if missing:
        raise ConversionError(f"{index_path}: shard(s) listed in the index are missing: {', '.join(missing)}")
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        sd.update(load_state_dict(index_path.parent / shard))
    absent = set(weight_map) - set(sd)
    if absent:
        raise ConversionError(f"{index_path}: keys listed in the index are not in any shard: {format_keys(absent)}")
    return sd


def load_state_dict_files(paths: Iterable[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Load several files whose keys are disjoint and return their union (duplicate keys are an error)."""
    sd: dict[str, torch.Tensor] = {}
    for p in paths:
        part = load_state_dict(p)
        dup = set(part) & set(sd)
        if dup:
            raise ConversionError(f"{p}: keys already loaded from another file: {format_keys(dup)}")
        sd.update(part)
    return sd


# Prefixes that wrap the original key layout in various distributions (ComfyUI, krea, training frameworks).
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "module.", "_orig_mod.")


def strip_known_prefixes(sd: dict[str, torch.Tensor], anchor: str) -> dict[str, torch.Tensor]:
    """Strip a wrapper prefix (e.g. krea's ``model.``) when *every* key carries it and ``anchor`` appears beneath it."""
    for prefix in KNOWN_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd) and any(k[len(prefix):].startswith(anchor) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``dst``; move it to ``dst`` only if the block completes.

    On any exception the temporary folder is removed and ``dst`` is left as it was (absent, or the previous content
    when ``overwrite`` is set).

    Example:
        >>> with atomic_output_dir("out/model") as tmp:  # doctest: +SKIP
        ...     pipe.save_pretrained(tmp)
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        else:
            raise ConversionError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
