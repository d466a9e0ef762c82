"""Faster, leaner Wan VAE decode on stock ``AutoencoderKLWan``, without changing its weights or API.

:func:`optimize_vae` installs, on a stock Diffusers ``AutoencoderKLWan`` (Wan2.1 decoder of ``WanUpBlock`` s, or the
Wan2.2 one of ``WanResidualUpBlock`` s with ``DupUp3D`` shortcuts and ``patch_size=2``):

* **channels-last convolutions** -- conv weights (and the fast decode's activations) channels-last, so cuDNN runs
  its NDHWC implicit-GEMM kernels with no layout transposes around them;
* **a fast streaming decode** (:class:`~.decode_session.WanDecodeSession`, behind ``vae.decode``) that runs the
  stock decoder's modules, one latent frame at a time with the causal cache as stock does, but:

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
counted (cuDNN's workspace comes on top). Stock has, on top of that, the ``cat`` and ``F.pad`` copies of each conv
input (0.43 GiB each), fp32 temporaries of the norm (0.57 GiB each), the cache clones and, at the end, two copies of
the video: 4.19 GiB counted. :func:`~.peak_memory.estimate_decode_peak` counts it for any VAE and latent shape on the
meta device, without a GPU (stock or fast path).

The fast decode steps aside for the stock one (same results, stock speed) when ``vae.use_tiling`` applies to the
latent, when the decoder's modules carry hooks (group offloading, layerwise casting, accelerate's sequential
offload), while gradients are being recorded (the kernel has no backward), or when the latent is not on the
decoder's device. ``enable_slicing`` works (stock ``decode`` calls the replaced ``_decode`` per slice), and
:class:`~.streaming.WanStreamingVAEDecoder` uses a :class:`~.decode_session.WanDecodeSession` when the fast decode is installed (its cache lives between calls, as the stock one does).

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

from .decode_session import CACHE_T, WanDecodeSession, pointwise_conv
from .latents import patch_size
from .norm_kernel import rms_norm_act, uses_triton, wan_norm_weight

__all__ = ["fast_decode_session", "fast_decode_unsupported", "optimize_vae", "restore_vae"]


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
    x = pointwise_conv(vae.post_quant_conv, z)
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

