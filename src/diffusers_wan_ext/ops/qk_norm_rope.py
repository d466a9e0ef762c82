"""Fused query/key RMSNorm + rotary embedding for Wan self-attention, as one Triton kernel.

Stock ``WanAttnProcessor`` does, on the fused QKV projection output ``qkv`` (batch, tokens, 3 * dim)::

    q = RMSNorm(q) over the whole ``dim`` (all heads), k likewise       # norm_q / norm_k ("rms_norm_across_heads")
    q, k = rope(q), rope(k)                                             # interleaved pairs, fp32 cos/sin per token

Compiled by Inductor this is a reduction kernel that moves the interleaved pairs with strided accesses: on an
H100 it sustains 0.86 TB/s at the 1.3B shape and 0.32 TB/s at the 14B shape (9.7 ms per layer, 0.39 s per 14B
forward). :func:`qk_norm_rope` reads each q/k row once as up to three power-of-two head groups (40 heads = 32 + 8,
no masked lanes), keeps it in registers and writes the rotated q and k in one autotuned launch (1.4 ms per 14B
layer). It writes them in the layout the attention kernel reads: (B, N, heads, D) for flash-attn, or heads-first
memory for SDPA backends, which then also gets ``v`` from the same launch. It is a ``torch.library`` custom op
(inference only: no autograd formula), so regional ``torch.compile(fullgraph=True)`` keeps it as one node.

Numerics follow the stock path: the norm is computed in fp32 and rounded to the activation dtype, the rotation
is computed in fp32 from that rounded value (with the stock even/odd cos/sin picks) and rounded once.
:func:`qk_norm_rope_reference` is the stock expression, used as the fallback off CUDA and in tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import interpreting as _interpreting
from ._triton import pow2_groups, tl, triton, triton_available, uses_triton

__all__ = ["qk_norm_rope", "qk_norm_rope_reference", "triton_available"]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


def qk_norm_rope_reference(qkv: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, eps: float, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock expression: ``qkv`` (B, N, 3*dim) -> normalised, rotated ``q`` and ``k`` (B, N, heads, head_dim)."""
    dim = qkv.shape[-1] // 3
    q, k = qkv[..., :dim], qkv[..., dim:2 * dim]
    q = F.rms_norm(q, (dim,), weight_q, eps).unflatten(2, (heads, -1))
    k = F.rms_norm(k, (dim,), weight_k, eps).unflatten(2, (heads, -1))
    return _rope(q, cos, sin), _rope(k, cos, sin)


#: cover the heads with one padded power-of-two group instead of up to three exact ones (benchmark switch)
PADDED_HEADS = False

_CONFIGS = [(rows, warps) for rows in (1, 2, 4) for warps in (4, 8, 16)]


