"""GGUF single files (city96's ComfyUI-GGUF layout) read into :class:`QuantizedTensor` s and written back.

Reading follows ComfyUI-GGUF ``loader.py`` (``gguf_sd_loader``): every tensor through ``gguf.GGUFReader``; the
PyTorch shape is the GGUF dims reversed, or the ``comfy.gguf.orig_shape.<name>`` INT32 array when the file has one
(``tools/convert.py`` writes it for tensors it flattened to rows of 256; 5-D tensors that ``tools/fix_5d_tensors.py``
adds back as F32 carry their 5 dims directly).  Writing follows ``tools/convert.py`` (``ModelWan``): architecture
``wan``, 1-D / small (<= 1024 values) / ``.modulation`` tensors in F32, tensors of more than 4 dims in F32 at full
shape, a tensor whose rows do not fit the quant type's block falls back to F16.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .quantized_tensor import PLAIN_DTYPES, QuantizedFileError, QuantizedTensor

__all__ = ["GGUF_EXPORT_TYPES", "ORIG_SHAPE_KEY", "can_dequantize", "read_gguf", "write_gguf", "write_gguf_stored"]

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
#: the GGUF types ``export-dit`` writes (``--format gguf-<name>``) and the file type recorded for each
#: (the types ``gguf.quants.quantize`` implements that ComfyUI-GGUF's dequant.py also reads)
GGUF_EXPORT_TYPES = {"q8_0": "Q8_0", "f16": "F16", "bf16": "BF16", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0",
                     "q5_1": "Q5_1"}
_SMALL = 1024  # tools/convert.py QUANTIZATION_THRESHOLD
_KEEP_F32 = (".modulation",)  # tools/convert.py ModelWan.keys_hiprec


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise QuantizedFileError("reading or writing GGUF files needs the `gguf` package: pip install gguf "
                                 "(or pip install 'diffusers-wan-ext[gguf]')") from None
    return gguf


def _reader_class(gguf, path: Path):
    class CheckedReader(gguf.GGUFReader):
        """``GGUFReader`` that names the tensor of an unknown type id or one whose data runs past the file end."""

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            size = len(self.data)
            for field in fields:
                _, name, _, dims, raw_dtype, offset = field.parts
                key = bytes(name).decode("utf-8", "replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise QuantizedFileError(f"{path}: tensor {key}: unknown GGML quant type id {int(raw_dtype[0])} "
                                             f"(gguf {_version(gguf)} does not know it)") from None
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    raise QuantizedFileError(f"{path}: truncated GGUF file: tensor {key} needs {end} bytes but the "
                                             f"file has {size}; re-download it")
            super()._build_tensors(start_offs, fields)

    return CheckedReader


def _version(gguf) -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # noqa: BLE001
        return "?"


@functools.lru_cache(maxsize=None)
def can_dequantize(qtype: str) -> bool:
    """Whether the installed ``gguf`` package can dequantize GGUF type ``qtype`` (tried on one zero block)."""
    gguf = _import_gguf()
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype in PLAIN_DTYPES:
        return True
    _, type_size = gguf.GGML_QUANT_SIZES[kind]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), kind)
    except (NotImplementedError, ValueError, KeyError, TypeError):
        return False
    return True


def _orig_shape(reader, gguf, name: str, path: Path) -> tuple[int, ...] | None:
    field = reader.get_field(ORIG_SHAPE_KEY + name)
    if field is None:
        return None
    ok = (len(field.types) == 2 and field.types[0] == gguf.GGUFValueType.ARRAY
          and field.types[1] in (gguf.GGUFValueType.INT32, gguf.GGUFValueType.INT64))
    if not ok:
        raise QuantizedFileError(f"{path}: metadata {ORIG_SHAPE_KEY}{name} is not an integer array ({field.types})")
    return tuple(int(field.parts[i][0]) for i in field.data)


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """Every tensor of a GGUF file as a :class:`QuantizedTensor` (raw blocks, not dequantized, memory-mapped) and
    the file's metadata (``general.architecture``, ``general.file_type`` ...).

    Errors (one line naming the file and the tensor): not a GGUF file, truncated, unknown quant type id, a type
    ``gguf.quants.dequantize`` cannot read, element counts that do not match the stored original shape.
    """
    gguf = _import_gguf()
    path = Path(path)
    try:
        reader = _reader_class(gguf, path)(str(path))
    except QuantizedFileError:
        raise
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError / struct errors / IndexError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QuantizedFileError(f"{path}: not a readable GGUF file ({first})") from None
    out: dict[str, QuantizedTensor] = {}
    for t in reader.tensors:
        name, qtype = t.name, t.tensor_type
        shape = _orig_shape(reader, gguf, name, path) or tuple(int(d) for d in reversed(t.shape.tolist()))
        if int(np.prod(shape)) != int(t.n_elements):
            raise QuantizedFileError(f"{path}: tensor {name}: {t.n_elements} values stored but its shape is {shape}")
        if qtype.name not in PLAIN_DTYPES and not can_dequantize(qtype.name):
            supported = [q.name for q in gguf.GGMLQuantizationType if can_dequantize(q.name)]
            raise QuantizedFileError(f"{path}: tensor {name}: quant type {qtype.name} cannot be dequantized by gguf "
                                     f"{_version(gguf)} (supported: {', '.join(supported)})")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(t.data)
        if qtype.name == "BF16":
            data = data.view(torch.bfloat16) if data.dtype != torch.bfloat16 else data
        out[name] = QuantizedTensor(data=data, qtype=qtype.name, shape=shape)
    meta = {}
    for key in ("general.architecture", "general.file_type", "general.quantization_version"):
        field = reader.get_field(key)
        if field is not None:
            meta[key] = field.contents()
    return out, meta


def _choose_type(gguf, key: str, t: torch.Tensor, qtype: str) -> str:
    if t.ndim <= 1 or t.numel() <= _SMALL or any(s in key for s in _KEEP_F32) or t.ndim > 4:
        return "F32"
    if qtype in ("F16", "BF16", "F32"):
        return qtype
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return qtype if t.shape[-1] % block == 0 else "F16"


def _rows_of_256(t: torch.Tensor) -> bool:
    """tools/convert.py ``shape_fix`` rule: flatten to rows of 256 (recording ``comfy.gguf.orig_shape``)."""
    return t.ndim > 1 and t.numel() >= 512 and t.numel() % 256 == 0 and t.shape[-1] % 256 != 0


def write_gguf(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], qtype: str = "Q8_0",
               arch: str = "wan", shape_fix: bool = False) -> dict[str, str]:
    """Write an original-layout state dict as a GGUF file ComfyUI-GGUF loads; returns ``{key: stored type}``.

    ``qtype``: a GGUF type ``gguf.quants.quantize`` implements (``Q8_0``, ``Q4_0``, ``Q5_0``, ``F16``, ``BF16`` ...).
    ``shape_fix``: flatten tensors whose last dim does not fit a block into rows of 256 and store their shape in
    ``comfy.gguf.orig_shape.<key>`` (tools/convert.py does this for its UNet architectures, not for ``wan``).
    """
    gguf = _import_gguf()
    try:
        target = gguf.GGMLQuantizationType[qtype]
    except KeyError:
        raise QuantizedFileError(f"unknown GGUF quant type {qtype!r}") from None
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    file_type = {"F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "F32": "ALL_F32"}.get(qtype, f"MOSTLY_{qtype}")
    if hasattr(gguf.LlamaFileType, file_type):
        writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    stored = {}
    for key, t in state_dict.items():
        values = t.detach().to(torch.float32).contiguous()
        if shape_fix and target.name not in PLAIN_DTYPES and _rows_of_256(values) and t.numel() > _SMALL:
            writer.add_array(ORIG_SHAPE_KEY + key, [int(d) for d in t.shape])
            values = values.reshape(-1, 256)
        kind = _choose_type(gguf, key, values, target.name)
        values = values.numpy()
        data = gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind])
        writer.add_tensor(key, data, raw_dtype=gguf.GGMLQuantizationType[kind])
        stored[key] = kind
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def write_gguf_stored(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor | tuple[torch.Tensor, str]],
                      arch: str = "wan", strings: Mapping[str, str] | None = None) -> dict[str, str]:
    """Write tensors as they are, nothing re-quantized; returns ``{key: stored type}``.

    A value is either packed GGUF blocks with their type name, ``(uint8 tensor [rows, bytes], "Q4_K")`` (written
    byte for byte: a copy of what a file held), or a plain float32 / float16 tensor (written F32 / F16 at its own
    shape, 5-D included).  ``strings``: extra ``key: value`` metadata.  What Diffusers'
    ``load_gguf_checkpoint`` reads back: the blocks as ``GGUFParameter`` of that type, the rest as tensors.
    """
    gguf = _import_gguf()
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (strings or {}).items():
        writer.add_string(key, value)
    stored = {}
    for key, value in tensors.items():
        if isinstance(value, tuple):
            blocks, qtype = value
            try:
                kind = gguf.GGMLQuantizationType[qtype]
            except KeyError:
                raise QuantizedFileError(f"{key}: unknown GGUF quant type {qtype!r}") from None
            if blocks.dtype != torch.uint8 or blocks.ndim != 2:
                raise QuantizedFileError(f"{key}: packed {qtype} blocks must be a 2-D uint8 tensor, got "
                                         f"{blocks.dtype} {tuple(blocks.shape)}")
            writer.add_tensor(key, blocks.detach().cpu().contiguous().numpy(), raw_dtype=kind)
            stored[key] = qtype
            continue
        if value.dtype not in (torch.float32, torch.float16):
            raise QuantizedFileError(f"{key}: a plain GGUF tensor must be float32 or float16, got {value.dtype}")
        writer.add_tensor(key, value.detach().cpu().contiguous().numpy())
        stored[key] = "F32" if value.dtype == torch.float32 else "F16"
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored
