"""Exact (non-quantized) attention forward in Triton, tuned for Wan's shapes on Hopper.

Inputs and output are in the ``(batch, seq, heads, head_dim)`` layout that Wan's projections produce, so the
processor needs no transposes or copies around the kernel. The algorithm is the usual online-softmax attention
(running max and sum in fp32, base-2 exponentials, probabilities cast to the input dtype for the second product).
The key loop runs over full blocks without masks; the ragged tail block is handled once at the end.

Use :func:`triton_attention` (a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` traces through
it) or let :func:`diffusers_wan_ext.runtime.attention.set_attention_backend` pick it.
"""

from __future__ import annotations

import math

import torch

from ._triton import tl, triton  # noqa: F401 - tl is used inside the kernel

_HAS_TRITON = triton is not None

# Launch configuration per head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages).
DEFAULT_CONFIGS = {64: (128, 128, 8, 3), 128: (128, 128, 8, 2)}


def is_available(device: torch.device | str | None = None) -> bool:
    """True when Triton is installed and ``device`` (default: the current CUDA device) is a CUDA GPU of sm80+."""
    if not _HAS_TRITON or not torch.cuda.is_available():
        return False
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


if _HAS_TRITON:

    @triton.jit
    def _attn_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, seq_kv, qk_scale, stride_ks, stride_vs,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_ks, mask=offs_n[None, :] < seq_kv, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_ks)
        qk = tl.dot(q, k)
        if MASKED:
            qk = tl.where(offs_n[None, :] < seq_kv, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_vs, mask=offs_n[:, None] < seq_kv, other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vs)
        acc = tl.dot(p.to(v.dtype), v, acc)
        return acc, l_i, m_new

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, qk_scale, seq_q, seq_kv,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ob, stride_os, stride_oh,
        HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HEADS
        h = pid_bh % HEADS
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=offs_m[:, None] < seq_q, other=0.0)
        # K is read transposed (HEAD_DIM x BLOCK_N) so the first product is a plain dot.
        k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        full_end = (seq_kv // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, seq_kv, qk_scale,
                                        stride_ks, stride_vs, BLOCK_N, False)
        if full_end < seq_kv:
            acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, full_end, seq_kv, qk_scale,
                                        stride_ks, stride_vs, BLOCK_N, True)
        acc = acc / l_i[:, None]
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=offs_m[:, None] < seq_q)


def attention_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Attention over ``(batch, seq, heads, head_dim)`` tensors; returns the same layout, dtype of ``q``.

    Args:
        q: queries, ``(B, Sq, H, D)``, bf16 or fp16, last dim contiguous.
        k, v: keys and values, ``(B, Skv, H, D)``.
        scale: softmax scale, default ``1/sqrt(D)``.
        config: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` override (benchmarks use it to sweep).

    Example:
        >>> out = attention_bshd(q, k, v)  # doctest: +SKIP
    """
    if not _HAS_TRITON:
        raise RuntimeError("attention_bshd needs Triton (pip install triton) and a CUDA GPU.")
    b, sq, h, d = q.shape
    skv = k.shape[1]
    if k.shape != (b, skv, h, d) or v.shape != k.shape:
        raise ValueError(f"attention_bshd: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "(B, S, H, D) with equal B, H, D and equal key/value lengths.")
    if d not in DEFAULT_CONFIGS:
        raise ValueError(f"attention_bshd supports head_dim {sorted(DEFAULT_CONFIGS)}, got {d}.")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = (t.contiguous() for t in (q, k, v))
    block_m, block_n, warps, stages = config or DEFAULT_CONFIGS[d]
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    grid = (triton.cdiv(sq, block_m), b * h)
    _attn_fwd_kernel[grid](
        q, k, v, out, scale * 1.4426950408889634, sq, skv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        HEADS=h, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
    )
    return out


@torch.library.custom_op("diffusers_wan_ext::triton_attention", mutates_args=())
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``torch.library`` op around :func:`attention_bshd` (opaque to ``torch.compile``)."""
    return attention_bshd(q, k, v, scale)


@triton_attention.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q)
