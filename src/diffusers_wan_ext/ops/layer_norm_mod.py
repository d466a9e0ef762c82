"""Residual add + LayerNorm + adaLN modulation of a Wan block, as one Triton kernel.

A Wan transformer block normalises its residual stream three times, each time right after adding a branch output::

    y1 = LN(x) * (1 + scale_msa) + shift_msa                          # before self-attention
    x  = x + attn * gate_msa;   y2 = LN_affine(x)                     # after self-attention (norm2, cross_attn_norm)
    x  = x + cross;             y3 = LN(x) * (1 + c_scale) + c_shift  # after cross-attention

in fp32 (``FP32LayerNorm``), rounding ``x`` and ``y`` once to the activation dtype. :func:`ln_modulate` does one of
these steps in one launch: it reads each row once (the row is covered by up to three power-of-two column groups,
5120 = 4096 + 1024, so no lanes are masked), keeps it in registers for the two-pass mean/variance, and writes the
new residual and the normalised row. The modulation vectors may be per sample (B, 1, C) or per token (B, N, C)
(Wan2.2 TI2V), with any strides along the first two dimensions.

It is a ``torch.library`` custom op without autograd (inference only). :func:`ln_modulate_reference` is the stock
expression, used off CUDA and in tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import interpreting as _interpreting
from ._triton import pow2_groups, tl, triton, uses_triton

__all__ = ["ln_modulate", "ln_modulate_reference"]


def ln_modulate_reference(x, residual, gate, scale, shift, weight, bias, eps):
    """The stock expression; returns ``(new_x, y)`` with a residual, else ``y``."""
    if residual is not None:
        x = (x.float() + residual * gate).type_as(x) if gate is not None else x + residual
    y = F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1 + scale) + shift
    y = y.type_as(x)
    return (x, y) if residual is not None else y


_CONFIGS = [(rows, warps) for rows in (1, 2, 4) for warps in (4, 8, 16)]


if triton is not None:

    @triton.jit
    def _cols(rows, n_rows, C0: tl.constexpr, CW: tl.constexpr):
        cols = C0 + tl.arange(0, CW)
        mask = (rows < n_rows)[:, None] & (cols < C0 + CW)[None, :]
        return cols, mask

    @triton.jit
    def _load_chunk(x_ptr, r_ptr, g_ptr, rows, n_rows, row_off, g_off, C, C0: tl.constexpr, CW: tl.constexpr,
                    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr):
        """The chunk's (possibly residual-updated) values, rounded to the activation dtype, as fp32 [ROWS, CW]."""
        cols, mask = _cols(rows, n_rows, C0, CW)
        offs = row_off[:, None] + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr + offs, mask=mask, other=0.0)
            if HAS_GATE:
                g = tl.load(g_ptr + g_off[:, None] + cols[None, :], mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32) * g).to(x.dtype)
            else:
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        return x.to(tl.float32)

    @triton.jit
    def _store_chunk(h, h_ptr, y_ptr, sc_ptr, sh_ptr, w_ptr, b_ptr, rows, n_rows, row_off, m_off, mean, rstd,
                     C0: tl.constexpr, CW: tl.constexpr, HAS_RES: tl.constexpr, HAS_MOD: tl.constexpr,
                     HAS_AFFINE: tl.constexpr):
        cols, mask = _cols(rows, n_rows, C0, CW)
        offs = row_off[:, None] + cols[None, :]
        out_dtype = y_ptr.dtype.element_ty
        if HAS_RES:
            tl.store(h_ptr + offs, h.to(out_dtype), mask=mask)
        y = (h - mean[:, None]) * rstd[:, None]
        if HAS_AFFINE:
            w = tl.load(w_ptr + cols).to(tl.float32)
            b = tl.load(b_ptr + cols).to(tl.float32)
            y = y * w[None, :] + b[None, :]
        if HAS_MOD:
            moffs = m_off[:, None] + cols[None, :]
            sc = tl.load(sc_ptr + moffs, mask=mask, other=0.0)
            sh = tl.load(sh_ptr + moffs, mask=mask, other=0.0)
            y = y * (1.0 + sc) + sh
        tl.store(y_ptr + offs, y.to(out_dtype), mask=mask)

    @triton.jit
    def _ln_mod_kernel(x_ptr, r_ptr, g_ptr, sc_ptr, sh_ptr, w_ptr, b_ptr, h_ptr, y_ptr, n_rows, tokens, C,
                       g_sb, g_sn, m_sb, m_sn, eps,
                       CA: tl.constexpr, CB: tl.constexpr, CC: tl.constexpr, HAS_RES: tl.constexpr,
                       HAS_GATE: tl.constexpr, HAS_MOD: tl.constexpr, HAS_AFFINE: tl.constexpr, ROWS: tl.constexpr):
        """One program: ``ROWS`` rows, columns covered by power-of-two groups CA + CB + CC == C (CB/CC may be 0)."""
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        batch = rows // tokens
        token = rows % tokens
        row_off = rows * C
        g_off = batch * g_sb + token * g_sn
        m_off = batch * m_sb + token * m_sn
        ha = _load_chunk(x_ptr, r_ptr, g_ptr, rows, n_rows, row_off, g_off, C, 0, CA, HAS_RES, HAS_GATE)
        total = tl.sum(ha, axis=1)
        if CB > 0:
            hb = _load_chunk(x_ptr, r_ptr, g_ptr, rows, n_rows, row_off, g_off, C, CA, CB, HAS_RES, HAS_GATE)
            total += tl.sum(hb, axis=1)
        if CC > 0:
            hc = _load_chunk(x_ptr, r_ptr, g_ptr, rows, n_rows, row_off, g_off, C, CA + CB, CC, HAS_RES, HAS_GATE)
            total += tl.sum(hc, axis=1)
        mean = total / C
        da = ha - mean[:, None]
        var = tl.sum(da * da, axis=1)
        if CB > 0:
            db = hb - mean[:, None]
            var += tl.sum(db * db, axis=1)
        if CC > 0:
            dc = hc - mean[:, None]
            var += tl.sum(dc * dc, axis=1)
        rstd = 1.0 / tl.sqrt(var / C + eps)
        _store_chunk(ha, h_ptr, y_ptr, sc_ptr, sh_ptr, w_ptr, b_ptr, rows, n_rows, row_off, m_off, mean, rstd,
                     0, CA, HAS_RES, HAS_MOD, HAS_AFFINE)
        if CB > 0:
            _store_chunk(hb, h_ptr, y_ptr, sc_ptr, sh_ptr, w_ptr, b_ptr, rows, n_rows, row_off, m_off, mean, rstd,
                         CA, CB, HAS_RES, HAS_MOD, HAS_AFFINE)
        if CC > 0:
            _store_chunk(hc, h_ptr, y_ptr, sc_ptr, sh_ptr, w_ptr, b_ptr, rows, n_rows, row_off, m_off, mean, rstd,
                         CA + CB, CC, HAS_RES, HAS_MOD, HAS_AFFINE)

    _autotuned = triton.autotune(
        configs=[triton.Config({"ROWS": r}, num_warps=w) for r, w in _CONFIGS],
        key=["C", "CA", "CB", "CC", "HAS_RES", "HAS_GATE", "HAS_MOD", "HAS_AFFINE"],
    )(_ln_mod_kernel)


