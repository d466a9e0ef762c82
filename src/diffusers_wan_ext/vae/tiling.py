"""DiffSynth-Studio tiled encode / decode on a stock Diffusers ``AutoencoderKLWan``, and the untiled building blocks
they run per tile (:func:`encode_mean`, :func:`decode_unclamped`).

The latent normalisation they apply per tile is :mod:`.latents`; the untiled decode is one pass of the
:class:`~.streaming.WanStreamingVAEDecoder` over the whole latent.

Why our own tiling
------------------
Stock ``AutoencoderKLWan.tiled_encode`` / ``tiled_decode`` cut the input into tiles of ``tile_sample_min_*`` pixels,
blend each tile into its left / upper neighbour with the linear weights ``1 - y / extent`` over the overlap and then
*crop* every tile to its stride.  The Wan pipelines of DiffSynth-Studio (``WanVideoVAE.tiled_encode`` /
``tiled_decode``, ``diffsynth/models/wan_video_vae.py``), which our golden fixtures follow, do something different:

* tile size and stride are given **in latent units** (pipeline default ``tile_size=(30, 52)``,
  ``tile_stride=(15, 26)``); the tiles, the slices they run on, where their outputs land and their blend masks
  are :func:`~.tile_enumeration.tile_grid` / :func:`~.tile_enumeration.blend_mask` (the exact enumeration,
  border clamp and skip rule are described in :mod:`.tile_enumeration`);
* every tile is encoded / decoded whole (encode: normalised latent ``(mu - mean) * (1 / std)``; decode:
  ``z / (1 / std) + mean`` then the decoder, *not* clamped);
* the result is ``sum(mask * tile) / sum(mask)`` (accumulated on CPU by default, in tile order); decode clamps the
  blended video to ``[-1, 1]``.

Shapes, as in the reference: encode gives ``[B, z, 1 + (T - 1) // 4, H // f, W // f]`` -- frames after the last
full chunk of 4 are dropped when ``T`` is not ``4 n + 1``, and the Wan2.1 encoder floors a size that is not a
multiple of 8 (so does each tile's slice); the Wan2.2 encoder (2x2 patchify, average-pool shortcuts) needs ``H`` and
``W`` to be multiples of 16, checked up front by :func:`check_encode_size`.  Decode gives ``4 T - 3`` frames of
``h f x w f`` pixels for any latent size.

The stock code cannot be configured into this (different weights, cropping instead of normalised accumulation), so
:func:`tiled_encode` / :func:`tiled_decode` implement it on top of the stock model's ``encoder`` / ``decoder`` /
``quant_conv`` / ``post_quant_conv`` modules.  They run each tile through the same causal temporal chunking as
``AutoencoderKLWan._encode`` / ``_decode`` (first frame alone, then chunks of 4 frames; one latent frame at a time),
with their own feature caches, regardless of ``vae.use_tiling`` / ``use_slicing``.

Example:
    >>> latents = tiled_encode(vae, video, tile_size=(30, 52), tile_stride=(15, 26))  # doctest: +SKIP
    >>> video = tiled_decode(vae, latents, tile_size=(30, 52), tile_stride=(15, 26))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

from .latents import causal_conv_count, denormalize_latents, normalize_latents, patch_size
from .streaming import WanStreamingVAEDecoder
from .tile_enumeration import VAETile, blend_mask, tile_grid

__all__ = [
    "check_encode_size",
    "decode_unclamped",
    "encode_mean",
    "tiled_decode",
    "tiled_encode",
]


# ----------------------------------------------------------------------------------------------------------------
# Untiled encode / decode on the stock modules
# ----------------------------------------------------------------------------------------------------------------


def check_encode_size(vae, video: torch.Tensor) -> None:
    """Raise ``ValueError`` (naming the shape) for a video this VAE's encoder cannot take.

    ``video`` must be ``[B, C, T, H, W]`` with ``T >= 1``; a VAE with average-pool shortcuts (``is_residual``, the
    Wan2.2 layout) needs ``H`` and ``W`` to be multiples of ``scale_factor_spatial``.
    """
    if video.ndim != 5 or video.shape[2] < 1:
        raise ValueError(f"video must be [B, C, frames >= 1, H, W], got shape {tuple(video.shape)}")
    f = int(vae.config.scale_factor_spatial)
    height, width = video.shape[-2:]
    if vae.config.get("is_residual", False) and (height % f or width % f):
        raise ValueError(f"video height {height} and width {width} must be multiples of {f} for this VAE "
                         f"(Wan2.2 layout: 2x2 patchify and average-pool downsampling)")


@torch.no_grad()
def encode_mean(vae, video: torch.Tensor) -> torch.Tensor:
    """Raw (un-normalised) posterior mean of ``video`` ``[B, C, T, H, W]`` in ``[-1, 1]``; never tiled.

    Same computation as ``vae.encode(video).latent_dist.mode()`` with tiling off: (2x2 patchify for Wan2.2), frame 0
    alone then chunks of 4 frames through the encoder with a causal feature cache, ``quant_conv``, first ``z_dim``
    channels.  Shape checked first (:func:`check_encode_size`).
    """
    check_encode_size(vae, video)
    p = patch_size(vae)
    x = patchify(video, patch_size=p) if p else video
    cache = [None] * causal_conv_count(vae.encoder)
    outs = []
    n_chunks = 1 + (x.shape[2] - 1) // 4
    for i in range(n_chunks):
        chunk = x[:, :, :1] if i == 0 else x[:, :, 1 + 4 * (i - 1): 1 + 4 * i]
        outs.append(vae.encoder(chunk, feat_cache=cache, feat_idx=[0]))
    h = vae.quant_conv(torch.cat(outs, dim=2))
    return h[:, : vae.config.z_dim]


@torch.no_grad()
def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """Decode a *raw* (de-normalised) latent ``[B, z, T, h, w]`` without the final clamp; never tiled.

    ``post_quant_conv``, then one latent frame at a time through the decoder with a causal feature cache
    (``first_chunk`` on frame 0), then the 2x2 un-patchify for Wan2.2.  ``vae.decode(z).sample`` equals this clamped
    to ``[-1, 1]``.
    """
    return WanStreamingVAEDecoder(vae, clamp=False).decode(z, normalized=False)


# ----------------------------------------------------------------------------------------------------------------
# DiffSynth-Studio tiling
# ----------------------------------------------------------------------------------------------------------------


def _tiled(fn, x: torch.Tensor, tiles: list[VAETile], out_size: tuple[int, int], accumulate_device) -> torch.Tensor:
    """Run ``fn`` on every tile of ``x`` and blend the results (see :mod:`.tile_enumeration`)."""
    acc_dev = x.device if accumulate_device is None else torch.device(accumulate_device)
    values = weight = None
    for tile in tiles:
        in_h, in_w = tile.in_slice
        out = fn(x[:, :, :, in_h, in_w]).to(acc_dev)
        b, c, t, th, tw = out.shape
        expected = (tile.h.out_stop - tile.h.out_start, tile.w.out_stop - tile.w.out_start)
        if (th, tw) != expected:  # not a Wan VAE: its output does not scale with the factor
            raise RuntimeError(f"tile at ({tile.h.start}, {tile.w.start}) gave {th}x{tw} values, expected "
                               f"{expected[0]}x{expected[1]}")
        mask = blend_mask(tile).to(dtype=x.dtype, device=acc_dev)
        if values is None:
            values = torch.zeros((b, c, t, *out_size), dtype=x.dtype, device=acc_dev)
            weight = torch.zeros((1, 1, t, *out_size), dtype=x.dtype, device=acc_dev)
        out_h, out_w = tile.out_slice
        values[:, :, :, out_h, out_w] += out * mask
        weight[:, :, :, out_h, out_w] += mask
    return values / weight


@torch.no_grad()
def tiled_encode(vae, video: torch.Tensor, tile_size: Sequence[int], tile_stride: Sequence[int],
                 normalize: bool = True, mean=None, std=None, accumulate_device="cpu") -> torch.Tensor:
    """DiffSynth-Studio tiled encode of ``video`` ``[B, 3, T, H, W]``; ``tile_size`` / ``tile_stride`` in latent units.

    Returns the normalised latent (``(mu - mean) * (1 / std)`` per tile, then blended) or, with
    ``normalize=False``, the blended raw mean, ``[B, z, 1 + (T - 1) // 4, H // f, W // f]``.  Tiles, output
    positions and blend masks are :func:`~.tile_enumeration.tile_grid` ``(..., "encode")``.  Output on
    ``accumulate_device`` (CPU like the reference; ``None`` keeps the input's device).
    """
    check_encode_size(vae, video)
    f = int(vae.config.scale_factor_spatial)
    height, width = video.shape[-2:]
    tiles = tile_grid(height, width, tile_size, tile_stride, f, "encode")

    def run(tile):
        mu = encode_mean(vae, tile)
        return normalize_latents(vae, mu, mean, std) if normalize else mu

    return _tiled(run, video, tiles, (height // f, width // f), accumulate_device)


@torch.no_grad()
def tiled_decode(vae, latents: torch.Tensor, tile_size: Sequence[int], tile_stride: Sequence[int],
                 normalized: bool = True, clamp: bool = True, mean=None, std=None, accumulate_device="cpu"
                 ) -> torch.Tensor:
    """DiffSynth-Studio tiled decode of ``latents`` ``[B, z, T, h, w]``; ``tile_size`` / ``tile_stride`` in latent units.

    ``normalized`` latents are de-normalised per tile (``z / (1 / std) + mean``); tiles, output positions and blend
    masks are :func:`~.tile_enumeration.tile_grid` ``(..., "decode")``; the blended video
    ``[B, 3, 4 T - 3, h f, w f]`` is clamped to ``[-1, 1]`` unless ``clamp=False``.
    """
    f = int(vae.config.scale_factor_spatial)
    height, width = latents.shape[-2:]
    tiles = tile_grid(height, width, tile_size, tile_stride, f, "decode")

    def run(tile):
        z = denormalize_latents(vae, tile, mean, std) if normalized else tile
        return decode_unclamped(vae, z)

    out = _tiled(run, latents, tiles, (height * f, width * f), accumulate_device)
    return out.clamp_(-1, 1) if clamp else out
