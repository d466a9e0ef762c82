"""Faster Wan VAE decode on stock ``AutoencoderKLWan``, without changing its weights or API.

:func:`optimize_vae` applies two measured changes (see ``docs/benchmarks.md``):

* **channels-last convolutions** -- the 3D/2D conv weights are stored channels-last, so cuDNN runs its NDHWC
  implicit-GEMM kernels and the per-call NCDHW<->NDHWC transposes disappear;
* **fused norm + SiLU** -- each residual block's ``RMS_norm -> SiLU`` pair (six elementwise passes in eager mode, one
  of them in fp32) becomes one compiled kernel (``torch.compile`` of a small function with dynamic shapes, so it
  compiles once for every resolution). The block's causal-cache logic is the stock one, re-stated.

The decode stays streaming (one latent frame at a time with the causal cache), as stock does. Numerics: the fused
norm rounds to bf16 once instead of after the normalisation, so bf16 outputs differ from stock by about one bf16 ulp;
fp32 VAEs are unchanged up to float rounding.

Example:
    >>> from diffusers_wan_ext.runtime import optimize_vae
    >>> optimize_vae(pipe.vae)  # doctest: +SKIP
    {'channels_last': True, 'fused_blocks': 30}
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

CACHE_T = 2  # frames of causal context kept per conv (as in the stock VAE)


def _norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    y = F.normalize(x.float(), dim=1) * (scale * gamma.float())
    return F.silu(y).to(x.dtype)


_COMPILED: dict[str, object] = {}


def _norm_silu_fn(compile: bool):
    if not compile:
        return _norm_silu
    if "norm_silu" not in _COMPILED:
        _COMPILED["norm_silu"] = torch.compile(_norm_silu, dynamic=True)
    return _COMPILED["norm_silu"]


def _cached_conv(conv: nn.Module, x: torch.Tensor, feat_cache, feat_idx) -> torch.Tensor:
    """Stock causal-cache step around one ``WanCausalConv3d`` (keep the last CACHE_T input frames for the next chunk)."""
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
    norm_silu = self._wan_norm_silu
    h = self.conv_shortcut(x)
    x = norm_silu(x, self.norm1.gamma, self.norm1.scale)
    x = _cached_conv(self.conv1, x, feat_cache, feat_idx)
    x = self.dropout(norm_silu(x, self.norm2.gamma, self.norm2.scale))
    x = _cached_conv(self.conv2, x, feat_cache, feat_idx)
    return x + h


def _fusable(block: nn.Module) -> bool:
    return (isinstance(getattr(block, "nonlinearity", None), nn.SiLU)
            and all(isinstance(getattr(block.get_submodule(n), "bias", None), float) for n in ("norm1", "norm2")))


def optimize_vae(vae: nn.Module, *, channels_last: bool = True, fuse_norm_act: bool = True,
                 compile: bool | None = None) -> dict:
    """Speed up ``AutoencoderKLWan`` decode (and encode) in place; returns what was changed.

    Args:
        vae: a stock Diffusers ``AutoencoderKLWan`` (Wan2.1 or Wan2.2 configuration).
        channels_last: store conv weights channels-last (CUDA; harmless elsewhere).
        fuse_norm_act: replace each residual block's norm + SiLU by one fused function.
        compile: compile the fused function (default: when the VAE is on CUDA).

    :func:`restore_vae` undoes the forward replacement (weights keep their values in either layout).
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock

    device = next(vae.parameters()).device
    compile = device.type == "cuda" if compile is None else compile
    if channels_last:
        for m in vae.modules():
            if isinstance(m, (nn.Conv3d, nn.Conv2d)):
                fmt = torch.channels_last_3d if m.weight.ndim == 5 else torch.channels_last
                m.weight.data = m.weight.data.to(memory_format=fmt)
    fused = 0
    if fuse_norm_act:
        fn = _norm_silu_fn(compile)
        for m in vae.modules():
            if isinstance(m, WanResidualBlock) and _fusable(m):
                m._wan_norm_silu = fn
                m.forward = types.MethodType(_fused_residual_forward, m)
                fused += 1
    return {"channels_last": channels_last, "fused_blocks": fused, "compiled": compile and fused > 0}


def restore_vae(vae: nn.Module) -> None:
    """Undo :func:`optimize_vae`'s forward replacement (conv weights go back to contiguous layout)."""
    for m in vae.modules():
        if "forward" in vars(m) and hasattr(m, "_wan_norm_silu"):
            del m.forward
            del m._wan_norm_silu
        if isinstance(m, (nn.Conv3d, nn.Conv2d)):
            m.weight.data = m.weight.data.contiguous()
