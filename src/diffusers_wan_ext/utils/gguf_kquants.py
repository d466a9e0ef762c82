"""GGUF blocks computed with torch, vectorized over blocks (on whatever device the weights are): the K-quants
``Q3_K``, ``Q4_K``, ``Q5_K``, ``Q6_K`` (which the ``gguf`` package can dequantize but not quantize) and ``Q8_0``.

The math follows ggml's reference quantizers in ``ggml/src/ggml-quants.c`` (``quantize_row_q{3,4,5,6}_K_ref``
with ``make_q3_quants``, ``make_qkx2_quants``, ``make_qx_quants``; ``quantize_row_q8_0_ref``), re-derived here for
whole batches of blocks; the block layouts are ggml's (``block_q4_K`` ...), the ones ``gguf.quants.dequantize``
and ComfyUI-GGUF's ``dequant.py`` read.  Rounding: ggml's ``nearest_int`` (half to even, ``torch.round``) for the
K-quants, ``roundf`` (half away from zero) for Q8_0, whose output is byte-identical to ``gguf.quants.quantize``.
The K-quant sums run in a different order than ggml's loops, so a block can rarely differ from llama.cpp's in the
last bit of a candidate-scale comparison; the values are equally good.

Sizes: a super-block of ``QK_K = 256`` values is 110 / 144 / 176 / 210 bytes for Q3_K / Q4_K / Q5_K / Q6_K
(3.44 / 4.5 / 5.5 / 6.56 bits a value); rows must be a multiple of 256 values long.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["BLOCK_BYTES", "BLOCK_VALUES", "QK_K", "TORCH_QUANT_TYPES", "quantize_blocks"]

QK_K = 256
#: values per block and bytes per block of each type :func:`quantize_blocks` writes
BLOCK_VALUES = {"Q8_0": 32, "Q3_K": QK_K, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K}
BLOCK_BYTES = {"Q8_0": 34, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
TORCH_QUANT_TYPES = tuple(BLOCK_VALUES)
_EPS = 1e-15  # ggml GROUP_MAX_EPS


def _f32(a: float, b: float, step: int, c: float) -> float:
    """``a + b*step + c`` in float32 arithmetic, as ggml computes its candidate scales."""
    f = np.float32
    return float(f(a) + f(b) * f(step) + f(c))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """float -> (the fp16 bytes [..., 2], the value the file stores, as float32)."""
    h = x.to(torch.float16)
    return h.contiguous().view(torch.uint8).reshape(*x.shape[:-1], 2), h.float()


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim (the first one on ties), keeping its sign."""
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    a = (blocks * inv).abs()
    q = torch.sign(blocks * inv) * (a.floor() + (2 * (a - a.floor())).floor())  # roundf
    d_bytes, _ = _fp16(d)
    return torch.cat([d_bytes, q.to(torch.int8).view(torch.uint8)], dim=1)


