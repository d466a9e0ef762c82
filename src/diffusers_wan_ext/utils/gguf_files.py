"""GGUF single files (city96's ComfyUI-GGUF layout) read into :class:`QuantizedTensor` s and written back.

Reading follows ComfyUI-GGUF ``loader.py`` (``gguf_sd_loader``): every tensor through ``gguf.GGUFReader``; the
PyTorch shape is the GGUF dims reversed, or the ``comfy.gguf.orig_shape.<name>`` INT32 array when the file has one
(``tools/convert.py`` writes it for tensors it flattened to rows of 256; 5-D tensors that ``tools/fix_5d_tensors.py``
adds back as F32 carry their 5 dims directly).  Writing follows ``tools/convert.py`` (``ModelWan``): architecture
``wan``, 1-D / small (<= 1024 values) / ``.modulation`` tensors in F32, tensors of more than 4 dims in F32 at full
shape, a tensor whose rows do not fit the quant type's block falls back to F16.  The K-quant files (``Q6_K``,
``Q5_K_M``, ``Q4_K_M`` ...) follow what city96's patched ``llama-quantize`` (``tools/lcpp.patch``, architecture
``wan``) does with such an F16 file: see :data:`KQUANT_MIXES`.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .gguf_kquants import QK_K, TORCH_QUANT_TYPES, quantize_blocks
from .quantized_tensor import PLAIN_DTYPES, QuantizedFileError, QuantizedTensor

__all__ = ["GGUF_EXPORT_TYPES", "KQUANT_MIXES", "ORIG_SHAPE_KEY", "can_dequantize", "kquant_type", "read_gguf",
           "write_gguf", "write_gguf_stored"]

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
#: the GGUF types ``export-dit`` writes (``--format gguf-<name>``) and the file type recorded for each
#: (the types ``gguf.quants.quantize`` implements that ComfyUI-GGUF's dequant.py also reads)
GGUF_EXPORT_TYPES = {"q8_0": "Q8_0", "f16": "F16", "bf16": "BF16", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0",
                     "q5_1": "Q5_1", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q5_k_s": "Q5_K_S", "q5_k": "Q5_K",
                     "q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q4_k": "Q4_K", "q3_k_l": "Q3_K_L", "q3_k_m": "Q3_K_M",
                     "q3_k_s": "Q3_K_S", "q3_k": "Q3_K"}
#: K-quant file types: (the type of most quantized tensors, the one of the attention ``.v.weight`` s -- a tuple
#: for "the first n of them", and of ``.ffn.2.weight``), city96's ``img_tensor_get_type`` for each llama.cpp
#: ftype; ``Q6_K`` / ``Q5_K_S`` / ``Q3_K_S`` have no special rules, and ``Q4_K`` / ``Q5_K`` / ``Q3_K`` (every
#: quantized tensor one type) are written as those.  Every K-quant file keeps in F16 the 2-D tensors that patch
#: never quantizes (``modulation.``, ``patch_embedding.``, ``text_embedding.``, ``time_projection.``,
#: ``time_embedding.``, ``img_emb.``, ``head.``, and every tensor not 2-D) and those whose rows are not a
#: multiple of ``QK_K = 256`` (its fallback); 1-D / small / ``.modulation`` / 5-D tensors stay F32 as
#: ``tools/convert.py`` writes them.
KQUANT_MIXES = {"Q6_K": ("Q6_K", "Q6_K", "Q6_K"), "Q5_K_M": ("Q5_K", "Q6_K", "Q6_K"),
                "Q5_K_S": ("Q5_K", "Q5_K", "Q5_K"), "Q5_K": ("Q5_K", "Q5_K", "Q5_K"),
                "Q4_K_M": ("Q4_K", "Q6_K", "Q6_K"), "Q4_K_S": ("Q4_K", ("Q5_K", 4), "Q5_K"),
                "Q4_K": ("Q4_K", "Q4_K", "Q4_K"), "Q3_K_L": ("Q3_K", "Q5_K", "Q5_K"),
                "Q3_K_M": ("Q3_K", ("Q5_K", 2, "Q4_K"), "Q4_K"), "Q3_K_S": ("Q3_K", "Q3_K", "Q3_K"),
                "Q3_K": ("Q3_K", "Q3_K", "Q3_K")}
_KQUANT_KEEP = ("modulation.", "patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.",
                "img_emb.", "head.")  # lcpp.patch: LLM_ARCH_WAN tensors left unquantized
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
                if int(dims[0]) % block:
                    raise QuantizedFileError(f"{path}: tensor {key}: rows of {int(dims[0])} values do not fit "
                                             f"{qtype.name} blocks of {block}")
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


def _kquant_candidate(key: str, t: torch.Tensor) -> bool:
    """Whether city96's patch hands the tensor to its type rules (2-D, not F32 in the source, not kept)."""
    return (t.ndim == 2 and t.numel() > _SMALL and not any(s in key for s in _KEEP_F32)
            and not any(s in key for s in _KQUANT_KEEP))


