"""Quantized weights as single-file checkpoints store them (GGUF blocks, fp8 with or without a scale).

A :class:`QuantizedTensor` keeps the raw storage of one tensor, its quantization type and its logical shape, so a
loader can keep the weights quantized (a later runtime step) or :meth:`QuantizedTensor.dequantize` them.  The file
readers are :mod:`diffusers_wan_ext.utils.gguf_files` and :mod:`diffusers_wan_ext.utils.fp8_files`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FP8_DTYPES", "PLAIN_DTYPES", "RAW", "QuantizedFileError", "QuantizedTensor", "quantize_fp8"]

#: fp8 storage dtypes, by the names ComfyUI's ``QUANT_ALGOS`` (comfy/quant_ops.py) gives them.
FP8_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
#: unquantized dtypes, by the names used in :attr:`QuantizedTensor.qtype`.
PLAIN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

#: :attr:`QuantizedTensor.qtype` of a non-floating tensor kept as stored (token ids, a tokenizer blob ...)
RAW = "RAW"


class QuantizedFileError(ValueError):
    """A single-file checkpoint that cannot be read; the message is one line naming the file and the key."""


@dataclass
class QuantizedTensor:
    """One tensor of a single-file checkpoint in its stored form.

    Attributes:
        data: the stored data -- GGUF: the raw blocks (``uint8``) or the plain values (F32 / F16 / BF16); fp8: the
            ``float8_e4m3fn`` / ``float8_e5m2`` tensor; anything else: the tensor itself.
        qtype: ``"Q8_0"``, ``"Q4_K"`` ... (GGUF type names), ``"F32"`` / ``"F16"`` / ``"BF16"``, or
            ``"float8_e4m3fn"`` / ``"float8_e5m2"``; :attr:`scale` set means scaled fp8.
        shape: the logical (PyTorch) shape of the weight.
        scale: the fp8 weight scale (``scale_weight`` / ``weight_scale``): ``weight = data * scale``.
        input_scale: the activation scale a scaled-fp8 file may carry (``scale_input`` / ``input_scale``), or ``None``.
    """

    data: torch.Tensor
    qtype: str
    shape: tuple[int, ...]
    scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None

    @property
    def is_quantized(self) -> bool:
        """``True`` unless the tensor is stored as plain F32 / F16 / BF16 values."""
        return self.qtype not in PLAIN_DTYPES and self.qtype != RAW or self.scale is not None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in ``dtype`` (GGUF blocks through ``gguf.quants.dequantize``; fp8 times its scale in float32)."""
        if self.qtype in FP8_DTYPES:
            out = self.data.to(torch.float32)
            if self.scale is not None:
                scale = self.scale.to(torch.float32)
                out = out * (scale.reshape(-1, *([1] * (out.ndim - 1))) if scale.numel() > 1 else scale.reshape(()))
            return out.reshape(self.shape).to(dtype)
        if self.qtype == RAW:
            return self.data.reshape(self.shape)
        if self.qtype in PLAIN_DTYPES or self.data.dtype != torch.uint8:
            return self.data.reshape(self.shape).to(dtype)
        import gguf  # optional dependency (the `gguf` extra)

        values = gguf.quants.dequantize(self.data.numpy(), gguf.GGMLQuantizationType[self.qtype])
        return torch.from_numpy(values).reshape(self.shape).to(dtype)


def quantize_fp8(weight: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                 scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(fp8 weight, float32 scalar scale or None)``: ComfyUI's per-tensor rule (comfy/quant_ops.py
    ``TensorCoreFP8Layout.quantize``): ``scale = amax(|w|) / finfo(fp8).max``, stored ``w / scale`` (clamped to the
    fp8 range); unscaled: a plain cast."""
    w = weight.detach().to(torch.float32)
    if not scaled:
        return w.to(fp8_dtype), None
    fmax = torch.finfo(fp8_dtype).max
    amax = w.abs().max()
    scale = (amax / fmax if float(amax) > 0 else torch.tensor(1.0)).to(torch.float32).reshape(())
    q = (w / scale).clamp(-fmax, fmax).to(fp8_dtype)
    return q, scale
