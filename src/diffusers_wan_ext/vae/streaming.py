"""Streaming decode with a stock ``AutoencoderKLWan``: latent blocks in, pixel frames out, as soon as each block is
ready.

The Wan VAE decoder is causal in time: ``AutoencoderKLWan._decode`` runs one latent frame at a time and carries a
*feature cache* (the last frames each causal 3D convolution saw) from one frame to the next; latent frame 0 gives 1
pixel frame, every later latent frame 4.  :class:`WanStreamingVAEDecoder` keeps that cache between calls, so decoding
a video block by block gives exactly the frames of one decode of the whole latent, without re-decoding anything:
a first block of ``n`` latent frames yields ``1 + 4 (n - 1)`` frames, every later block ``4 n``.  With the fast
decode of :mod:`.fast_decode` installed, the cache is that of a :class:`~.decode_session.WanDecodeSession`; the
untiled :func:`~.tiling.decode_unclamped` is this decoder run once over the whole latent.

Example:
    >>> decoder = WanStreamingVAEDecoder(pipe.vae)  # doctest: +SKIP
    >>> for block in latent_blocks:  # normalized latents [B, 16, n, h, w], in order  # doctest: +SKIP
    ...     frames = decoder.decode(block)  # [B, 3, frames, H, W] in [-1, 1]
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

from .fast_decode import fast_decode_session
from .latents import causal_conv_count, denormalize_latents, patch_size

__all__ = ["WanStreamingVAEDecoder"]


class WanStreamingVAEDecoder:
    """Block-by-block decoder over a stock :class:`diffusers.AutoencoderKLWan` (Wan2.1 or Wan2.2 VAE).

    Args:
        vae: the VAE whose ``post_quant_conv`` / ``decoder`` run (its weights, device and dtype are used as they are).
        clamp: clamp the frames to ``[-1, 1]`` as ``vae.decode`` does.

    Not tiled: the whole frame goes through the decoder (``vae.use_tiling`` is ignored).

    With the fast decode of :func:`~diffusers_wan_ext.vae.fast_decode.optimize_vae` installed when a video starts
    (first block after construction or :meth:`reset`), that video runs on a
    :class:`~diffusers_wan_ext.vae.decode_session.WanDecodeSession` (same frames, its own cache); otherwise on the stock
    ``vae.decoder`` with a stock feature-cache list. A video keeps the path it started on.
    """

    def __init__(self, vae, clamp: bool = True) -> None:
        self.vae = vae
        self.clamp = clamp
        self.reset()

    def reset(self) -> None:
        """Start a new video (empty feature cache; the next latent frame is frame 0)."""
        self._cache = [None] * causal_conv_count(self.vae.decoder)
        self._session = None  # fast decode session, chosen on the video's first block
        self.latent_frames = 0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Decode the next latent frames ``[B, z_dim, n, h, w]`` of the video; returns ``[B, 3, frames, H, W]``.

        ``normalized=True`` (default): the latents are the pipeline's normalized latents (``(mu - mean) / std``),
        de-normalized here; ``False``: raw VAE latents.
        """
        vae = self.vae
        if latents.ndim != 5 or latents.shape[1] != vae.config.z_dim:
            raise ValueError(
                f"latents must be [B, {vae.config.z_dim}, frames, h, w] (this VAE's z_dim), got {tuple(latents.shape)}"
            )
        z = latents.to(device=vae.post_quant_conv.weight.device, dtype=vae.dtype)
        if normalized:
            z = denormalize_latents(vae, z)
        if self.latent_frames == 0:
            self._session = fast_decode_session(vae, z)
        x = vae.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):
            first = self.latent_frames == 0
            if self._session is not None:
                outs.append(self._session.step(x[:, :, i: i + 1]))
            else:
                outs.append(vae.decoder(x[:, :, i: i + 1], feat_cache=self._cache, feat_idx=[0], first_chunk=first))
            self.latent_frames += 1
        out = torch.cat(outs, dim=2)
        p = patch_size(vae)
        if p:
            out = unpatchify(out, patch_size=p)
        return out.clamp(-1.0, 1.0) if self.clamp else out
