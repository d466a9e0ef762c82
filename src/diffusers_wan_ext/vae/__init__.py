"""The Wan VAE at run time, on a stock Diffusers ``AutoencoderKLWan`` (its weights and API unchanged).

What is where (each module imports only the ones above it, and :mod:`diffusers_wan_ext.ops` for Triton):

* :mod:`.latents` -- latent normalisation (:func:`latent_stats`, :func:`normalize_latents`,
  :func:`denormalize_latents`) and the layout facts the encode / decode paths share (:func:`patch_size`,
  :func:`causal_conv_count`);
* :mod:`.norm_kernel` -- the fused channel RMS norm + SiLU as one Triton kernel (:func:`rms_norm_act`, with the
  PyTorch :func:`rms_norm_act_reference` off CUDA);
* :mod:`.decode_session` -- :class:`WanDecodeSession`, the causal decode state of one video: one latent frame per
  step through the stock decoder's modules, with per-conv input buffers and caches (the fast decode's engine);
* :mod:`.fast_decode` -- the faster, leaner decode: :func:`optimize_vae` / :func:`restore_vae` install / remove it
  behind ``vae.decode`` (re-exported by :mod:`diffusers_wan_ext.runtime`); its module docstring explains what
  changes against stock and the memory it saves;
* :mod:`.peak_memory` -- :func:`estimate_decode_peak`, a decode's peak memory counted on the meta device;
* :mod:`.streaming` -- :class:`WanStreamingVAEDecoder`, latent blocks in, pixel frames out, one causal cache
  across calls (runs on a :class:`WanDecodeSession` when the fast decode is installed);
* :mod:`.tile_enumeration` -- DiffSynth-Studio's tile enumeration and blend masks as data (:func:`tile_grid`,
  :func:`tile_layout`, :func:`blend_mask`; imports nothing of the package);
* :mod:`.tiling` -- the DiffSynth-Studio tiled encode / decode (:func:`tiled_encode`, :func:`tiled_decode`) and the
  untiled :func:`encode_mean` / :func:`decode_unclamped` they run per tile (:func:`check_encode_size` first).

Example:
    >>> from diffusers_wan_ext.vae import WanStreamingVAEDecoder, optimize_vae
    >>> optimize_vae(pipe.vae)  # doctest: +SKIP
    >>> frames = WanStreamingVAEDecoder(pipe.vae).decode(latent_block)  # doctest: +SKIP
"""

from .decode_session import WanDecodeSession
from .fast_decode import fast_decode_session, fast_decode_unsupported, optimize_vae, restore_vae
from .latents import causal_conv_count, denormalize_latents, latent_stats, normalize_latents, patch_size
from .norm_kernel import rms_norm_act, rms_norm_act_reference, wan_norm_weight
from .peak_memory import estimate_decode_peak
from .streaming import WanStreamingVAEDecoder
from .tile_enumeration import TileSpan, VAETile, blend_mask, blend_ramp, tile_grid, tile_layout, tile_starts
from .tiling import check_encode_size, decode_unclamped, encode_mean, tiled_decode, tiled_encode

__all__ = [
    "TileSpan",
    "VAETile",
    "WanDecodeSession",
    "WanStreamingVAEDecoder",
    "blend_mask",
    "blend_ramp",
    "causal_conv_count",
    "check_encode_size",
    "decode_unclamped",
    "denormalize_latents",
    "encode_mean",
    "estimate_decode_peak",
    "fast_decode_session",
    "fast_decode_unsupported",
    "latent_stats",
    "normalize_latents",
    "optimize_vae",
    "patch_size",
    "restore_vae",
    "rms_norm_act",
    "rms_norm_act_reference",
    "tile_grid",
    "tile_layout",
    "tile_starts",
    "tiled_decode",
    "tiled_encode",
    "wan_norm_weight",
]