def kquant_type(key: str, t: torch.Tensor, mix: str, v_seen: int) -> str:
    """The GGUF type of tensor ``key`` in a :data:`KQUANT_MIXES` file; ``v_seen``: how many ``.v.weight`` tensors
    went through the rules before this one (city96's ``i_attention_wv``, for Q4_K_S / Q3_K_M)."""
    if t.ndim <= 1 or t.numel() <= _SMALL or any(s in key for s in _KEEP_F32) or t.ndim > 4:
        return "F32"
    if not _kquant_candidate(key, t):
        return "F16"
    base, v_type, ffn_down = KQUANT_MIXES[mix]
    if ".v.weight" in key:
        if isinstance(v_type, tuple):
            v_type = v_type[0] if v_seen < v_type[1] else (v_type[2] if len(v_type) > 2 else base)
        base = v_type
    elif ".ffn.2.weight" in key:
        base = ffn_down
    return base if t.shape[-1] % QK_K == 0 else "F16"


def _quantize(gguf, values: torch.Tensor, kind: str) -> np.ndarray:
    """Q8_0 and the K-quants with torch on the tensor's device (Q8_0 byte-identical to ``gguf.quants``), the
    other types with ``gguf.quants.quantize``."""
    if kind in TORCH_QUANT_TYPES:
        return quantize_blocks(values, kind).cpu().numpy()
    return gguf.quants.quantize(values.cpu().numpy(), gguf.GGMLQuantizationType[kind])


def _rows_of_256(t: torch.Tensor) -> bool:
    """tools/convert.py ``shape_fix`` rule: flatten to rows of 256 (recording ``comfy.gguf.orig_shape``)."""
    return t.ndim > 1 and t.numel() >= 512 and t.numel() % 256 == 0 and t.shape[-1] % 256 != 0


def write_gguf(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], qtype: str = "Q8_0",
               arch: str = "wan", shape_fix: bool = False) -> dict[str, str]:
    """Write an original-layout state dict as a GGUF file ComfyUI-GGUF loads; returns ``{key: stored type}``.

    ``qtype``: a GGUF type ``gguf.quants.quantize`` implements (``Q8_0``, ``Q4_0``, ``Q5_0``, ``F16``, ``BF16`` ...)
    or a K-quant file type of :data:`KQUANT_MIXES` (``Q6_K``, ``Q5_K_M``, ``Q4_K_M``, ``Q4_K`` ...; quantized
    with torch on the tensors' device, :func:`~diffusers_wan_ext.utils.gguf_kquants.quantize_blocks`).
    ``shape_fix``: flatten tensors whose last dim does not fit a block into rows of 256 and store their shape in
    ``comfy.gguf.orig_shape.<key>`` (tools/convert.py does this for its UNet architectures, not for ``wan``).
    """
    gguf = _import_gguf()
    mix = qtype if qtype in KQUANT_MIXES else None
    if mix is None and qtype not in gguf.GGMLQuantizationType.__members__:
        raise QuantizedFileError(f"unknown GGUF quant type {qtype!r}")
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    file_type = {"F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "F32": "ALL_F32", "Q3_K": "MOSTLY_Q3_K_S",
                 "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S"}.get(qtype, f"MOSTLY_{qtype}")
    if hasattr(gguf.LlamaFileType, file_type):
        writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    stored, v_seen = {}, 0
    for key, t in state_dict.items():
        values = t.detach().to(torch.float32).contiguous()
        if shape_fix and qtype not in PLAIN_DTYPES and _rows_of_256(values) and t.numel() > _SMALL:
            writer.add_array(ORIG_SHAPE_KEY + key, [int(d) for d in t.shape])
            values = values.reshape(-1, 256)
        kind = _choose_type(gguf, key, values, qtype) if mix is None else kquant_type(key, values, mix, v_seen)
        v_seen += mix is not None and ".v.weight" in key and _kquant_candidate(key, values)
        writer.add_tensor(key, _quantize(gguf, values, kind), raw_dtype=gguf.GGMLQuantizationType[kind])
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
