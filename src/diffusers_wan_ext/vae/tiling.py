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
  ``tile_stride=(15, 26)``); encode multiplies both by the spatial factor (8 for Wan2.1, 16 for Wan2.2);
* a tile starts every ``stride``; a start is skipped when the previous tile already reaches the end
  (``start - stride >= 0 and start - stride + size >= length``); tiles at the far edge may be shorter;
* every tile is encoded / decoded whole (encode: normalised latent ``(mu - mean) * (1 / std)``; decode:
  ``z / (1 / std) + mean`` then the decoder, *not* clamped);
* each tile is weighted by a mask ``min(h_ramp, w_ramp)`` whose 1-D ramps are ``(arange(b) + 1) / b`` on the inner
  edges (the edges not on the image border) and 1 elsewhere, with ``b = size - stride`` converted to output units
  (``// factor`` for encode, ``* factor`` for decode);
* the result is ``sum(mask * tile) / sum(mask)`` (accumulated on CPU by default, in tile order); decode clamps the
  blended video to ``[-1, 1]``.

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

__all__ = [
    "decode_unclamped",
    "encode_mean",
    "tile_layout",
    "tiled_decode",
    "tiled_encode",
]


# ----------------------------------------------------------------------------------------------------------------
# Untiled encode / decode on the stock modules
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_mean(vae, video: torch.Tensor) -> torch.Tensor:
    """Raw (un-normalised) posterior mean of ``video`` ``[B, C, T, H, W]`` in ``[-1, 1]``; never tiled.

    Same computation as ``vae.encode(video).latent_dist.mode()`` with tiling off: (2x2 patchify for Wan2.2), frame 0
    alone then chunks of 4 frames through the encoder with a causal feature cache, ``quant_conv``, first ``z_dim``
    channels.
    """
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


def _starts(length: int, size: int, stride: int) -> list[int]:
    if size <= 0 or stride <= 0:
        raise ValueError(f"tile size and stride must be positive, got size {size}, stride {stride}")
    return [s for s in range(0, length, stride) if not (s - stride >= 0 and s - stride + size >= length)]


def tile_layout(height: int, width: int, tile_size: Sequence[int], tile_stride: Sequence[int]
                ) -> list[tuple[int, int, int, int]]:
    """Tiles ``(h0, h1, w0, w1)`` (row-major, ``h1`` / ``w1`` may pass the edge) over a ``height x width`` input."""
    (size_h, size_w), (stride_h, stride_w) = tile_size, tile_stride
    return [(h, h + size_h, w, w + size_w)
            for h in _starts(height, size_h, stride_h) for w in _starts(width, size_w, stride_w)]


def _ramp_1d(length: int, at_start: bool, at_end: bool, border: int) -> torch.Tensor:
    x = torch.ones(length)
    if border <= 0:  # no overlap (stride == size): nothing to blend
        return x
    ramp = (torch.arange(border) + 1) / border
    n = min(border, length)
    if not at_start:
        x[:n] = ramp[:n]
    if not at_end:
        x[length - n:] = torch.flip(ramp, dims=(0,))[border - n:]
    return x


def _blend_mask(h: int, w: int, bounds: tuple[bool, bool, bool, bool], border: tuple[int, int]) -> torch.Tensor:
    mh = _ramp_1d(h, bounds[0], bounds[1], border[0])[:, None].expand(h, w)
    mw = _ramp_1d(w, bounds[2], bounds[3], border[1])[None, :].expand(h, w)
    return torch.minimum(mh, mw).view(1, 1, 1, h, w)


def _tiled(fn, x: torch.Tensor, size, stride, out_units, border, accumulate_device):
    """Run ``fn`` on every tile of ``x`` and blend the results (see the module docstring)."""
    _, _, _, H, W = x.shape
    acc_dev = x.device if accumulate_device is None else torch.device(accumulate_device)
    values = weight = None
    for h0, h1, w0, w1 in tile_layout(H, W, size, stride):
        tile = fn(x[:, :, :, h0:h1, w0:w1]).to(acc_dev)
        b, c, t, th, tw = tile.shape
        mask = _blend_mask(th, tw, (h0 == 0, h1 >= H, w0 == 0, w1 >= W), border).to(dtype=x.dtype, device=acc_dev)
        if values is None:
            out_h, out_w = out_units(H), out_units(W)
            values = torch.zeros((b, c, t, out_h, out_w), dtype=x.dtype, device=acc_dev)
            weight = torch.zeros((1, 1, t, out_h, out_w), dtype=x.dtype, device=acc_dev)
        th0, tw0 = out_units(h0), out_units(w0)
        values[:, :, :, th0: th0 + th, tw0: tw0 + tw] += tile * mask
        weight[:, :, :, th0: th0 + th, tw0: tw0 + tw] += mask
    return values / weight


@torch.no_grad()
def tiled_encode(vae, video: torch.Tensor, tile_size: Sequence[int], tile_stride: Sequence[int],
                 normalize: bool = True, mean=None, std=None, accumulate_device="cpu") -> torch.Tensor:
    """DiffSynth-Studio tiled encode of ``video`` ``[B, 3, T, H, W]``; ``tile_size`` / ``tile_stride`` in latent units.

    Returns the normalised latent (``(mu - mean) * (1 / std)`` per tile, then blended) or, with
    ``normalize=False``, the blended raw mean.  Pixel tiles are ``tile_size * vae.config.scale_factor_spatial``;
    the blend border is ``(size - stride) // factor`` latent pixels.  Output on ``accumulate_device`` (CPU like the
    reference; ``None`` keeps the input's device).
    """
    f = int(vae.config.scale_factor_spatial)
    size = (tile_size[0] * f, tile_size[1] * f)
    stride = (tile_stride[0] * f, tile_stride[1] * f)
    border = ((size[0] - stride[0]) // f, (size[1] - stride[1]) // f)

    def run(tile):
        mu = encode_mean(vae, tile)
        return normalize_latents(vae, mu, mean, std) if normalize else mu

    return _tiled(run, video, size, stride, lambda v: v // f, border, accumulate_device)


@torch.no_grad()
def tiled_decode(vae, latents: torch.Tensor, tile_size: Sequence[int], tile_stride: Sequence[int],
                 normalized: bool = True, clamp: bool = True, mean=None, std=None, accumulate_device="cpu"
                 ) -> torch.Tensor:
    """DiffSynth-Studio tiled decode of ``latents`` ``[B, z, T, h, w]``; ``tile_size`` / ``tile_stride`` in latent units.

    ``normalized`` latents are de-normalised per tile (``z / (1 / std) + mean``); the blend border is
    ``(size - stride) * factor`` pixels; the blended video is clamped to ``[-1, 1]`` unless ``clamp=False``.
    """
    f = int(vae.config.scale_factor_spatial)
    border = ((tile_size[0] - tile_stride[0]) * f, (tile_size[1] - tile_stride[1]) * f)

    def run(tile):
        z = denormalize_latents(vae, tile, mean, std) if normalized else tile
        return decode_unclamped(vae, z)

    out = _tiled(run, latents, tuple(tile_size), tuple(tile_stride), lambda v: v * f, border, accumulate_device)
    return out.clamp_(-1, 1) if clamp else out
