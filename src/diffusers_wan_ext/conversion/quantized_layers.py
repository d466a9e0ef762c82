"""Small helpers the kept-quantized loaders share (DiT, umT5, torchao folders): which stored weights stay packed."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..utils.io import ConversionError
from ..utils.quantized_tensor import QuantizedTensor

__all__ = ["attach_gguf", "assign_quantized_state", "gguf_packed", "keeps_fp32"]


def keeps_fp32(name: str, keep_in_fp32: list[str] | None) -> bool:
    """Whether ``name`` lies under one of the model's ``_keep_in_fp32_modules`` (a module name among its parts)."""
    return bool(keep_in_fp32) and bool(set(keep_in_fp32).intersection(name.split(".")))


def gguf_packed(q: QuantizedTensor) -> torch.Tensor | None:
    """The ``[out, bytes]`` GGUF blocks of a 2-D weight Diffusers can dequantize in torch, else ``None``."""
    import gguf  # optional dependency (the `gguf` extra)
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    if q.qtype not in gguf.GGMLQuantizationType.__members__:
        return None
    qtype = gguf.GGMLQuantizationType[q.qtype]
    if q.data.dtype != torch.uint8 or len(q.shape) != 2 or qtype not in SUPPORTED_GGUF_QUANT_TYPES:
        return None
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if q.shape[1] % block:
        return None
    return q.data.reshape(q.shape[0], q.shape[1] // block * size)


def attach_gguf(model: nn.Module, gguf_weights: Mapping[str, tuple[torch.Tensor, str]], compute_dtype: torch.dtype,
                keep_in_fp32: list[str] | None) -> None:
    """Diffusers' GGUF quantizer swaps the model's Linears named in ``gguf_weights`` (``{weight key: (packed
    blocks, type name)}``) for ``GGUFLinear`` layers holding those blocks; the model then carries the quantizer (as a
    model from ``from_single_file(..., quantization_config=GGUFQuantizationConfig(...))`` does)."""
    import gguf  # optional dependency (the `gguf` extra)
    from diffusers import GGUFQuantizationConfig
    from diffusers.quantizers.gguf import GGUFQuantizer
    from diffusers.quantizers.gguf.utils import GGUFParameter

    params = {key: GGUFParameter(packed, quant_type=gguf.GGMLQuantizationType[qtype])
              for key, (packed, qtype) in gguf_weights.items()}
    quantizer = GGUFQuantizer(GGUFQuantizationConfig(compute_dtype=compute_dtype))
    quantizer.preprocess_model(model, device_map=None, keep_in_fp32_modules=list(keep_in_fp32 or []),
                               state_dict=params)
    for key, param in params.items():
        module_name, _, leaf = key.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = param
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer


def assign_quantized_state(model: nn.Module, plain: dict[str, torch.Tensor],
                           gguf_weights: Mapping[str, tuple[torch.Tensor, str]], compute_dtype: torch.dtype,
                           keep_in_fp32: list[str] | None, owner: str) -> nn.Module:
    """Attach the packed GGUF weights (if any), assign the ``plain`` tensors to the meta-initialized ``model`` and
    refuse a model left with tensors no file gave (one line naming ``owner`` and the first five); returns the model
    frozen (``requires_grad_(False)``)."""
    if gguf_weights:
        attach_gguf(model, gguf_weights, compute_dtype, keep_in_fp32)
    model.load_state_dict(plain, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ConversionError(f"{owner}: no weights for {', '.join(left[:5])}")
    return model.requires_grad_(False)