def _column_groups(channels: int) -> tuple[int, int, int] | None:
    """``channels`` as up to three power-of-two groups (5120 -> 4096, 1024, 0); None when it needs more."""
    return pow2_groups(channels)


def _bsn_strides(t: torch.Tensor | None, batch: int, tokens: int, channels: int, name: str) -> tuple[int, int]:
    """Batch / token strides of a (B or 1, N or 1, C) fp32 modulation vector with a unit channel stride."""
    if t is None:
        return 0, 0
    if t.ndim != 3 or t.shape[0] not in (1, batch) or t.shape[1] not in (1, tokens) or t.shape[2] != channels:
        raise ValueError(f"{name} must be (1 or {batch}, 1 or {tokens}, {channels}), got {tuple(t.shape)}")
    if t.dtype != torch.float32 or t.stride(2) != 1:
        raise ValueError(f"{name} must be float32 with a unit channel stride")
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def _launch(x, residual, gate, scale, shift, weight, bias, eps):
    batch, tokens, channels = x.shape
    groups = _column_groups(channels)
    g_sb, g_sn = _bsn_strides(gate, batch, tokens, channels, "gate")
    if scale is not None and (shift.shape != scale.shape or shift.stride() != scale.stride()):
        shape = torch.broadcast_shapes(scale.shape, shift.shape)  # one set of strides serves both
        scale, shift = scale.expand(shape).contiguous(), shift.expand(shape).contiguous()
    m_sb, m_sn = _bsn_strides(scale, batch, tokens, channels, "scale")
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else y
    n_rows = batch * tokens
    dummy = y
    args = (x, residual if residual is not None else dummy, gate if gate is not None else dummy,
            scale if scale is not None else dummy, shift if shift is not None else dummy,
            weight if weight is not None else dummy, bias if bias is not None else dummy, h, y,
            n_rows, tokens, channels, g_sb, g_sn, m_sb, m_sn, float(eps))
    meta = dict(CA=groups[0], CB=groups[1], CC=groups[2], HAS_RES=residual is not None, HAS_GATE=gate is not None,
                HAS_MOD=scale is not None, HAS_AFFINE=weight is not None)
    if _interpreting():
        _ln_mod_kernel[(triton.cdiv(n_rows, 2),)](*args, ROWS=2, **meta)
    else:
        _autotuned[lambda m: (triton.cdiv(n_rows, m["ROWS"]),)](*args, **meta)
    return h, y


