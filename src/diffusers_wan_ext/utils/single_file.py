"""Single-file checkpoints of the ComfyUI ecosystem: recognize, describe, read raw or dequantized.

Covers Comfy-Org's repackaged files and Kijai's (fp32 / fp16 / bf16 / ``float8_e4m3fn`` / ``float8_e5m2``, plain or
scaled fp8 in either convention: :mod:`~diffusers_wan_ext.utils.fp8_files`) and GGUF files
(:mod:`~diffusers_wan_ext.utils.gguf_files`), with or without the ``model.diffusion_model.`` / ``diffusion_model.``
key prefix (the converters strip it: :func:`~diffusers_wan_ext.utils.io.strip_known_prefixes`).
:func:`~diffusers_wan_ext.utils.io.load_state_dict` reads every such file through :func:`dequantize_state_dict`,
so ``diffusers-wan convert`` and ``load_dit_from_original`` take them as they take the original files.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .fp8_files import comfy_fp8_tensors, fp8_state_dict
from .gguf_files import GGUF_EXPORT_TYPES, read_gguf, write_gguf
from .quantized_tensor import QuantizedFileError, QuantizedTensor

__all__ = [
    "DEQUANT_DTYPE",
    "EXPORT_FORMATS",
    "SingleFileInfo",
    "check_export_path",
    "dequantize_state_dict",
    "holds_quantized_weights",
    "load_single_file",
    "read_quantized",
    "write_single_file",
]

#: dtype of dequantized tensors when none is asked for: float16 holds every Q8_0 .. Q2_K value and every scaled fp8
#: value of a Wan weight exactly enough (10-bit mantissa; the quantization error is far larger) in half the memory of
#: float32.  Tensors stored unquantized keep their own dtype.
DEQUANT_DTYPE = torch.float16

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_COMPONENT_ANCHORS = (
    ("dit", ("blocks.0.self_attn.q.weight", "patch_embedding.weight")),
    ("umt5 (Comfy / transformers names)", ("encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight")),
    ("umt5 (GGUF llama.cpp names)", ("enc.blk.0.attn_q.weight", "token_embd.weight")),
    ("umt5 (original names)", ("blocks.0.attn.q.weight", "token_embedding.weight")),
    ("vae", ("decoder.middle.0.residual.0.gamma", "encoder.conv1.weight")),
)


@dataclass
class SingleFileInfo:
    """What :func:`read_quantized` found in a file.

    Attributes:
        format: ``"gguf"``, ``"safetensors-fp8-scaled"``, ``"safetensors-fp8"`` or ``"safetensors"``.
        prefix: the key prefix every weight carries (``"model.diffusion_model."``, ``"diffusion_model."`` or ``""``).
        component: ``"dit"``, ``"vae"``, ``"umt5 (...)"`` or ``"unknown"`` (from anchor keys).
        qtypes: ``{stored type: tensor count}`` (``Q8_0``, ``F32``, ``float8_e4m3fn`` ...).
        scaled: fp8 weights carry scales; ``convention`` says which (``"scale_weight"`` / ``"weight_scale"``).
    """

    path: str
    format: str
    prefix: str = ""
    component: str = "unknown"
    qtypes: dict[str, int] = field(default_factory=dict)
    scaled: bool = False
    convention: str | None = None
    metadata: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One line: ``file: format, component, types (counts), prefix``."""
        types = ", ".join(f"{k} x{v}" for k, v in sorted(self.qtypes.items()))
        scaled = f" ({self.convention} scales)" if self.scaled else ""
        return (f"{Path(self.path).name}: {self.format}{scaled}, {self.component}, {types}, "
                f"prefix {self.prefix or '(none)'!r}")


def _component(keys: set[str], prefix: str) -> str:
    for name, anchors in _COMPONENT_ANCHORS:
        if all(prefix + a in keys or a in keys for a in anchors):
            return name
    return "unknown"


def _prefix(keys) -> str:
    keys = [k for k in keys if not k.endswith("scaled_fp8")]
    return next((p for p in _PREFIXES if keys and all(k.startswith(p) for k in keys)), "")


