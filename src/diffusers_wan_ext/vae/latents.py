"""Latent normalisation of a stock Diffusers ``AutoencoderKLWan``, and the two facts about its layout that every
encode / decode path of this package shares.

* :func:`latent_stats`, :func:`normalize_latents`, :func:`denormalize_latents`: the pipeline latent is the raw
  posterior mean normalised per channel, ``(mu - mean) * (1 / std)`` with the VAE config's ``latents_mean`` /
  ``latents_std`` (``1 / std`` in fp32, as the Wan code computes it);
* :func:`patch_size`: the spatial patchify factor of the VAE (2 for Wan2.2, ``None`` for Wan2.1);
* :func:`causal_conv_count`: the number of ``WanCausalConv3d`` in an encoder / decoder, i.e. the length of the stock
  causal feature-cache list.

This is the bottom of :mod:`diffusers_wan_ext.vae`: it imports nothing of the package.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

__all__ = ["causal_conv_count", "denormalize_latents", "latent_stats", "normalize_latents", "patch_size"]


def causal_conv_count(module: torch.nn.Module) -> int:
    """Number of ``WanCausalConv3d`` in ``module`` (the length of its stock ``feat_cache`` list)."""
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


def patch_size(vae) -> int | None:
    """The VAE's spatial patchify factor (``vae.config.patch_size``), ``None`` when it does not patchify."""
    p = vae.config.patch_size
    return None if p in (None, 1) else int(p)


def latent_stats(vae, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, 1 / std)`` as ``[1, z, 1, 1, 1]`` tensors (``1 / std`` computed in fp32, as the Wan code does)."""
    mean = vae.config.latents_mean if mean is None else mean
    std = vae.config.latents_std if std is None else std
    m = torch.tensor(list(mean), dtype=torch.float32)
    inv = 1.0 / torch.tensor(list(std), dtype=torch.float32)
    shape = (1, len(m), 1, 1, 1)
    return m.view(shape).to(device=device, dtype=dtype), inv.view(shape).to(device=device, dtype=dtype)


def normalize_latents(vae, mu: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """Pipeline latent from the raw mean: ``(mu - mean) * (1 / std)``."""
    m, inv = latent_stats(vae, mean, std, device=mu.device, dtype=mu.dtype)
    return (mu - m) * inv


def denormalize_latents(vae, z: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """Raw latent from the pipeline latent: ``z / (1 / std) + mean``."""
    m, inv = latent_stats(vae, mean, std, device=z.device, dtype=z.dtype)
    return z / inv + m
