"""Faster, leaner Wan VAE decode on stock ``AutoencoderKLWan``, without changing its weights or API.

:func:`optimize_vae` installs, on a stock Diffusers ``AutoencoderKLWan`` (Wan2.1 decoder of ``WanUpBlock`` s, or the
Wan2.2 one of ``WanResidualUpBlock`` s with ``DupUp3D`` shortcuts and ``patch_size=2``):

* **channels-last convolutions** -- conv weights (and the fast decode's activations) channels-last, so cuDNN runs
  its NDHWC implicit-GEMM kernels with no layout transposes around them;
* **a fast streaming decode** (:class:`WanDecodeSession`, behind ``vae.decode``) that runs the stock decoder's
  modules, one latent frame at a time with the causal cache as stock does, but:

  - every causal 3D conv runs ``F.conv3d(buf, weight, bias, padding=(0, ph, pw))`` on one input buffer
    ``[2 cached frames | new frames]`` (cuDNN pads H / W implicitly). The producer of the new frames -- the fused
    RMS norm + SiLU kernel (:mod:`.norm_kernel`) -- writes straight into the buffer, and the last two frames are then
    copied into the conv's persistent 2-frame cache. Stock builds the same input with ``torch.cat([cache, x])``
    and ``F.pad`` (two full copies) and keeps ``x[:, :, -2:].clone()`` caches;
  - the norm (+ SiLU) of the residual blocks, of the decoder head (``norm_out``) and of the mid attention block is
    one Triton kernel (no ``torch.compile``: nothing to recompile);
  - residual adds in place, the ``DupUp3D`` shortcut added as a broadcast view (no ``repeat_interleave`` copy),
    the time interleave of ``upsample3d`` and the nearest 2x upsample done by one copy into the channels-last
    input of the resample conv2d, the attention block run on channels-last views;
  - the output video is allocated once and every chunk is written (un-patchified for Wan2.2) and clamped in place
    (stock concatenates the growing video once per latent frame).

  Stock's causal-cache rules are reproduced exactly: a conv's history starts as two zero frames (stock's zero
  padding of the first chunk) and is always "the last two frames seen" (stock's ``cache_x.shape[2] < 2`` rule);
  an ``upsample3d`` resample skips its time conv on the first chunk and starts its history there (stock's
  ``"Rep"``); ``DupUp3D`` drops its first ``factor_t - 1`` frames on the first chunk.

Peak memory (what is alive at the peak): the fast decode's peak is inside a full-resolution residual block of a
later chunk (4 frames). For Wan2.1 at 480x832x81 in bf16: the output video (0.18 GiB), the 2-frame caches of all 32
causal convs (1.76 GiB; 1.0 of it for the 7 convs at full resolution -- stock keeps the same), the block input
(0.29), the first conv's output (0.29) and one 6-frame conv input buffer (0.43), plus the weights (0.24): 3.18 GiB
counted (cuDNN's workspace comes on top). Stock has, on top of that, the ``cat`` and ``F.pad`` copies of each conv input (0.43
GiB each), fp32 temporaries of the norm (0.57 GiB each), the cache clones and, at the end, two copies of the video:
4.19 GiB counted. :func:`~.peak_memory.estimate_decode_peak` counts it for any VAE and latent shape on the meta device, without a
GPU (stock or fast path).

The fast decode steps aside for the stock one (same results, stock speed) when ``vae.use_tiling`` applies to the
latent, when the decoder's modules carry hooks (group offloading, layerwise casting, accelerate's sequential
offload), while gradients are being recorded (the kernel has no backward), or when the latent is not on the
decoder's device. ``enable_slicing`` works (stock ``decode`` calls the replaced ``_decode`` per slice), and
:class:`~diffusers_wan_ext.vae.streaming.WanStreamingVAEDecoder` uses a :class:`WanDecodeSession` when the
fast decode is installed (its cache lives between calls, as the stock one does).

Residual blocks outside the fast decode (the encoder, stock fallbacks) get the fused norm + SiLU in their stock
causal-cache logic.

Numerics: the fused norm rounds once instead of after the normalisation and after the SiLU, so bf16 outputs differ
from stock by about one bf16 ulp; fp32 VAEs match stock to float rounding.

Example:
    >>> from diffusers_wan_ext.runtime import optimize_vae
    >>> optimize_vae(pipe.vae)  # doctest: +SKIP
    {'channels_last': True, 'fused_blocks': 30, 'compiled': False, 'fast_decode': True, 'fast_decode_reason': None,
     'decoder': 'wan2.1', 'norm_kernel': 'triton'}
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    DupUp3D,
    WanAttentionBlock,
    WanCausalConv3d,
    WanDecoder3d,
    WanMidBlock,
    WanResample,
    WanResidualBlock,
    WanResidualUpBlock,
    WanRMS_norm,
    WanUpBlock,
    WanUpsample,
)
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import nn

from .latents import patch_size
from .norm_kernel import rms_norm_act, uses_triton, wan_norm_weight

__all__ = ["WanDecodeSession", "fast_decode_session", "fast_decode_unsupported", "optimize_vae", "restore_vae"]

CACHE_T = 2  # frames of causal context kept per conv (as in the stock VAE)


# ----------------------------------------------------------------------------------------------------------------
# Fused norm + SiLU inside the stock residual-block forward (encoder; stock decode fallbacks)
# ----------------------------------------------------------------------------------------------------------------


def _grad_needed(x: torch.Tensor, module: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``SiLU(norm(x))`` of a ``WanRMS_norm``, fused (the differentiable PyTorch math while gradients are recorded)."""
    if _grad_needed(x, norm):
        return F.silu(norm(x))
    weight, bias = wan_norm_weight(norm)
    return rms_norm_act(x, weight.to(x.device), None if bias is None else bias.to(x.device), silu=True)