def _cut_tensor(path: Path) -> str | None:
    """The first tensor whose data runs past the end of a safetensors file (from its header), else ``None``."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n).decode("utf-8"))
        ends = {k: 8 + n + v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, MemoryError, OverflowError):
        return None
    size = path.stat().st_size
    return min((k for k, e in ends.items() if e > size), key=ends.get, default=None)


def _safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for corrupt files
        cut = _cut_tensor(path)
        if cut is not None:
            raise QuantizedFileError(f"{path}: truncated safetensors file: tensor {cut} runs past the end; "
                                     "re-download it") from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QuantizedFileError(f"{path}: not a readable safetensors file ({first}); re-download it") from None


def read_quantized(path: str | os.PathLike) -> tuple[dict[str, QuantizedTensor], SingleFileInfo]:
    """Every tensor of a ``.gguf`` or ``.safetensors`` single file in its stored form (GGUF blocks, fp8 + scale),
    nothing dequantized, and a :class:`SingleFileInfo` describing the file.  Keys keep the file's prefix.

    Example:
        >>> tensors, info = read_quantized("wan2.1_t2v_1.3B_fp8_scaled.safetensors")  # doctest: +SKIP
        >>> tensors["model.diffusion_model.blocks.0.ffn.0.weight"].qtype, info.scaled  # doctest: +SKIP
        ('float8_e4m3fn', True)
    """
    path = Path(path)
    if path.name.endswith(".gguf"):
        tensors, meta = read_gguf(path)
        info = SingleFileInfo(str(path), "gguf", metadata=meta)
    elif path.name.endswith(".safetensors"):
        sd, metadata = _safetensors(path)
        tensors, desc = comfy_fp8_tensors(sd, metadata, str(path))
        fmt = "safetensors-fp8-scaled" if desc["scaled"] else "safetensors-fp8" if desc["fp8_dtypes"] else "safetensors"
        info = SingleFileInfo(str(path), fmt, scaled=desc["scaled"], convention=desc["convention"], metadata=metadata)
    else:
        raise QuantizedFileError(f"{path}: not a single-file checkpoint (expected .safetensors or .gguf)")
    info.prefix = _prefix(tensors)
    info.component = _component(set(tensors), info.prefix)
    info.qtypes = dict(Counter(q.qtype for q in tensors.values()))
    return tensors, info


def holds_quantized_weights(path: str | os.PathLike) -> bool:
    """Whether a ``.gguf`` / ``.safetensors`` file stores any quantized tensor (a GGUF type other than F32 / F16 /
    BF16, or an fp8 safetensors tensor), from the headers alone (nothing is read into memory)."""
    path = Path(path)
    if path.name.endswith(".gguf"):
        tensors, _ = read_gguf(path)  # memory-mapped
        return any(q.is_quantized for q in tensors.values())
    if not path.name.endswith(".safetensors"):
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return any(f.get_slice(k).get_dtype().startswith("F8") for k in f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for corrupt files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QuantizedFileError(f"{path}: not a readable safetensors file ({first}); re-download it") from None


def dequantize_state_dict(tensors: Mapping[str, QuantizedTensor], dtype: torch.dtype | None = None,
                          consume: bool = False) -> dict[str, torch.Tensor]:
    """Dequantize every quantized tensor to ``dtype`` (``None``: :data:`DEQUANT_DTYPE`); plain tensors keep their
    dtype unless ``dtype`` is given.  ``consume`` empties ``tensors`` (a dict) as it goes, so each stored tensor can
    be freed once its dequantized copy exists (peak memory: the output plus one tensor, not both state dicts)."""
    out = {}
    for k in list(tensors):
        q = tensors.pop(k) if consume else tensors[k]
        if q.is_quantized:
            out[k] = q.dequantize(dtype or DEQUANT_DTYPE)
        else:
            t = q.dequantize(q.data.dtype) if q.data.is_floating_point() else q.dequantize()
            out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def load_single_file(path: str | os.PathLike, dtype: torch.dtype | None = None
                     ) -> tuple[dict[str, torch.Tensor], SingleFileInfo]:
    """A ComfyUI / Kijai / GGUF single file as a dequantized state dict (keys as stored, prefix included; the
    converters strip it) and its :class:`SingleFileInfo`.  ``dtype``: see :func:`dequantize_state_dict`.

    Example:
        >>> sd, info = load_single_file("wan2.1-t2v-14b-Q8_0.gguf", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> print(info.summary())  # doctest: +SKIP
    """
    tensors, info = read_quantized(path)
    return dequantize_state_dict(tensors, dtype), info


#: ``diffusers-wan export-dit --format`` values (the launcher's parser lists the same; a test keeps them equal)
EXPORT_FORMATS = ("original", "comfy-fp8-scaled", "comfy-fp8", "comfy-fp8-e5m2", "gguf-q8_0", "gguf-q5_1",
                  "gguf-q5_0", "gguf-q4_1", "gguf-q4_0", "gguf-f16", "gguf-bf16", "gguf-q6_k", "gguf-q5_k_m",
                  "gguf-q5_k_s", "gguf-q5_k", "gguf-q4_k_m", "gguf-q4_k_s", "gguf-q4_k", "gguf-q3_k_l", "gguf-q3_k_m",
                  "gguf-q3_k_s", "gguf-q3_k")


def check_export_path(path: str | os.PathLike, fmt: str) -> None:
    """Raise ``ValueError`` (one line) for an unknown format or a destination whose extension does not match it."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format {fmt!r}: unknown export format (choose from {', '.join(EXPORT_FORMATS)})")
    want = ".gguf" if fmt.startswith("gguf-") else ".safetensors"
    if not str(path).endswith(want):
        raise ValueError(f"{path}: --format {fmt} writes a {want} file; name the destination *{want}")


def write_single_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], fmt: str, prefix: str = "",
                      dtype: torch.dtype | None = None) -> dict[str, str]:
    """Write an original-layout (already prefixed) state dict in an :data:`EXPORT_FORMATS` format; returns
    ``{key: stored type}``.

    ``comfy-fp8-scaled``: the blocks' linear weights in ``float8_e4m3fn`` with per-tensor ``scale_weight`` and the
    ``scaled_fp8`` marker (read by ComfyUI and Kijai's WanVideoWrapper); ``comfy-fp8``: the same weights cast to
    fp8 without scales (``comfy-fp8-e5m2``: ``float8_e5m2``, as Kijai's ``*_fp8_e5m2`` files); ``gguf-*``:
    :func:`~diffusers_wan_ext.utils.gguf_files.write_gguf`.  ``dtype`` casts the
    tensors that stay unquantized.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format {fmt!r}: unknown export format (choose from {', '.join(EXPORT_FORMATS)})")
    if fmt.startswith("gguf-"):
        return write_gguf(path, state_dict, GGUF_EXPORT_TYPES[fmt[len("gguf-"):]])
    if fmt == "original":
        tensors, metadata = {k: v.to(dtype) if dtype and v.is_floating_point() else v
                             for k, v in state_dict.items()}, {}
    else:
        fp8 = torch.float8_e5m2 if fmt == "comfy-fp8-e5m2" else torch.float8_e4m3fn
        tensors, metadata = fp8_state_dict(state_dict, scaled=fmt == "comfy-fp8-scaled", prefix=prefix,
                                           fp8_dtype=fp8, other_dtype=dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    return {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()}
