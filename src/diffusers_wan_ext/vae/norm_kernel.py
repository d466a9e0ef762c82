"""Fused channel RMS norm (+ SiLU) for the Wan VAE, as one Triton kernel over strided 4D/5D tensors.

The Wan VAE normalises every pixel over its channels (``WanRMS_norm``)::

    y = x / max(||x||_2 over C, 1e-12) * sqrt(C) * gamma (+ bias)        # then SiLU in the residual blocks / head

Eager PyTorch runs this as a norm reduction, an fp32 cast, three or four elementwise passes and a cast back;
:func:`rms_norm_act` reads ``x`` once and writes the result once. It reads any strides (channels-last or contiguous
NCDHW) and writes into any strided output -- in the fast decode that output is the "new frames" part of a causal
convolution's input buffer (see :mod:`.fast_decode`), so no separate copy is needed.

Numerics: the norm, the scale and the SiLU are computed in fp32 and rounded once to the output dtype (stock rounds
after the normalisation and again after the SiLU, so bf16 results differ by about one bf16 ulp; fp32 is the same up
to float rounding). :func:`rms_norm_act_reference` is the same math in PyTorch, used off CUDA and in tests.

There is no ``torch.compile`` here (the previous compiled fusion hit Dynamo's recompile limit on the VAE's many
channel counts and layouts); the kernel is specialised by Triton only on the channel block size and the dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import tl, triton, triton_available, uses_triton

__all__ = ["rms_norm_act", "rms_norm_act_reference", "triton_available", "uses_triton", "wan_norm_weight"]

EPS = 1e-12  # F.normalize's default, as WanRMS_norm uses it


def _as_5d(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 4:
        return t.unsqueeze(2)
    if t.ndim != 5:
        raise ValueError(f"rms_norm_act expects a (B, C, H, W) or (B, C, T, H, W) tensor, got {tuple(t.shape)}")
    return t


def rms_norm_act_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                           silu: bool = True, eps: float = EPS, out: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch version of :func:`rms_norm_act` (same arguments, same fp32 math)."""
    shape = (-1,) + (1,) * (x.ndim - 2)
    y = F.normalize(x.float(), dim=1, eps=eps) * weight.float().view(shape)
    if bias is not None:
        y = y + bias.float().view(shape)
    if silu:
        y = F.silu(y)
    if out is None:
        return y.to(x.dtype)
    return out.copy_(y)


if triton is not None:

    # sizes change with every chunk and level: not specialised (one compile per layout); the strides are, so that
    # channels-last rows (channel stride 1, pixel stride a multiple of 16) load as vectors
    @triton.jit(do_not_specialize=["n_pix", "T", "H", "W"])
    def _rms_norm_act_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n_pix, C, T, H, W,
                             xs_b, xs_c, xs_t, xs_h, xs_w, os_b, os_c, os_t, os_h, os_w, eps,
                             HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_P: tl.constexpr,
                             BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        pix = (pid * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        ch = tl.arange(0, BLOCK_C)
        pmask = pix < n_pix
        cmask = ch < C
        mask = pmask[:, None] & cmask[None, :]
        # pixel index -> (b, t, h, w); channels are the reduced axis
        w_i = pix % W
        rest = pix // W
        h_i = rest % H
        rest = rest // H
        t_i = rest % T
        b_i = rest // T
        ch64 = ch.to(tl.int64)
        x_off = (b_i * xs_b + t_i * xs_t + h_i * xs_h + w_i * xs_w)[:, None] + (ch64 * xs_c)[None, :]
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        denom = tl.maximum(norm, eps)
        g = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
        y = x / denom[:, None] * g[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        o_off = (b_i * os_b + t_i * os_t + h_i * os_h + w_i * os_w)[:, None] + (ch64 * os_c)[None, :]
        tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool, eps: float,
            out: torch.Tensor) -> None:
    x5, o5 = _as_5d(x), _as_5d(out)
    B, C, T, H, W = x5.shape
    n_pix = B * T * H * W
    if n_pix == 0:
        return
    block_c = triton.next_power_of_2(C)
    block_p = max(1, min(256, 8192 // block_c))
    warps = 8 if block_c * block_p >= 8192 else 4
    weight = weight.float().contiguous()
    b = weight if bias is None else bias.float().contiguous()
    grid = (triton.cdiv(n_pix, block_p),)
    _rms_norm_act_kernel[grid](x5, weight, b, o5, n_pix, C, T, H, W, *x5.stride(), *o5.stride(), float(eps),
                               HAS_BIAS=bias is not None, SILU=bool(silu), BLOCK_P=block_p, BLOCK_C=block_c,
                               num_warps=warps)


def rms_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, silu: bool = True,
                 eps: float = EPS, out: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x / max(||x||_2 over dim 1, eps) * weight (+ bias))`` computed in fp32, rounded once.

    Args:
        x: (B, C, H, W) or (B, C, T, H, W), any strides, fp32 / bf16 / fp16.
        weight: (C,) per-channel factor applied after the normalisation; for ``WanRMS_norm`` this is
            ``sqrt(C) * gamma`` (see :func:`wan_norm_weight`).
        bias: optional (C,) added after the factor.
        silu: apply SiLU to the result.
        eps: lower bound of the norm (``F.normalize``'s).
        out: optional output of ``x``'s shape (any strides, e.g. a slice of a larger buffer; any float dtype);
            default a new tensor like ``x`` (same dtype and layout).

    Returns ``out`` (or the new tensor). Runs the Triton kernel on CUDA tensors (or under ``TRITON_INTERPRET=1``),
    otherwise :func:`rms_norm_act_reference`.
    """
    if weight.numel() != x.shape[1] or (bias is not None and bias.numel() != x.shape[1]):
        raise ValueError(f"weight / bias must have {x.shape[1]} elements (the channels of x {tuple(x.shape)})")
    if out is not None and out.shape != x.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    if x.device.type == "meta":  # shape-only runs (memory estimates): the kernel allocates nothing but ``out``
        return torch.empty_like(x) if out is None else out
    if not uses_triton(x):
        return rms_norm_act_reference(x, weight, bias, silu=silu, eps=eps, out=out)
    if out is None:
        out = torch.empty_like(x)
    _launch(x, weight.reshape(-1), None if bias is None else bias.reshape(-1), silu, eps, out)
    return out


def wan_norm_weight(norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sqrt(C) * gamma, bias or None)`` of a Diffusers ``WanRMS_norm``, flattened, in fp32."""
    weight = norm.gamma.detach().float().reshape(-1) * float(norm.scale)
    bias = norm.bias
    if isinstance(bias, torch.Tensor):
        return weight, bias.detach().float().reshape(-1)
    if float(bias) != 0.0:
        return weight, torch.full_like(weight, float(bias))
    return weight, None