def _cached_conv(conv: nn.Module, x: torch.Tensor, feat_cache, feat_idx) -> torch.Tensor:
    """Stock causal-cache step around one ``WanCausalConv3d`` (keeps the last CACHE_T input frames for later)."""
    if feat_cache is None:
        return conv(x)
    idx = feat_idx[0]
    cache_x = x[:, :, -CACHE_T:].clone()
    if cache_x.shape[2] < 2 and feat_cache[idx] is not None:
        cache_x = torch.cat([feat_cache[idx][:, :, -1:].to(cache_x.device), cache_x], dim=2)
    out = conv(x, feat_cache[idx])
    feat_cache[idx] = cache_x
    feat_idx[0] += 1
    return out


def _fused_residual_forward(self, x, feat_cache=None, feat_idx=[0]):  # noqa: B006 - mirrors the stock signature
    h = self.conv_shortcut(x)
    x = _cached_conv(self.conv1, _norm_silu(self.norm1, x), feat_cache, feat_idx)
    x = _cached_conv(self.conv2, self.dropout(_norm_silu(self.norm2, x)), feat_cache, feat_idx)
    return x + h


def _fusable(block: nn.Module) -> bool:
    return isinstance(getattr(block, "nonlinearity", None), nn.SiLU)


# ----------------------------------------------------------------------------------------------------------------
# Fast streaming decode
# ----------------------------------------------------------------------------------------------------------------


def _causal_history(conv: nn.Module) -> int:
    """Frames of causal zero padding of a ``WanCausalConv3d`` (2 for the cached 3-tap convs, 0 for 1x1x1)."""
    return int(conv._padding[4])


def _check_causal_conv(name: str, conv: nn.Module) -> str | None:
    history = _causal_history(conv)
    if tuple(conv.stride) != (1, 1, 1) or tuple(conv.dilation) != (1, 1, 1) or conv.groups != 1:
        return f"{name}: strided, dilated or grouped causal conv"
    if history not in (0, CACHE_T) or history != conv.kernel_size[0] - 1 or conv._padding[5] != 0:
        return f"{name}: causal conv with temporal kernel {conv.kernel_size[0]} and padding {conv._padding}"
    if conv._padding[0] != conv._padding[1] or conv._padding[2] != conv._padding[3]:
        return f"{name}: asymmetric spatial padding {conv._padding}"
    return None


