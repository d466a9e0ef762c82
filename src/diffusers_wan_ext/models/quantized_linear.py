"""Linear layers whose weights stay quantized in memory: fp8 storage with a per-tensor scale, and GGUF blocks.

GGUF weights use Diffusers' own machinery (``diffusers.quantizers.gguf``: ``GGUFParameter`` holds the packed bytes,
``GGUFLinear`` dequantizes them per layer at compute), so a DiT loaded this way behaves like one from
``from_single_file(..., quantization_config=GGUFQuantizationConfig(...))``.  fp8 weights (ComfyUI / Kijai files,
plain or scaled) have no Diffusers counterpart that keeps the file's scale: :class:`Fp8Linear` stores the
``float8_e4m3fn`` / ``float8_e5m2`` weight and its float32 scale and computes with ``weight.to(dtype) * scale``.
:func:`quantized_weight_bytes` counts what both occupy (for memory planning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Fp8Linear", "Fp8Storage", "is_gguf_parameter", "quantized_weight_bytes"]


class Fp8Linear(nn.Linear):
    """A ``Linear`` whose weight is stored in fp8 and upcast per call: ``y = x @ (weight.to(dtype) * scale).T + b``.

    Args:
        in_features / out_features / bias: as ``nn.Linear``.
        fp8_dtype: the storage dtype, ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        compute_dtype: dtype of the upcast weight; ``None`` computes in the input's dtype.
        device: where the (empty) parameters are created; ``"meta"`` while a loader assigns them.

    Attributes:
        weight_scale: float32 scale (a scalar, or one per output row) of the stored weight; 1.0 for plain fp8 files.
        input_scale: the file's activation scale (``scale_input`` / ``input_scale``) or ``None``; kept for fp8 GEMMs,
            not used here.

    ``.to(device)`` moves the weight in fp8; a dtype cast (``.to(torch.bfloat16)``) leaves the fp8 weight and the
    float32 scale as they are (only the bias is cast).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn, compute_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=fp8_dtype, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("input_scale", None)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_quantized(cls, data: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype | None = None,
                       input_scale: torch.Tensor | None = None) -> "Fp8Linear":
        """A layer holding ``data`` (fp8, ``[out, in]``) and its scale (``None``: 1.0) as they are."""
        out_features, in_features = data.shape
        layer = cls(in_features, out_features, bias=bias is not None, fp8_dtype=data.dtype,
                    compute_dtype=compute_dtype, device="meta")
        layer.weight = nn.Parameter(data, requires_grad=False)
        scale = torch.ones(()) if scale is None else scale.reshape(-1) if scale.numel() > 1 else scale.reshape(())
        layer.weight_scale = scale.to(device=data.device, dtype=torch.float32)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        if input_scale is not None:
            layer.input_scale = input_scale.to(device=data.device, dtype=torch.float32)
        return layer

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``: ``weight.to(dtype) * scale`` (a per-row scale broadcast over the rows)."""
        scale = self.weight_scale.to(dtype)
        if scale.ndim:
            scale = scale.reshape(-1, 1)
        return self.weight.to(dtype) * scale

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or inputs.dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(inputs.to(dtype), self.dequantized_weight(dtype), bias)

    def _apply(self, fn, recurse: bool = True):
        storage, scale_dtype = self.weight.dtype, self.weight_scale.dtype
        super()._apply(fn, recurse)
        if self.weight.dtype != storage:  # a dtype cast: fp8 values are exact in fp16 / bf16 / fp32, cast back
            self.weight.data = self.weight.data.to(storage)
        if self.weight_scale.dtype != scale_dtype:
            self.weight_scale = self.weight_scale.to(scale_dtype)
        if self.input_scale is not None and self.input_scale.dtype != torch.float32:
            self.input_scale = self.input_scale.to(torch.float32)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, storage={str(self.weight.dtype).replace('torch.', '')}"


class Fp8StorageConfig:
    """What :class:`Fp8Storage` reports as ``quantization_config`` (Diffusers reads ``quant_method``)."""

    quant_method = "fp8 (single-file storage, Fp8Linear)"


class Fp8Storage:
    """Set as ``model.hf_quantizer`` of a model with :class:`Fp8Linear` layers, so Diffusers treats it as it treats a
    GGUF model: ``save_pretrained`` is refused (Diffusers could not load fp8 weights with their scales back: export
    with ``diffusers-wan export-dit --format comfy-fp8-scaled`` instead), ``.to(dtype)`` is refused, and
    ``model.dequantize()`` swaps every :class:`Fp8Linear` for a plain ``nn.Linear``."""

    is_serializable = False

    def __init__(self) -> None:
        self.quantization_config = Fp8StorageConfig()

    def dequantize(self, model: nn.Module) -> nn.Module:
        """Replace each :class:`Fp8Linear` by an ``nn.Linear`` holding its dequantized weight (compute dtype)."""
        for name, module in list(model.named_modules()):
            if not isinstance(module, Fp8Linear):
                continue
            dtype = module.compute_dtype or (module.bias.dtype if module.bias is not None else torch.float32)
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(module.dequantized_weight(dtype), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
        del model.hf_quantizer
        model.is_quantized = False
        return model


def is_gguf_parameter(tensor: torch.Tensor) -> bool:
    """``True`` for Diffusers' ``GGUFParameter`` (packed GGUF blocks with a ``quant_type``)."""
    return hasattr(tensor, "quant_type") and tensor.dtype == torch.uint8


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes the quantized weights of ``model`` occupy: GGUF packed blocks (``GGUFParameter``) and the fp8 weights
    and scales of :class:`Fp8Linear` layers (0 for a model without quantized weights).

    Example:
        >>> quantized_weight_bytes(load_quantized_dit("wan2.1-t2v-14b-Q4_K_M.gguf"))  # doctest: +SKIP
    """
    total = 0
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            total += module.weight.numel() * module.weight.element_size()
            total += module.weight_scale.numel() * module.weight_scale.element_size()
            continue
        for param in module.parameters(recurse=False):
            if is_gguf_parameter(param):
                total += param.numel() * param.element_size()
    return total
