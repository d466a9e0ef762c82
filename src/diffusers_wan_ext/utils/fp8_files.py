"""ComfyUI / Kijai fp8 safetensors files (plain and scaled) read into :class:`QuantizedTensor` s and written back.

Two scaled-fp8 conventions exist; both are read as ComfyUI's ``comfy/utils.py`` ``convert_old_quants`` reads them:

* older: a ``<prefix>scaled_fp8`` marker tensor (its dtype is the fp8 type; float32 means ``float8_e4m3fn``), a
  per-layer ``<layer>.scale_weight`` (``weight = fp8 * scale_weight``, as Kijai's ``custom_linear.py`` applies it)
  and an optional ``<layer>.scale_input``;
* newer: ``<layer>.weight_scale`` / ``<layer>.input_scale`` with the layers listed in the safetensors metadata
  ``_quantization_metadata`` (JSON ``{"layers": {layer: {"format": "float8_e4m3fn"}}}``) or in per-layer
  ``<layer>.comfy_quant`` uint8 JSON tensors; ``comfy/quant_ops.py`` ``QUANT_ALGOS`` names the fp8 formats
  (``float8_e4m3fn`` / ``float8_e5m2``, parameters ``weight_scale`` / ``input_scale``).

An fp8 weight of a file marked scaled without its scale tensor is an error (ComfyUI would silently use 1.0), except
for embedding tables (``shared.weight`` ...) and convolutions, which ComfyUI's older scaled-fp8 ops never scale.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch

from .quantized_tensor import FP8_DTYPES, RAW, QuantizedFileError, QuantizedTensor, quantize_fp8

__all__ = ["SCALE_SUFFIXES", "comfy_fp8_tensors", "fp8_state_dict", "is_fp8_file"]

#: per-layer tensors that are not weights: ``(older, newer)`` names of the weight and activation scales
SCALE_SUFFIXES = {"scale_weight": "weight", "weight_scale": "weight", "scale_input": "input", "input_scale": "input"}
_MARKER = "scaled_fp8"
#: embedding tables: ComfyUI's older scaled-fp8 ops (comfy/ops.py ``scaled_fp8_ops``) scale only ``Linear`` layers and
#: cast embeddings and convolutions, so an fp8 table or conv weight without a scale is valid there (scale 1) and is
#: not an error here either (only 2-D weights other than these tables must carry ``scale_weight``)
_EMBEDDING_TABLES = ("shared.weight", "token_embd.weight", "token_embedding.weight", "embed_tokens.weight")
_FP8_NAMES = {v: k for k, v in FP8_DTYPES.items()}


def is_fp8_file(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bool:
    """Whether a safetensors state dict holds fp8 weights, scales, markers or Comfy quantization metadata."""
    return bool((metadata or {}).get("_quantization_metadata")) or any(
        v.dtype in _FP8_NAMES or k.rsplit(".", 1)[-1] in SCALE_SUFFIXES or k.rsplit(".", 1)[-1] in (_MARKER, "comfy_quant")
        for k, v in sd.items())


def _layer_formats(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, source: str) -> dict[str, str]:
    """``{layer: format}`` from ``_quantization_metadata`` and ``<layer>.comfy_quant`` tensors."""
    layers: dict[str, Any] = {}
    raw = (metadata or {}).get("_quantization_metadata")
    if raw:
        try:
            layers.update(json.loads(raw)["layers"])
        except (ValueError, KeyError, TypeError):
            raise QuantizedFileError(f"{source}: metadata _quantization_metadata is not JSON with a 'layers' "
                                     "object") from None
    for k, v in sd.items():
        if k.endswith(".comfy_quant"):
            try:
                layers[k[: -len(".comfy_quant")]] = json.loads(bytes(v.to(torch.uint8).tolist()).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise QuantizedFileError(f"{source}: {k} is not a JSON layer description") from None
    formats = {}
    for layer, conf in layers.items():
        fmt = conf.get("format") if isinstance(conf, dict) else conf
        if fmt not in FP8_DTYPES:
            raise QuantizedFileError(f"{source}: layer {layer}: quantization format {fmt!r} is not supported "
                                     f"(supported: {', '.join(FP8_DTYPES)})")
        formats[layer] = fmt
    return formats


def comfy_fp8_tensors(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                      source: str) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """Every weight of a (possibly fp8) safetensors state dict as a :class:`QuantizedTensor` with its scale, and a
    description: ``{"convention": "scale_weight" | "weight_scale" | None, "scaled": bool, "fp8_dtypes": [...],
    "input_scales": n}``.  Scale / marker / ``comfy_quant`` tensors are consumed, not returned."""
    formats = _layer_formats(sd, metadata, source)
    markers = [k for k in sd if k == _MARKER or k.endswith("." + _MARKER)]
    scales: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    convention = None
    for k, v in sd.items():
        layer, _, suffix = k.rpartition(".")
        if suffix in SCALE_SUFFIXES:
            (scales if SCALE_SUFFIXES[suffix] == "weight" else inputs)[layer + ".weight"] = v
            convention = convention or ("scale_weight" if suffix.startswith("scale_") else "weight_scale")
    skip = set(markers) | {k for k in sd if k.endswith(".comfy_quant") or k.rpartition(".")[2] in SCALE_SUFFIXES}
    orphans = sorted(s for s in scales if s not in sd)
    if orphans:
        raise QuantizedFileError(f"{source}: scale tensor for {orphans[0]} but the file has no such weight")
    marked = set(formats) | ({k.rpartition(".")[0] for k, v in sd.items() if v.dtype in _FP8_NAMES and v.ndim == 2
                              and not k.endswith(_EMBEDDING_TABLES)} if markers else set())
    out: dict[str, QuantizedTensor] = {}
    for k, v in sd.items():
        if k in skip:
            continue
        layer = k[: -len(".weight")] if k.endswith(".weight") else None
        if layer in formats and v.dtype != FP8_DTYPES[formats[layer]]:
            raise QuantizedFileError(f"{source}: {k} is {v.dtype} but the file lists layer {layer} as {formats[layer]}")
        if v.dtype in _FP8_NAMES:
            if layer in marked and k not in scales:
                wanted = "scale_weight" if markers else "weight_scale"
                raise QuantizedFileError(f"{source}: {k} is an fp8 weight of a scaled file but {layer}.{wanted} "
                                         "is missing")
            out[k] = QuantizedTensor(v, _FP8_NAMES[v.dtype], tuple(v.shape), scales.get(k), inputs.get(k))
        else:
            out[k] = QuantizedTensor(v, {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(
                v.dtype, RAW), tuple(v.shape))
    info = {"convention": convention, "scaled": bool(scales), "input_scales": len(inputs),
            "fp8_dtypes": sorted({q.qtype for q in out.values() if q.qtype in FP8_DTYPES})}
    return out, info


def _fp8_candidate(key: str, t: torch.Tensor) -> bool:
    """The weights ComfyUI / Kijai fp8 Wan files store in fp8: the 2-D linear weights of the blocks."""
    return key.endswith(".weight") and t.ndim == 2 and "blocks." in key and t.is_floating_point()


def fp8_state_dict(sd: Mapping[str, torch.Tensor], scaled: bool = True, convention: str = "scale_weight",
                   fp8_dtype: torch.dtype = torch.float8_e4m3fn, prefix: str = "",
                   other_dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An (already prefixed) original-layout state dict -> ``(tensors, safetensors metadata)`` of a Comfy fp8 file.

    ``convention="scale_weight"`` writes the older layout (``<prefix>scaled_fp8`` marker + ``.scale_weight``), which
    both ComfyUI (``convert_old_quants``) and Kijai's WanVideoWrapper read; ``"weight_scale"`` the newer one
    (``.weight_scale`` + ``_quantization_metadata``).  ``other_dtype`` casts the tensors kept unquantized.
    """
    if convention not in ("scale_weight", "weight_scale"):
        raise ValueError(f"convention must be 'scale_weight' or 'weight_scale', got {convention!r}")
    out: dict[str, torch.Tensor] = {}
    layers = {}
    for k, v in sd.items():
        if not _fp8_candidate(k, v):
            out[k] = v.to(other_dtype) if other_dtype is not None and v.is_floating_point() else v
            continue
        q, scale = quantize_fp8(v, fp8_dtype, scaled)
        out[k] = q
        if scale is not None:
            out[k[: -len("weight")] + convention] = scale
            layers[k[: -len(".weight")]] = {"format": _FP8_NAMES[fp8_dtype]}
    metadata = {}
    if scaled and convention == "scale_weight":
        out[prefix + _MARKER] = torch.empty(0, dtype=fp8_dtype)
    elif scaled:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return out, metadata