def _check_resample(name: str, m: nn.Module) -> str | None:
    if m.mode not in ("upsample2d", "upsample3d"):
        return f"{name}: resample mode {m.mode!r} in the decoder"
    up, conv = m.resample[0], m.resample[1]
    scale = up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor,) * 2
    if up.mode not in ("nearest", "nearest-exact") or tuple(float(s) for s in scale) != (2.0, 2.0) or up.size:
        return f"{name}: upsample {up.mode} x{scale}"
    if conv.padding_mode != "zeros":
        return f"{name}: conv2d padding mode {conv.padding_mode}"
    return None


def _check_dup(name: str, m: nn.Module) -> str | None:
    return None if m.out_channels * m.factor % m.in_channels == 0 else f"{name}: DupUp3D channel counts"


def fast_decode_unsupported(vae: nn.Module) -> str | None:
    """Why the fast decode cannot run this VAE's decoder (``None``: it can)."""
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, WanDecoder3d):
        return "not a Diffusers WanDecoder3d"
    if not isinstance(decoder.nonlinearity, nn.SiLU):
        return "decoder head activation is not SiLU"
    checks: dict[type, Callable[[str, nn.Module], str | None]] = {
        WanCausalConv3d: _check_causal_conv,
        WanResample: _check_resample,
        DupUp3D: _check_dup,
        WanResidualBlock: lambda n, m: None if _fusable(m) else f"{n}: activation is not SiLU",
    }
    known = (WanDecoder3d, WanMidBlock, WanAttentionBlock, WanUpBlock, WanResidualUpBlock,
             WanRMS_norm, WanUpsample, nn.Conv2d, nn.Dropout, nn.Identity, nn.SiLU, nn.ModuleList,
             nn.Sequential, *checks)
    for name, m in decoder.named_modules():
        if type(m) not in known:
            return f"decoder.{name}: unknown module {type(m).__name__}"
        check = checks.get(type(m))
        reason = check(f"decoder.{name}", m) if check else None
        if reason:
            return reason
    return None


