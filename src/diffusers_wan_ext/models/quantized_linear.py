"""Linear layers whose weights stay quantized in memory: fp8 storage with a per-tensor scale, and GGUF blocks.

GGUF weights use Diffusers' own machinery (``diffusers.quantizers.gguf``: ``GGUFParameter`` holds the packed bytes,
``GGUFLinear`` dequantizes them per layer at compute), so a DiT loaded this way behaves like one from
``from_single_file(..., quantization_config=GGUFQuantizationConfig(...))``.  fp8 weights (ComfyUI / Kijai files,
plain or scaled) have no Diffusers counterpart that keeps the file's scale: :class:`Fp8Linear` stores the
``float8_e4m3fn`` / ``float8_e5m2`` weight and its float32 scale and computes with ``weight.to(dtype) * scale``,
or, when asked (:meth:`Fp8Linear.set_fp8_gemm`, ``optimize_transformer(fp8=True)``), with an fp8 GEMM
(``torch._scaled_mm`` on Ada / Hopper GPUs) that takes the file's weight scale as it is and a per-tensor or per-row
activation scale computed at each call (:func:`quantize_fp8_input`).
:func:`quantized_weight_bytes` counts what both occupy (for memory planning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FP8_GEMM_MODES", "Fp8Linear", "Fp8Storage", "fp8_scaled_linear", "is_gguf_parameter",
           "quantize_fp8_input", "quantized_weight_bytes", "select_fp8_gemm"]

#: ``Fp8Linear.fp8_gemm`` values: ``"upcast"`` (dequantize the weight, bf16 GEMM: any device), ``"tensorwise"``
#: (fp8 GEMM, one activation scale per call) and ``"rowwise"`` (fp8 GEMM, one activation scale per token row).
FP8_GEMM_MODES = ("upcast", "tensorwise", "rowwise")
#: Largest finite ``float8_e4m3fn`` value: the dynamic activation scale maps each amax onto it.
E4M3_MAX = 448.0


def select_fp8_gemm(requested: str, weight_dtype: torch.dtype, per_row_weight_scale: bool, in_features: int,
                    out_features: int, device_type: str, capability: tuple[int, int] | None,
                    compute_dtype: torch.dtype = torch.bfloat16) -> str:
    """The path an :class:`Fp8Linear` takes: ``requested`` (one of :data:`FP8_GEMM_MODES`) where an fp8 GEMM can
    run, else ``"upcast"``.

    An fp8 GEMM needs a CUDA device of compute capability 8.9 or newer (Ada, Hopper), an ``float8_e4m3fn`` weight
    (``float8_e5m2`` files stay on the upcast path), both dimensions divisible by 16 (``torch._scaled_mm``) and a
    bfloat16 computation (the output dtype of the row-wise kernel).
    A per-row weight scale (fused projections, per-channel files) needs per-row activation scales, so
    ``"tensorwise"`` becomes ``"rowwise"`` there.
    """
    if requested not in FP8_GEMM_MODES:
        raise ValueError(f"fp8_gemm: expected one of {', '.join(FP8_GEMM_MODES)}, got {requested!r}")
    if requested == "upcast" or device_type != "cuda" or capability is None or capability < (8, 9):
        return "upcast"
    if weight_dtype != torch.float8_e4m3fn or in_features % 16 or out_features % 16:
        return "upcast"
    if compute_dtype != torch.bfloat16:
        return "upcast"
    return "rowwise" if per_row_weight_scale else requested


def quantize_fp8_input(inputs: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``inputs`` (2-D) as ``float8_e4m3fn`` and its float32 scale (``inputs ~= q * scale``): one scale for the
    tensor (shape ``()``) or one per row (shape ``[rows, 1]``), each mapping the absolute maximum onto 448."""
    amax = inputs.abs().amax(dim=-1, keepdim=True) if rowwise else inputs.abs().amax()
    scale = amax.float().clamp(min=1e-12) / E4M3_MAX
    quantized = (inputs.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return quantized, scale


def fp8_scaled_linear(inputs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None, mode: str, out_dtype: torch.dtype) -> torch.Tensor:
    """``inputs @ (weight * weight_scale).T + bias`` as one fp8 GEMM (``torch._scaled_mm``): the activations are
    quantized per call (:func:`quantize_fp8_input`), the ``float8_e4m3fn`` weight is used as stored with its scale
    (a scalar, or one per output row). ``mode``: ``"tensorwise"`` or ``"rowwise"`` (see :func:`select_fp8_gemm`)."""
    rowwise = mode == "rowwise"
    flat = inputs.reshape(-1, inputs.shape[-1])
    quantized, input_scale = quantize_fp8_input(flat, rowwise)
    scale_b = weight_scale.float()
    if rowwise:
        scale_b = scale_b.reshape(1, -1).expand(1, weight.shape[0]).contiguous()
    # the bias goes into the GEMM epilogue for per-tensor scales; added after the row-wise kernel (a compiled
    # graph fuses the add into the next elementwise kernel)
    fused_bias = None if bias is None or rowwise else bias.to(out_dtype)
    out = torch._scaled_mm(quantized, weight.t(), scale_a=input_scale, scale_b=scale_b, bias=fused_bias,
                           out_dtype=out_dtype)
    if rowwise and bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*inputs.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Linear):
    """A ``Linear`` whose weight is stored in fp8 and upcast per call: ``y = x @ (weight.to(dtype) * scale).T + b``.

    Args:
        in_features / out_features / bias: as ``nn.Linear``.
        fp8_dtype: the storage dtype, ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        compute_dtype: dtype of the upcast weight; ``None`` computes in the input's dtype.
        device: where the (empty) parameters are created; ``"meta"`` while a loader assigns them.
        fp8_gemm: ``"upcast"`` (default: dequantize per call) or an fp8 GEMM mode, ``"tensorwise"`` / ``"rowwise"``
            activation scales (see :meth:`set_fp8_gemm`; layers and devices that cannot run one stay on upcast).

    Attributes:
        weight_scale: float32 scale (a scalar, or one per output row) of the stored weight; 1.0 for plain fp8 files.
        input_scale: the file's activation scale (``scale_input`` / ``input_scale``) or ``None``; kept with the
            weights, not used (the fp8 GEMM path computes the activation scale at each call instead: the files'
            static scales are often 1.0).

    ``.to(device)`` moves the weight in fp8; a dtype cast (``.to(torch.bfloat16)``) leaves the fp8 weight and the
    float32 scale as they are (only the bias is cast).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn, compute_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, fp8_gemm: str = "upcast") -> None:
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=fp8_dtype, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("input_scale", None)
        self.compute_dtype = compute_dtype
        self.fp8_gemm = "upcast"
        self.set_fp8_gemm(fp8_gemm)

    def set_fp8_gemm(self, mode: str) -> None:
        """Compute with an fp8 GEMM (``"tensorwise"`` / ``"rowwise"`` dynamic activation scales, the stored weight
        and its scale as they are) or by upcasting the weight (``"upcast"``). Where a GEMM cannot run (CPU, a GPU
        older than Ada, ``float8_e5m2`` weights, dimensions not divisible by 16) the layer upcasts
        (:func:`select_fp8_gemm`, decided per call from the input's device)."""
        if mode not in FP8_GEMM_MODES:
            raise ValueError(f"fp8_gemm: expected one of {', '.join(FP8_GEMM_MODES)}, got {mode!r}")
        self.fp8_gemm = mode

    def gemm_path(self, inputs: torch.Tensor) -> str:
        """The path :meth:`forward` takes for ``inputs``: ``"upcast"``, ``"tensorwise"`` or ``"rowwise"``."""
        if self.fp8_gemm == "upcast":
            return "upcast"
        capability = torch.cuda.get_device_capability(inputs.device) if inputs.is_cuda else None
        return select_fp8_gemm(self.fp8_gemm, self.weight.dtype, self.weight_scale.ndim > 0, self.in_features,
                               self.out_features, inputs.device.type, capability,
                               self.compute_dtype or inputs.dtype)

    @classmethod
    def concatenated(cls, layers: list["Fp8Linear"]) -> "Fp8Linear":
        """One layer computing ``layers`` side by side (fused q/k/v projections): weights stacked by rows as stored,
        each layer's scale repeated over its rows (a per-row scale), biases concatenated."""
        first = layers[0]
        if any(layer.weight.dtype != first.weight.dtype or layer.in_features != first.in_features
               or (layer.bias is None) != (first.bias is None) for layer in layers):
            raise ValueError("Fp8Linear.concatenated: the layers differ in storage dtype, input width or bias")
        weight = torch.cat([layer.weight.data for layer in layers])
        scale = torch.cat([layer.weight_scale.reshape(-1).expand(layer.out_features) for layer in layers])
        bias = torch.cat([layer.bias.data for layer in layers]) if first.bias is not None else None
        fused = cls.from_quantized(weight, scale, bias, compute_dtype=first.compute_dtype)
        fused.set_fp8_gemm(first.fp8_gemm)
        return fused

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                    fp8_gemm: str = "upcast") -> "Fp8Linear":
        """``linear`` quantized the way scaled-fp8 files are: one float32 scale for the weight (its absolute maximum
        mapped onto the fp8 dtype's largest value), the weight divided by it and rounded to ``fp8_dtype``; the bias
        kept in its dtype."""
        weight = linear.weight.detach()
        scale = weight.abs().amax().float().clamp(min=1e-12) / torch.finfo(fp8_dtype).max
        data = (weight.float() / scale).to(fp8_dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        layer = cls.from_quantized(data, scale, bias, compute_dtype=None)
        layer.set_fp8_gemm(fp8_gemm)
        return layer

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
        path = self.gemm_path(inputs)
        if path != "upcast":
            return fp8_scaled_linear(inputs.to(dtype), self.weight, self.weight_scale, self.bias, path, dtype)
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
        gemm = "" if self.fp8_gemm == "upcast" else f", fp8_gemm={self.fp8_gemm}"
        return f"{super().extra_repr()}, storage={str(self.weight.dtype).replace('torch.', '')}{gemm}"


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
