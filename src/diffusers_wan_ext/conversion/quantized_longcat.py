"""A LongCat-Video DiT single file (GGUF, fp8, scaled fp8) loaded with its Linear weights kept quantized.

The LongCat key map (:mod:`~diffusers_wan_ext.conversion.longcat`) renames modules and splits the fused projections
(``attn.qkv`` -> ``to_q`` / ``to_k`` / ``to_v``, ``cross_attn.kv_linear`` -> ``to_k`` / ``to_v``) into equal chunks
of output rows.  A GGUF block and an fp8 value each belong to one row, so the split is done on the stored data: the
packed blocks are cut by rows (nothing dequantized), an fp8 weight's rows keep their per-tensor scale (a per-row
scale is cut with them).  The kept Linears become Diffusers ``GGUFLinear`` / this package's ``Fp8Linear`` layers, as
:func:`~diffusers_wan_ext.conversion.quantized_dit.load_quantized_dit` keeps the Wan DiTs; the model's
``_keep_in_fp32_modules`` and everything else are dequantized.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from accelerate import init_empty_weights
from torch import nn

from ..models.quantized_linear import Fp8Linear, Fp8Storage
from ..models.transformer_longcat import LongCatVideoTransformer3DModel
from ..utils.io import ConversionError, strip_known_prefixes
from ..utils.quantized_tensor import FP8_DTYPES, QuantizedTensor
from .longcat import convert_longcat_state_dict, longcat_config_from_state_dict, longcat_target_modules
from .quantized_layers import assign_quantized_state, gguf_packed, keeps_fp32

__all__ = ["quantized_longcat_from_tensors"]


def _row_chunks(q: QuantizedTensor, parts: int, key: str) -> list[torch.Tensor | QuantizedTensor]:
    """``q`` cut into ``parts`` equal chunks of output rows, stored data kept (GGUF blocks / fp8 values)."""
    if q.shape[0] % parts:
        raise ConversionError(f"{key}: {q.shape[0]} outputs cannot be split into {parts} projections")
    if parts == 1:
        return [q]
    rows = q.shape[0] // parts  # each chunk its own storage (a view would be saved with the whole tensor)
    if q.qtype in FP8_DTYPES:
        scale = q.scale
        scales = [scale] * parts if scale is None or scale.numel() == 1 else list(scale.reshape(-1).chunk(parts))
        return [QuantizedTensor(d.clone(), q.qtype, (rows, *q.shape[1:]), s, q.input_scale)
                for d, s in zip(q.data.reshape(q.shape).chunk(parts), scales)]
    packed = gguf_packed(q)
    if packed is not None:
        return [QuantizedTensor(d.clone(), q.qtype, (rows, *q.shape[1:])) for d in packed.chunk(parts)]
    return [t.clone() for t in q.dequantize(torch.float32).chunk(parts)]


def _converted(tensors: Mapping[str, QuantizedTensor]) -> dict[str, torch.Tensor | QuantizedTensor]:
    """Diffusers names; a fused projection cut into its parts (stored data kept where it can be)."""
    out: dict[str, torch.Tensor | QuantizedTensor] = {}
    for key, q in tensors.items():
        module, _, param = key.rpartition(".")
        targets = longcat_target_modules(module)
        if targets is None:  # unreachable after convert_longcat_state_dict's check; kept for a clear message
            raise ConversionError(f"{key}: not a LongCat-Video DiT key")
        for target, chunk in zip(targets, _row_chunks(q, len(targets), key)):
            out[f"{target}.{param}"] = chunk
    return out


def _fp8_layer(q: QuantizedTensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> Fp8Linear:
    layer = Fp8Linear.from_quantized(q.data.reshape(q.shape), q.scale, None, compute_dtype=compute_dtype,
                                     input_scale=q.input_scale)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def quantized_longcat_from_tensors(tensors: Mapping[str, QuantizedTensor],
                                   original_config: Mapping[str, Any] | None = None,
                                   torch_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """:class:`~diffusers_wan_ext.LongCatVideoTransformer3DModel` from a single file's stored tensors (original
    LongCat names, any wrapper prefix), GGUF / fp8 Linear weights kept; ``torch_dtype`` is the compute dtype and the
    dtype of everything else (the model's ``_keep_in_fp32_modules`` float32)."""
    tensors = strip_known_prefixes(dict(tensors), "blocks.")
    shapes = {k: torch.empty(q.shape, device="meta") for k, q in tensors.items()}
    convert_longcat_state_dict(shapes)  # every key checked (the error names the unknown ones)
    config = longcat_config_from_state_dict(shapes, original_config)
    with init_empty_weights():
        model = LongCatVideoTransformer3DModel(**config)
    keep = model._keep_in_fp32_modules
    converted = _converted(tensors)
    expected = dict(model.state_dict())
    for key, value in converted.items():
        if key not in expected or tuple(expected[key].shape) != tuple(value.shape):
            raise ConversionError(f"{key}: shape {tuple(value.shape)} does not fit the LongCat-Video DiT "
                                  f"{tuple(expected[key].shape) if key in expected else '(no such tensor)'}")
    gguf_weights, plain, fp8 = {}, {}, {}
    for key, value in converted.items():
        module_name, _, leaf = key.rpartition(".")
        linear = leaf == "weight" and isinstance(model.get_submodule(module_name), nn.Linear)
        if isinstance(value, QuantizedTensor) and linear and value.is_quantized and not keeps_fp32(key, keep):
            if value.qtype in FP8_DTYPES:
                fp8[module_name] = value
                continue
            if value.data.dtype == torch.uint8 and value.data.ndim == 2:
                gguf_weights[key] = (value.data, value.qtype)
                continue
        if isinstance(value, QuantizedTensor):
            value = value.dequantize(torch.float32) if value.is_quantized or value.data.is_floating_point() \
                else value.dequantize()
        dtype = torch.float32 if keeps_fp32(key, keep) and torch_dtype != torch.float32 else torch_dtype
        plain[key] = value.to(dtype) if value.is_floating_point() else value
    for module_name, q in fp8.items():
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                _fp8_layer(q, plain.pop(f"{module_name}.bias", None), torch_dtype))
    if fp8:
        model.is_quantized = True
        model.hf_quantizer = Fp8Storage()
    return assign_quantized_state(model, plain, gguf_weights, torch_dtype, keep,
                                  "LongCatVideoTransformer3DModel").eval()