def _skip_reason(vae: nn.Module, z: torch.Tensor) -> str | None:
    """Why this call takes the stock decode (``None``: the fast one runs)."""
    height, width = z.shape[-2:]
    ratio = vae.spatial_compression_ratio
    if vae.use_tiling and (width > vae.tile_sample_min_width // ratio or height > vae.tile_sample_min_height // ratio):
        return "tiling"
    modules = [vae.post_quant_conv, *vae.decoder.modules()]
    if any(hasattr(m, "_diffusers_hook") or hasattr(m, "_hf_hook") for m in modules):
        return "hooks on decoder modules"
    if torch.is_grad_enabled() and (z.requires_grad or any(p.requires_grad for p in vae.decoder.parameters())):
        return "gradients enabled"
    if vae.decoder.training and any(m.p > 0 for m in vae.decoder.modules() if isinstance(m, nn.Dropout)):
        return "dropout in training mode"
    if vae.decoder.conv_in.weight.device != z.device:
        return "latent and decoder on different devices"
    return None


def _pointwise_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ``WanCausalConv3d`` without temporal context (1x1x1 shortcut, post_quant_conv): no cache, no padding copy."""
    return F.conv3d(x, conv.weight, conv.bias, 1, (0, conv._padding[2], conv._padding[0]))


def _to_5d(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*T, C, H, W) per-frame tensor -> (B, C, T, H, W) view (channels-last 2D frames give channels-last 3D)."""
    return frames.unflatten(0, (batch, -1)).transpose(1, 2)


class WanDecodeSession:
    """Causal decode state of one video over a stock ``WanDecoder3d`` (the fast path of :func:`optimize_vae`).

    ``step(x)`` decodes the next latent frame (``x``: (B, z_dim, 1, h, w), after ``post_quant_conv``) and returns
    the decoder output for it (before un-patchify and clamp), exactly as stock ``vae.decoder(x, feat_cache,
    feat_idx, first_chunk)`` does with a cache carried from frame to frame. The session owns a persistent 2-frame
    cache per causal conv (made on first use, at the video's size) and reads the weights of the VAE's modules at
    each step. Use it under ``torch.no_grad()``.

    The decoder is run as a flat plan of ``(step, module)`` pairs over one activation slot (``self._x``): each step
    takes the activation out of the slot and puts its result back, so no caller keeps a block's input alive
    while the block runs (each full-resolution activation of Wan2.1 is 0.29 GiB at 480x832x4 in bf16).

    Args:
        vae: a stock ``AutoencoderKLWan``.
        channels_last: run activations channels-last (default: whatever :func:`optimize_vae` chose, else True).
    """

    def __init__(self, vae: nn.Module, channels_last: bool | None = None) -> None:
        if channels_last is None:
            channels_last = getattr(vae, "_wan_fast_decode", {}).get("channels_last", True)
        self.vae = vae
        self.decoder = vae.decoder
        self.fmt5 = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.fmt4 = torch.channels_last if channels_last else torch.contiguous_format
        self.frames = 0  # latent frames decoded so far
        self._first = True
        self._x: torch.Tensor | None = None  # the activation between plan steps
        self._x_in: torch.Tensor | None = None  # a residual up block's input, for its DupUp3D shortcut
        self._cache: dict[nn.Module, torch.Tensor] = {}
        self._norm: dict[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._started: set[nn.Module] = set()  # upsample3d resamples past their first chunk
        self._plan = self._make_plan()

    def _make_plan(self) -> list[tuple[Callable[..., None], nn.Module]]:
        # plain functions, not bound methods: a plan of bound methods is a reference cycle (session -> plan ->
        # method -> session) that keeps every conv cache alive until the garbage collector runs
        cls = type(self)
        dec = self.decoder
        mid = dec.mid_block
        plan = [(cls._conv_in, dec.conv_in), (cls._resnet, mid.resnets[0])]
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            plan += [(cls._attention, attn)] if attn is not None else []
            plan.append((cls._resnet, resnet))
        # per up-block kind: (upsampler, DupUp3D shortcut or None)
        parts: dict[type, Callable[[nn.Module], tuple[nn.Module | None, nn.Module | None]]] = {
            WanUpBlock: lambda b: (b.upsamplers[0] if b.upsamplers is not None else None, None),
            WanResidualUpBlock: lambda b: (b.upsampler, b.avg_shortcut),
        }
        for block in dec.up_blocks:
            upsampler, dup = parts[type(block)](block)
            plan += [(cls._keep_input, block)] if dup is not None else []
            plan += [(cls._resnet, resnet) for resnet in block.resnets]
            plan += [(cls._resample, upsampler)] if upsampler is not None else []
            plan += [(cls._dup_up_add, dup)] if dup is not None else []
        plan.append((cls._head, dec))
        return plan

    def _take(self) -> torch.Tensor:
        x, self._x = self._x, None
        return x

    # -- building blocks -----------------------------------------------------------------------------------------

    def _norm_params(self, norm: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if norm not in self._norm:
            weight, bias = wan_norm_weight(norm)
            self._norm[norm] = (weight.to(device), None if bias is None else bias.to(device))
        return self._norm[norm]

    def _norm_into(self, norm: nn.Module | None, x: torch.Tensor, out: torch.Tensor, silu: bool = True) -> None:
        if norm is None:
            out.copy_(x)
        else:
            weight, bias = self._norm_params(norm, x.device)
            rms_norm_act(x, weight, bias, silu=silu, out=out)

    def _conv_input(self, conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(buf, new)``: the conv's input buffer with its history in front, and the view where the new frames go."""
        b, c, t, h, w = x.shape
        buf = torch.empty((b, c, t + CACHE_T, h, w), dtype=x.dtype, device=x.device, memory_format=self.fmt5)
        cache = self._cache.get(conv)
        if cache is None:  # first chunk: stock pads with zero frames
            buf[:, :, :CACHE_T].zero_()
        elif cache.shape != (b, c, CACHE_T, h, w):
            raise ValueError(f"latent size changed within one decode: cache {tuple(cache.shape)}, input "
                             f"{tuple(x.shape)} (start a new session / video)")
        else:
            buf[:, :, :CACHE_T].copy_(cache)
        return buf, buf[:, :, CACHE_T:]

    def _conv_run(self, conv: nn.Module, buf: torch.Tensor) -> torch.Tensor:
        """The causal conv on its filled buffer; keeps the buffer's last two frames as the conv's history."""
        pad = (0, conv._padding[2], conv._padding[0])
        out = F.conv3d(buf, conv.weight, conv.bias, 1, pad)
        cache = self._cache.get(conv)
        if cache is None:
            cache = self._cache[conv] = torch.empty_like(buf[:, :, :CACHE_T], memory_format=self.fmt5)
        cache.copy_(buf[:, :, -CACHE_T:])
        return out

    # -- plan steps (each takes self._x and puts its result back) -----------------------------------------------

    def _conv_in(self, conv: nn.Module) -> None:
        x = self._take()
        buf, new = self._conv_input(conv, x)
        new.copy_(x)
        del x, new
        self._x = self._conv_run(conv, buf)

    def _resnet(self, block: nn.Module) -> None:
        x = self._take()
        shortcut = block.conv_shortcut
        h = x if isinstance(shortcut, nn.Identity) else _pointwise_conv(shortcut, x)
        buf, new = self._conv_input(block.conv1, x)
        self._norm_into(block.norm1, x, new)
        del x, new  # an identity shortcut keeps it as h
        y = self._conv_run(block.conv1, buf)
        del buf  # the next conv's buffer takes its place
        buf, new = self._conv_input(block.conv2, y)
        self._norm_into(block.norm2, y, new)
        del y, new  # conv1's output is dead before conv2 allocates its own
        self._x = self._conv_run(block.conv2, buf).add_(h)

    def _attention(self, attn: nn.Module) -> None:
        x = self._take()
        b, c, t, h, w = x.shape
        xn = torch.empty_like(x, memory_format=self.fmt5)
        self._norm_into(attn.norm, x, xn, silu=False)
        frames = xn.transpose(1, 2).reshape(b * t, c, h, w)
        del xn
        qkv = F.conv2d(frames, attn.to_qkv.weight, attn.to_qkv.bias)
        del frames
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # (B*T, 1, H*W, C) each
        o = F.scaled_dot_product_attention(q, k, v)
        del q, k, v, qkv
        o = o.squeeze(1).transpose(1, 2).unflatten(2, (h, w))
        self._x = _to_5d(F.conv2d(o, attn.proj.weight, attn.proj.bias), b).add_(x)

    def _resample(self, m: nn.Module) -> None:
        x = self._take()
        b, c, t, h, w = x.shape
        if m.mode == "upsample3d" and m in self._started:
            buf, new = self._conv_input(m.time_conv, x)
            new.copy_(x)
            del x, new
            y = self._conv_run(m.time_conv, buf)  # (B, 2C, T, H, W); channel block j is output frame 2t + j
            del buf
            src = y.unflatten(1, (2, c)).permute(0, 3, 1, 2, 4, 5)
        else:  # upsample2d, or the first chunk of upsample3d (stock "Rep": no time conv)
            if m.mode == "upsample3d":
                self._started.add(m)
            src = x.transpose(1, 2).unsqueeze(2)
            del x
        t_out = src.shape[1] * src.shape[2]
        # time interleave + nearest 2x upsample, one copy into the conv2d's channels-last input
        up = torch.empty((b * t_out, c, 2 * h, 2 * w), dtype=src.dtype, device=src.device, memory_format=self.fmt4)
        dst = up.unflatten(0, src.shape[:3]).unflatten(4, (h, 2)).unflatten(6, (w, 2))  # (B, T, J, C, H, 2, W, 2)
        dst.copy_(src[:, :, :, :, :, None, :, None])
        del dst
        del src
        conv = m.resample[1]
        out = F.conv2d(up, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        self._x = _to_5d(out, b)

    def _keep_input(self, block: nn.Module) -> None:
        self._x_in = self._x

    def _dup_up_add(self, dup: nn.Module) -> None:
        """``x += DupUp3D(x_in)`` with the repeated channels as a broadcast view where the layout allows."""
        x, x_in, self._x_in = self._take(), self._x_in, None
        b, c_in, t, h, w = x_in.shape
        ft, fs, reps, c_out = dup.factor_t, dup.factor_s, dup.repeats, dup.out_channels
        if dup.factor % reps == 0:  # channel k = c * reps + r of the repeat is (o, dt, a, b) of the view
            per = dup.factor // reps
            src = x_in.unflatten(1, (c_out, per)).unsqueeze(3).expand(b, c_out, per, reps, t, h, w)
        else:
            src = x_in.repeat_interleave(reps, dim=1)
        del x_in
        src = src.reshape(b, c_out, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, O, T, ft, H, fs, W, fs)
        if self._first and ft > 1:  # stock drops the first ft - 1 frames of the first chunk
            src = src.flatten(2, 3)[:, :, ft - 1:].unsqueeze(3)
        target = x.unflatten(2, (src.shape[2], src.shape[3])).unflatten(4, (h, fs)).unflatten(6, (w, fs))
        target.add_(src)
        del target, src
        self._x = x

    def _head(self, dec: nn.Module) -> None:
        x = self._take()
        buf, new = self._conv_input(dec.conv_out, x)
        self._norm_into(dec.norm_out, x, new)
        del x, new
        self._x = self._conv_run(dec.conv_out, buf)

    # -- one latent frame -----------------------------------------------------------------------------------------

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output of the next latent frame ``x`` (B, z_dim, 1, h, w) (already through ``post_quant_conv``)."""
        if x.ndim != 5 or x.shape[2] != 1:
            raise ValueError(f"step takes one latent frame (B, C, 1, h, w), got {tuple(x.shape)}")
        self._first = self.frames == 0
        self._x = x
        del x
        try:
            for run, module in self._plan:
                run(self, module)
            return self._take()
        finally:
            self._x = self._x_in = None
            self.frames += 1

    def release(self) -> None:
        """Free the causal caches and buffers now (the session cannot continue afterwards)."""
        self._cache.clear()
        self._norm.clear()
        self._x = self._x_in = None


def _write_chunk(video: torch.Tensor, y: torch.Tensor, start: int, patch: int | None) -> None:
    """Write decoder output ``y`` at frame ``start`` of ``video`` (un-patchified as stock does), clamped to [-1, 1]."""
    t = y.shape[2]
    dst = video[:, :, start:start + t]
    if patch:  # stock unpatchify: out[c, f, h*p + r, w*p + q] = y[c*p*p + q*p + r, f, h, w]
        h, w = y.shape[-2:]
        dst.unflatten(3, (h, patch)).unflatten(5, (w, patch)).copy_(
            y.unflatten(1, (-1, patch, patch)).permute(0, 1, 4, 5, 3, 6, 2))
    else:
        dst.copy_(y)
    dst.clamp_(-1.0, 1.0)


def _decode_video(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Fast ``_decode`` body: post_quant_conv, the session frame by frame, the video written in place."""
    x = _pointwise_conv(vae.post_quant_conv, z)
    session = WanDecodeSession(vae)
    patch = patch_size(vae)
    frames = z.shape[2]
    video, first_out, start = None, None, 0
    for i in range(frames):
        y = session.step(x[:, :, i:i + 1])
        if video is None and i == 0 and frames > 1:
            first_out = y  # the video's length is known from the second chunk's
            continue
        if video is None:
            prev = first_out.shape[2] if first_out is not None else 0
            total = prev + y.shape[2] * (frames - i)
            b, c, _, h, w = y.shape
            p = patch or 1
            video = torch.empty((b, c // (p * p), total, h * p, w * p), dtype=y.dtype, device=y.device)
            if first_out is not None:
                _write_chunk(video, first_out, 0, patch)
                start, first_out = prev, None
        if start + y.shape[2] > video.shape[2]:
            raise RuntimeError("decoder chunks of unequal length")  # not a Wan decoder
        _write_chunk(video, y, start, patch)
        start += y.shape[2]
        del y
    session.release()
    return video


def _fast_decode(self, z: torch.Tensor, return_dict: bool = True):
    """Replacement of ``AutoencoderKLWan._decode`` (stock's when :func:`_skip_reason` says so)."""
    if _skip_reason(self, z) is not None:
        return type(self)._decode(self, z, return_dict=return_dict)
    out = _decode_video(self, z)
    if not return_dict:
        return (out,)
    return DecoderOutput(sample=out)


def fast_decode_session(vae: nn.Module, z: torch.Tensor | None = None) -> WanDecodeSession | None:
    """A new :class:`WanDecodeSession` when :func:`optimize_vae` installed the fast decode on ``vae`` and it applies
    (to latent ``z``, tiling aside), else ``None`` (take the stock path)."""
    if "_decode" not in vars(vae) or not hasattr(vae, "_wan_fast_decode"):
        return None
    if z is not None:
        reason = _skip_reason(vae, z)
        if reason not in (None, "tiling"):
            return None
    return WanDecodeSession(vae)


# ----------------------------------------------------------------------------------------------------------------
# Install / restore
# ----------------------------------------------------------------------------------------------------------------


def optimize_vae(vae: nn.Module, *, channels_last: bool = True, fuse_norm_act: bool = True,
                 compile: bool | None = None, fast_decode: bool = True) -> dict:
    """Speed up ``AutoencoderKLWan`` decode (and encode) in place; returns what was changed.

    Args:
        vae: a stock Diffusers ``AutoencoderKLWan`` (Wan2.1 or Wan2.2 configuration).
        channels_last: store conv weights channels-last (and run the fast decode's activations channels-last).
        fuse_norm_act: the fused norm + SiLU kernel in every residual block's stock forward (encoder, fallbacks).
        compile: accepted for compatibility and ignored (the fused norm is a Triton kernel now, nothing compiles).
        fast_decode: install the fast streaming decode behind ``vae.decode`` (see the module docstring).

    Returns ``{"channels_last", "fused_blocks", "compiled" (always False), "fast_decode", "fast_decode_reason"
    (why not, or None), "decoder" ("wan2.1" / "wan2.2"), "norm_kernel" ("triton" on CUDA, else "torch")}``.
    :func:`restore_vae` undoes it (weights keep their values in either layout).
    """
    weight = next(vae.parameters())
    if channels_last:
        for m in vae.modules():
            if isinstance(m, (nn.Conv3d, nn.Conv2d)):
                fmt = torch.channels_last_3d if m.weight.ndim == 5 else torch.channels_last
                m.weight.data = m.weight.data.to(memory_format=fmt)
    fused = 0
    if fuse_norm_act:
        for m in vae.modules():
            if isinstance(m, WanResidualBlock) and _fusable(m):
                m._wan_norm_silu = True
                m.forward = types.MethodType(_fused_residual_forward, m)
                fused += 1
    reason = fast_decode_unsupported(vae) if fast_decode else "not requested"
    if reason is None:
        vae._wan_fast_decode = {"channels_last": channels_last}
        vae._decode = types.MethodType(_fast_decode, vae)
    is_residual = bool(getattr(vae.config, "is_residual", False))
    return {"channels_last": channels_last, "fused_blocks": fused, "compiled": False, "fast_decode": reason is None,
            "fast_decode_reason": reason, "decoder": "wan2.2" if is_residual else "wan2.1",
            "norm_kernel": "triton" if uses_triton(weight) else "torch"}


def restore_vae(vae: nn.Module) -> None:
    """Undo :func:`optimize_vae` (stock forwards and decode; conv weights back to contiguous layout)."""
    for m in vae.modules():
        if "forward" in vars(m) and hasattr(m, "_wan_norm_silu"):
            del m.forward
            del m._wan_norm_silu
        if isinstance(m, (nn.Conv3d, nn.Conv2d)):
            m.weight.data = m.weight.data.contiguous()
    if "_decode" in vars(vae):
        del vae._decode
    vars(vae).pop("_wan_fast_decode", None)