# ------------------------------------------------------------------------------------------- group quantizers
def _qkx2(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml ``make_qkx2_quants`` for groups ``x`` [G, n] with weights ``rms(x) + |x|``: the scale and min of
    ``x ~ scale * L - min`` (min >= 0) that minimise the weighted squared error over a grid of ``nstep + 1``
    candidate scales, and the levels ``L`` in ``[0, nmax]``.  A candidate's error comes from its sums (in
    float64), the levels of the winner are recomputed once at the end."""
    w = x.pow(2).mean(dim=1, keepdim=True).sqrt() + x.abs()
    wx = w * x
    lo = lo0 = x.amin(dim=1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=1, keepdim=True)
    flat = hi == lo
    sums = [t.sum(dim=1, keepdim=True).double() for t in (w, wx, wx * x)]  # sum_w, sum_x, sum_xx
    iscale = nmax / torch.where(flat, torch.ones_like(hi), hi - lo)
    scale = 1 / iscale
    gen_lo, gen_mult = lo, iscale  # the candidate the current levels come from
    best = (w * (scale * (iscale * (x - lo)).round().clamp(0, nmax) + lo - x).pow(2)).sum(dim=1, keepdim=True)
    best = best.double()
    for step in range(nstep + 1):
        span = torch.where(hi == lo, torch.ones_like(hi), hi - lo)  # ggml moves min (and the range) as it improves
        mult = _f32(rmin, rdelta, step, nmax) / span
        cand = (x - lo).mul_(mult).round_().clamp_(0, nmax)
        wl = w * cand
        s_l, s_l2, s_xl = (t.sum(dim=1, keepdim=True).double() for t in (wl, wl * cand, wx * cand))
        s_w, s_x, s_xx = sums
        det = s_w * s_l2 - s_l * s_l
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        c_scale, c_min = (s_w * s_xl - s_x * s_l) / det, (s_l2 * s_x - s_l * s_xl) / det
        pos = c_min > 0
        c_scale = torch.where(pos, s_xl / s_l2.clamp(min=1e-300), c_scale).float().double()
        c_min = torch.where(pos, torch.zeros_like(c_min), c_min).float().double()
        err = (c_scale * c_scale * s_l2 + c_min * c_min * s_w + s_xx + 2 * c_scale * c_min * s_l
               - 2 * c_scale * s_xl - 2 * c_min * s_x)
        better = ok & (err < best)
        gen_lo, gen_mult = torch.where(better, lo, gen_lo), torch.where(better, mult, gen_mult)
        best = torch.where(better, err, best)
        scale, lo = torch.where(better, c_scale.float(), scale), torch.where(better, c_min.float(), lo)
    levels = (x - gen_lo).mul_(gen_mult).round_().clamp_(0, nmax)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    lo = torch.where(flat, lo0, lo)
    return scale.squeeze(1), 0.0 - lo.squeeze(1), levels  # +0, not -0, for a min of 0


def _qx(x: torch.Tensor, nmax: int):
    """ggml ``make_qx_quants`` (``rmse_type = 1``, weights ``x**2``) for groups ``x`` [G, n]: the signed scale of
    ``x ~ scale * (L - nmax)`` best over 19 candidate scales, and ``L`` in ``[0, 2 * nmax)``."""
    peak = _signed_absmax(x).unsqueeze(1)
    zero = peak.abs() < _EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    w = x * x

    wx = w * x

    def trial(iscale):
        lv = (iscale * x).round_().clamp_(-nmax, nmax - 1)
        wl = w * lv
        return (wx * lv).sum(dim=1, keepdim=True), (wl * lv).sum(dim=1, keepdim=True)

    chosen = -nmax / peak  # the candidate the levels come from; they are recomputed once at the end
    sumlx, suml2 = trial(chosen)
    scale = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s != 0]:
        iscale = -_f32(0, 0.1, step, nmax) / peak
        slx, sl2 = trial(iscale)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        chosen = torch.where(better, iscale, chosen)
        scale = torch.where(better, slx / sl2.clamp(min=1e-30), scale)
        best = torch.where(better, scale * slx, best)
    levels = (chosen * x).round_().clamp_(-nmax, nmax - 1)
    levels = torch.where(zero, torch.full_like(levels, -nmax), levels)
    return torch.where(zero, torch.zeros_like(scale), scale).squeeze(1), levels + nmax


def _q3(x: torch.Tensor, nmax: int = 4):
    """ggml ``make_q3_quants`` (``do_rmse``): start from the absmax scale, then five sweeps that move one level at a
    time when that improves the weighted fit; the scale and ``L`` in ``[0, 2 * nmax)``."""
    peak = _signed_absmax(x).unsqueeze(1)
    zero = peak.abs() < _EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    w = x * x
    levels = (-nmax / peak * x).round().clamp(-nmax, nmax - 1)
    sumlx, suml2 = (w * x * levels).sum(dim=1), (w * levels * levels).sum(dim=1)
    xt, wt, levels = x.t().contiguous(), w.t().contiguous(), levels.t().contiguous()  # one value of every group
    for _ in range(5):  # a sweep that changes nothing changes nothing next time: ggml's early exit is implied
        for i in range(x.shape[1]):
            xi, wi, li = xt[i], wt[i], levels[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = (xi * sl2 / torch.where(slx > 0, slx, torch.ones_like(slx))).round().clamp(-nmax, nmax - 1)
            slx2, sl22 = slx + wi * xi * new, sl2 + wi * new * new
            take = (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            levels[i] = torch.where(take, new, li)
            sumlx, suml2 = torch.where(take, slx2, sumlx), torch.where(take, sl22, suml2)
    levels = levels.t()
    scale = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
    levels = torch.where(zero, torch.full_like(levels, -nmax), levels)
    return torch.where(zero.squeeze(1), torch.zeros_like(scale), scale), levels + nmax


# ------------------------------------------------------------------------------------------- block packers
def _scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins [B, 8] -> ggml's 12-byte ``scales`` field (read back by ``get_scale_min_k4``)."""
    out = torch.empty(ls.shape[0], 12, dtype=torch.int32, device=ls.device)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 15) | ((lm[:, 4:8] & 15) << 4)
    return out.to(torch.uint8)