if triton is not None:

    @triton.jit
    def _group_offsets(rows, batch, token, row_stride, out_b, out_n, out_h, heads, n_rows,
                       H0: tl.constexpr, HG: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Source/destination offsets and mask of the head group [H0, H0 + HG) as [ROWS, HG, HEAD_DIM]."""
        h = H0 + tl.arange(0, HG)
        d = tl.arange(0, HEAD_DIM)
        mask = (rows < n_rows)[:, None, None] & (h < heads)[None, :, None] & (d < HEAD_DIM)[None, None, :]
        src = rows[:, None, None] * row_stride + h[None, :, None] * HEAD_DIM + d[None, None, :]
        dst = (batch * out_b + token * out_n)[:, None, None] + h[None, :, None] * out_h + d[None, None, :]
        return src, dst, mask

    @triton.jit
    def _norm_rope_group(x, rstd, w_ptr, c, s, heads, out_dtype: tl.constexpr,
                         ROWS: tl.constexpr, H0: tl.constexpr, HG: tl.constexpr, HEAD_DIM: tl.constexpr):
        h = H0 + tl.arange(0, HG)
        d = tl.arange(0, HEAD_DIM)
        w = tl.load(w_ptr + h[:, None] * HEAD_DIM + d[None, :], mask=(h < heads)[:, None], other=0.0)
        y = (x * rstd[:, None, None] * w.to(tl.float32)[None, :, :]).to(out_dtype).to(tl.float32)
        y1, y2 = tl.split(tl.reshape(y, (ROWS, HG, HEAD_DIM // 2, 2)))
        return tl.reshape(tl.join(y1 * c - y2 * s, y1 * s + y2 * c), (ROWS, HG, HEAD_DIM)).to(out_dtype)

    @triton.jit
    def _qk_norm_rope_kernel(qkv_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, tokens, heads, dim, row_stride,
                             out_sel, out_b, out_n, out_h, cos_b, cos_n, eps,
                             HA: tl.constexpr, HB: tl.constexpr, HC: tl.constexpr, HEAD_DIM: tl.constexpr,
                             ROWS: tl.constexpr):
        """One program: ``ROWS`` tokens of q (axis 1 = 0), k (1) or v (2, plain copy).

        The heads are covered by up to three power-of-two groups (HA + HB + HC >= heads; HB/HC may be 0), so a
        row such as 40 heads = 32 + 8 runs without masked lanes."""
        sel = tl.program_id(1)
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        batch = rows // tokens
        token = rows % tokens
        src_ptr = qkv_ptr + sel * dim
        dst_ptr = out_ptr + sel * out_sel
        out_dtype = out_ptr.dtype.element_ty
        sa, da, ma = _group_offsets(rows, batch, token, row_stride, out_b, out_n, out_h, heads, n_rows,
                                    0, HA, HEAD_DIM)
        xa = tl.load(src_ptr + sa, mask=ma, other=0.0)
        if HB > 0:
            sb, db, mb = _group_offsets(rows, batch, token, row_stride, out_b, out_n, out_h, heads, n_rows,
                                        HA, HB, HEAD_DIM)
            xb = tl.load(src_ptr + sb, mask=mb, other=0.0)
        if HC > 0:
            sc, dc, mc = _group_offsets(rows, batch, token, row_stride, out_b, out_n, out_h, heads, n_rows,
                                        HA + HB, HC, HEAD_DIM)
            xc = tl.load(src_ptr + sc, mask=mc, other=0.0)
        if sel == 2:
            tl.store(dst_ptr + da, xa, mask=ma)
            if HB > 0:
                tl.store(dst_ptr + db, xb, mask=mb)
            if HC > 0:
                tl.store(dst_ptr + dc, xc, mask=mc)
        else:
            fa = xa.to(tl.float32)
            sumsq = tl.sum(tl.sum(fa * fa, axis=2), axis=1)
            if HB > 0:
                fb = xb.to(tl.float32)
                sumsq += tl.sum(tl.sum(fb * fb, axis=2), axis=1)
            if HC > 0:
                fc = xc.to(tl.float32)
                sumsq += tl.sum(tl.sum(fc * fc, axis=2), axis=1)
            rstd = 1.0 / tl.sqrt(sumsq / dim + eps)
            f = tl.arange(0, HEAD_DIM // 2)
            foff = (batch * cos_b + token * cos_n)[:, None] + 2 * f[None, :]
            fmask = (rows < n_rows)[:, None]
            c = tl.load(cos_ptr + foff, mask=fmask, other=0.0)[:, None, :]
            s = tl.load(sin_ptr + foff + 1, mask=fmask, other=0.0)[:, None, :]
            wp = w_ptr + sel * dim
            tl.store(dst_ptr + da, _norm_rope_group(fa, rstd, wp, c, s, heads, out_dtype, ROWS, 0, HA, HEAD_DIM),
                     mask=ma)
            if HB > 0:
                tl.store(dst_ptr + db, _norm_rope_group(fb, rstd, wp, c, s, heads, out_dtype, ROWS, HA, HB,
                                                        HEAD_DIM), mask=mb)
            if HC > 0:
                tl.store(dst_ptr + dc, _norm_rope_group(fc, rstd, wp, c, s, heads, out_dtype, ROWS, HA + HB, HC,
                                                        HEAD_DIM), mask=mc)

    _autotuned = triton.autotune(
        configs=[triton.Config({"ROWS": r}, num_warps=w) for r, w in _CONFIGS],
        key=["heads", "dim", "HEAD_DIM"],
    )(_qk_norm_rope_kernel)


def _head_groups(heads: int) -> tuple[int, int, int]:
    """Up to three power-of-two head groups covering ``heads`` (40 -> 32, 8, 0); one padded group otherwise."""
    groups = pow2_groups(heads)
    if groups is None or PADDED_HEADS:
        return triton.next_power_of_2(heads), 0, 0
    return groups


def _launch(qkv: torch.Tensor, weights: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
            heads: int, heads_first: bool) -> torch.Tensor:
    batch, tokens, three_dim = qkv.shape
    dim = three_dim // 3
    head_dim = dim // heads
    if qkv.stride(-1) != 1 or (batch > 1 and qkv.stride(0) != tokens * qkv.stride(1)):
        qkv = qkv.contiguous()  # the kernel walks rows b * tokens + t with one row stride
    if cos.shape[1] not in (1, tokens) or sin.shape != cos.shape or cos.shape[-1] != head_dim:
        raise ValueError(f"rotary tables {tuple(cos.shape)} / {tuple(sin.shape)} do not match {tokens} tokens of "
                         f"head_dim {head_dim}")
    cos, sin = cos.float(), sin.float()
    if cos.shape[1] == 1 and tokens > 1:
        cos, sin = cos.expand(-1, tokens, -1, -1), sin.expand(-1, tokens, -1, -1)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    planes = 3 if heads_first else 2
    if heads_first:  # (planes, B, H, N, D) memory, returned as a (planes, B, N, H, D) view
        out = torch.empty(planes, batch, heads, tokens, head_dim, device=qkv.device, dtype=qkv.dtype)
        out = out.permute(0, 1, 3, 2, 4)
    else:
        out = torch.empty(planes, batch, tokens, heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    n_rows = batch * tokens
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0  # a batch dimension of 1 broadcasts
    args = (qkv, weights, cos, sin, out, n_rows, tokens, heads, dim, qkv.stride(1), out.stride(0), out.stride(1),
            out.stride(2), out.stride(3), cos_b, cos.stride(1), eps)
    ha, hb, hc = _head_groups(heads)
    meta = dict(HA=ha, HB=hb, HC=hc, HEAD_DIM=head_dim)
    if _interpreting():
        _qk_norm_rope_kernel[(triton.cdiv(n_rows, 2), planes)](*args, ROWS=2, **meta)
    else:
        _autotuned[lambda m: (triton.cdiv(n_rows, m["ROWS"]), planes)](*args, **meta)
    return out


if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):

    @torch.library.custom_op("diffusers_wan_ext::qk_norm_rope", mutates_args=())
    def _qk_norm_rope_op(qkv: torch.Tensor, weights: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                         heads: int, heads_first: bool) -> torch.Tensor:
        return _launch(qkv, weights, cos, sin, eps, heads, heads_first)

    @_qk_norm_rope_op.register_fake
    def _(qkv, weights, cos, sin, eps, heads, heads_first):
        batch, tokens, three_dim = qkv.shape
        head_dim = three_dim // 3 // heads
        if heads_first:
            return qkv.new_empty(3, batch, heads, tokens, head_dim).permute(0, 1, 3, 2, 4)
        return qkv.new_empty(2, batch, tokens, heads, head_dim)

else:  # pragma: no cover - very old torch
    _qk_norm_rope_op = _launch


def qk_norm_rope(qkv: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, eps: float, heads: int, heads_first: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised, rotated ``q`` and ``k`` and the ``v`` heads, each (B, N, heads, head_dim), from a fused QKV output.

    Args:
        qkv: (B, N, 3 * dim) output of the fused QKV projection (last dim contiguous).
        weight_q, weight_k: the RMSNorm weights (dim,).
        cos, sin: Wan's rotary tables, (1 or B, N, 1, head_dim), interleave-repeated as ``WanRotaryPosEmbed`` makes
            them.
        eps: the RMSNorm epsilon.
        heads: number of attention heads.
        heads_first: lay q, k and v out as (B, heads, N, head_dim) in memory (returned as (B, N, heads, head_dim)
            views), which is what SDPA kernels read without a copy; ``v`` is then written by the same launch. When
            False, q and k are contiguous (B, N, heads, head_dim) (what flash-attn reads) and ``v`` is a view of
            ``qkv``.

    Runs the Triton kernel on CUDA (or under ``TRITON_INTERPRET=1``); otherwise the stock expression.
    """
    dim = qkv.shape[-1] // 3
    if qkv.ndim != 3 or qkv.shape[-1] != 3 * dim or dim % heads or (dim // heads) % 2:
        raise ValueError(f"qk_norm_rope expects qkv (batch, tokens, 3 * dim) with dim divisible into {heads} heads "
                         f"of even size, got {tuple(qkv.shape)}")
    head_dim = dim // heads
    if not uses_triton(qkv) or head_dim & (head_dim - 1):
        q, k = qk_norm_rope_reference(qkv, weight_q, weight_k, cos, sin, eps, heads)
        return q, k, qkv[..., 2 * dim:].unflatten(2, (heads, -1))
    weights = torch.stack([weight_q.to(qkv.dtype), weight_k.to(qkv.dtype)])
    out = _qk_norm_rope_op(qkv, weights, cos, sin, float(eps), int(heads), bool(heads_first))
    v = out[2] if heads_first else qkv[..., 2 * dim:].unflatten(2, (heads, -1))
    return out[0], out[1], v