if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):

    @torch.library.custom_op("diffusers_wan_ext::ln_modulate", mutates_args=())
    def _ln_modulate_op(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                        weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        return _launch(x, None, None, scale, shift, weight, bias, eps)[1]

    @_ln_modulate_op.register_fake
    def _(x, scale, shift, weight, bias, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.custom_op("diffusers_wan_ext::residual_ln_modulate", mutates_args=())
    def _residual_ln_modulate_op(x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor | None,
                                 scale: torch.Tensor | None, shift: torch.Tensor | None, weight: torch.Tensor | None,
                                 bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(x, residual, gate, scale, shift, weight, bias, eps)

    @_residual_ln_modulate_op.register_fake
    def _(x, residual, gate, scale, shift, weight, bias, eps):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(x, memory_format=torch.contiguous_format))

else:  # pragma: no cover - very old torch

    def _ln_modulate_op(x, scale, shift, weight, bias, eps):
        return _launch(x, None, None, scale, shift, weight, bias, eps)[1]

    def _residual_ln_modulate_op(x, residual, gate, scale, shift, weight, bias, eps):
        return _launch(x, residual, gate, scale, shift, weight, bias, eps)


def ln_modulate_supported(x: torch.Tensor) -> bool:
    """Whether :func:`ln_modulate` runs the Triton kernel for ``x`` (device, dtype, channel count)."""
    return (uses_triton(x) and x.ndim == 3 and x.dtype in (torch.bfloat16, torch.float16)
            and _column_groups(x.shape[-1]) is not None and x.shape[-1] >= 16)


def ln_modulate(x: torch.Tensor, residual: torch.Tensor | None, gate: torch.Tensor | None, scale: torch.Tensor | None,
                shift: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """One normalisation step of a Wan block; returns ``(new_x, y)`` when ``residual`` is given, else ``y``.

    Args:
        x: the residual stream (B, N, C), bf16/fp16.
        residual: branch output to add first (B, N, C), or None; with ``gate`` (fp32, (B or 1, N or 1, C)) it is
            added as ``x + residual * gate`` in fp32, else as ``x + residual``; the sum is rounded to ``x.dtype``.
        scale, shift: adaLN modulation (fp32, (B or 1, N or 1, C)): ``y = LN(x) * (1 + scale) + shift``, or None.
        weight, bias: LayerNorm affine parameters (C,), or None.
        eps: LayerNorm epsilon.

    Runs the Triton kernel where :func:`ln_modulate_supported`; otherwise the stock expression.

    Example:
        >>> y = ln_modulate(x, None, None, scale_msa, shift_msa, None, None, 1e-6)  # doctest: +SKIP
        >>> x, y = ln_modulate(x, attn_out, gate_msa, None, None, norm2.weight, norm2.bias, 1e-6)  # doctest: +SKIP
    """
    if (scale is None) != (shift is None):
        raise ValueError("pass both scale and shift, or neither")
    if (weight is None) != (bias is None):
        raise ValueError("pass both LayerNorm weight and bias, or neither")
    if gate is not None and residual is None:
        raise ValueError("gate needs a residual")
    if not ln_modulate_supported(x) or (residual is not None and residual.shape != x.shape):
        return ln_modulate_reference(x, residual, gate, scale, shift, weight, bias, eps)
    # the kernel reads modulation vectors as fp32 with a unit channel stride
    gate, scale, shift = (None if t is None else t if t.dtype == torch.float32 and t.stride(-1) == 1
                          else t.float().contiguous() for t in (gate, scale, shift))
    if residual is None:
        return _ln_modulate_op(x, scale, shift, weight, bias, float(eps))
    return _residual_ln_modulate_op(x, residual, gate, scale, shift, weight, bias, float(eps))