def _qkx_super(blocks: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """The common part of ``quantize_row_q4_K_ref`` / ``q5_K``: per 32 values a scale and a min from
    :func:`_qkx2`, both re-quantized to 6 bits against the super-block's fp16 ``d`` / ``dmin``, then the levels
    recomputed with the stored scales.  Returns the header bytes (d, dmin, scales) and the levels [B, 8, 32]."""
    sub = blocks.reshape(-1, 32)
    scales, mins, levels = _qkx2(sub, nmax, rmin, 0.1, nstep)
    scales, mins, levels = scales.reshape(-1, 8), mins.reshape(-1, 8), levels.reshape(-1, 8, 32)
    max_scale = scales.amax(dim=1, keepdim=True).clamp(min=0)
    max_min = mins.amax(dim=1, keepdim=True).clamp(min=0)
    inv_scale = torch.where(max_scale > 0, 63 / max_scale.clamp(min=1e-30), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min.clamp(min=1e-30), torch.zeros_like(max_min))
    ls = (inv_scale * scales).round().clamp(0, 63).to(torch.int32)
    lm = (inv_min * mins).round().clamp(0, 63).to(torch.int32)
    d_bytes, d = _fp16(max_scale / 63)
    dmin_bytes, dmin = _fp16(max_min / 63)
    step = (d * ls).unsqueeze(2)
    offset = (dmin * lm).unsqueeze(2)
    x = blocks.reshape(-1, 8, 32)
    fresh = ((x + offset) / torch.where(step == 0, torch.ones_like(step), step)).round().clamp(0, nmax)
    levels = torch.where(step != 0, fresh, levels).to(torch.int32)
    return torch.cat([d_bytes, dmin_bytes, _scales_k4(ls, lm)], dim=1), levels


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    head, levels = _qkx_super(blocks, 15, -1.0, 20)
    pairs = levels.reshape(-1, 4, 2, 32)  # 32 bytes per 64 values: low nibble the first 32, high the next
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([head, qs.to(torch.uint8)], dim=1)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    head, levels = _qkx_super(blocks, 31, -0.5, 15)
    shifts = torch.arange(8, device=blocks.device, dtype=torch.int32).view(1, 8, 1)
    qh = ((levels >> 4) << shifts).sum(dim=1)  # bit s of byte j: the fifth bit of value j of sub-block s
    pairs = (levels & 15).reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([head, qh.to(torch.uint8), qs.to(torch.uint8)], dim=1)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, levels = _qx(blocks.reshape(-1, 16), 32)
    scales, levels = scales.reshape(-1, 16), levels.reshape(-1, 16, 16)
    peak = _signed_absmax(scales).unsqueeze(1)
    zero = peak.abs() < _EPS
    iscale = -128 / torch.where(zero, torch.ones_like(peak), peak)
    d_bytes, d = _fp16(1 / iscale)
    sc = (iscale * scales).round().clamp(max=127)
    step = (d * sc).unsqueeze(2)
    x = blocks.reshape(-1, 16, 16)
    fresh = (x / torch.where(step == 0, torch.ones_like(step), step)).round().clamp(-32, 31) + 32
    levels = torch.where(step != 0, fresh, levels).to(torch.int32).reshape(-1, 2, 4, 32)
    ql = torch.cat([levels[:, :, 0] & 15 | (levels[:, :, 2] & 15) << 4,
                    levels[:, :, 1] & 15 | (levels[:, :, 3] & 15) << 4], dim=2).reshape(-1, 128)
    shifts = torch.tensor([0, 2, 4, 6], device=blocks.device, dtype=torch.int32).view(1, 1, 4, 1)
    qh = ((levels >> 4) << shifts).sum(dim=2).reshape(-1, 64)
    out = torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), sc.to(torch.int8).view(torch.uint8), d_bytes], dim=1)
    return torch.where(zero, torch.zeros_like(out), out)  # an all-zero super-block: every byte 0


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, levels = _q3(blocks.reshape(-1, 16))
    scales, levels = scales.reshape(-1, 16), levels.reshape(-1, 16, 16)
    peak = _signed_absmax(scales).unsqueeze(1)
    has = peak != 0
    iscale = -32 / torch.where(has, peak, torch.ones_like(peak))
    ls = torch.where(has, (iscale * scales).round().clamp(-32, 31) + 32, torch.zeros_like(scales)).to(torch.int32)
    d_bytes, d = _fp16(torch.where(has, 1 / iscale, torch.zeros_like(iscale)))
    step = (d * (ls - 32)).unsqueeze(2)
    x = blocks.reshape(-1, 16, 16)
    fresh = (x / torch.where(step == 0, torch.ones_like(step), step)).round().clamp(-4, 3) + 4
    levels = torch.where(step != 0, fresh, levels).to(torch.int32).reshape(-1, 8, 32)
    high = (levels > 3).to(torch.int32)
    shifts = torch.arange(8, device=blocks.device, dtype=torch.int32).view(1, 8, 1)
    hmask = (high << shifts).sum(dim=1)  # bit b of byte m: value 32 * b + m has its third bit set
    low = (levels - 4 * high).reshape(-1, 2, 4, 32)
    qs = (low << (2 * shifts.view(1, 1, 8, 1)[:, :, :4])).sum(dim=2).reshape(-1, 64)
    sc = torch.zeros(ls.shape[0], 12, dtype=torch.int32, device=ls.device)
    sc[:, 0:8] = (ls[:, 0:8] & 15) | ((ls[:, 8:16] & 15) << 4)
    hi2 = (ls >> 4).reshape(-1, 4, 4)  # scale j: bits 4-5 go to byte 8 + j % 4 at bit 2 * (j // 4)
    sc[:, 8:12] = (hi2 << (2 * shifts.view(1, 8, 1)[:, :4])).sum(dim=1)
    return torch.cat([hmask.to(torch.uint8), qs.to(torch.uint8), sc.to(torch.uint8), d_bytes], dim=1)


_PACKERS = {"Q8_0": _q8_0, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize_blocks(x: torch.Tensor, qtype: str, chunk: int = 1 << 22) -> torch.Tensor:
    """``[..., cols]`` float -> ``[..., cols // block * block_bytes]`` uint8 in ggml's layout of ``qtype``
    (``Q8_0``, ``Q3_K``, ``Q4_K``, ``Q5_K``, ``Q6_K``), computed on ``x``'s device ``chunk`` values at a time.

    Raises ``ValueError`` for another type or a row length that is not a multiple of the type's block (32 for
    Q8_0, ``QK_K = 256`` for the K-quants).
    """
    if qtype not in _PACKERS:
        raise ValueError(f"quantize_blocks: {qtype!r} is not one of {', '.join(TORCH_QUANT_TYPES)}")
    block = BLOCK_VALUES[qtype]
    if x.ndim == 0 or x.shape[-1] % block:
        raise ValueError(f"{qtype} needs rows of a multiple of {block} values, got shape {tuple(x.shape)}")
    flat = x.detach().reshape(-1, block).to(torch.float32)
    step = max(1, chunk // block)
    packed = torch.cat([_PACKERS[qtype](flat[i:i + step]) for i in range(0, flat.shape[0], step)])
    return packed.reshape(*x.shape[:-1], x.shape[-1] // block * BLOCK_BYTES[qtype])
