"""``WanRuntimeOptionsMixin``: the runtime options shared by our Wan pipelines.

* :meth:`WanRuntimeOptionsMixin.set_attention_backend` -- the pipeline's attention kernel
  (:mod:`diffusers_wan_ext.runtime.attention`; ``"auto"`` picks the fastest installed one);
* :meth:`WanRuntimeOptionsMixin.enable_vram_management` / :meth:`~WanRuntimeOptionsMixin.disable_vram_management`
  -- delegate to :mod:`diffusers_wan_ext.hooks.vram`;
* :meth:`WanRuntimeOptionsMixin.enable_teacache` / :meth:`~WanRuntimeOptionsMixin.disable_teacache` -- TeaCache
  (:mod:`diffusers_wan_ext.hooks.teacache`) on ``transformer`` and ``transformer_2``;
* :meth:`WanRuntimeOptionsMixin.enable_parallelism` -- :mod:`diffusers_wan_ext.parallel`;
* :meth:`WanRuntimeOptionsMixin.decode_latents` -- stock Wan's un-normalize + VAE decode + post-process.

The denoising loop is :class:`~diffusers_wan_ext.pipelines.denoising.WanDenoisingMixin`.  The mixin holds methods
only (no ``__init__``, no config), so it goes before the Diffusers pipeline class in the bases without changing
``from_pretrained`` or the component signature.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import get_module_execution_device

from ..hooks.teacache import TeaCacheConfig, enable_teacache, remove_teacache
from ..hooks.vram import disable_vram_management, enable_vram_management
from ..parallel import enable_parallelism
from ..runtime.attention import reset_attention_backend, set_attention_backend

__all__ = ["WanRuntimeOptionsMixin"]


class WanRuntimeOptionsMixin:
    """Runtime options of our Wan pipelines: attention backend, VRAM management, TeaCache, multi-GPU, decoding.

    Example:
        >>> pipe.set_attention_backend()  # doctest: +SKIP  (fastest installed; logs what it picked and why)
        '_native_cudnn'
        >>> pipe.enable_teacache(threshold=0.08, model_id="Wan2.1-T2V-1.3B")  # doctest: +SKIP
    """

    # ---------------------------------------------------------------------------------------- attention
    def set_attention_backend(self, backend: str = "auto", *, verbose: bool = True) -> str:
        """Attention backend of this pipeline's transformers (``"auto"``: the fastest available here); returns it.

        See :func:`diffusers_wan_ext.runtime.set_attention_backend`.  The choice stays with this pipeline's models
        (Diffusers' global default is left as it was).
        """
        return set_attention_backend(self, backend, verbose=verbose)

    def reset_attention_backend(self) -> None:
        """Back to Diffusers' default attention (``DIFFUSERS_ATTN_BACKEND``, else ``native``)."""
        reset_attention_backend(self)

    # --------------------------------------------------------------------------------------------- VRAM
    def enable_vram_management(self, vram_limit: float | str = "auto", **kwargs):
        """Keep the pipeline within ``vram_limit``; see :func:`diffusers_wan_ext.hooks.vram.enable_vram_management`
        (returns its ``VramPlan``).  It reads :attr:`cfg_batching` / the ``cfg_batching`` call default to plan
        the transformer's activations."""
        return enable_vram_management(self, vram_limit, **kwargs)

    def disable_vram_management(self) -> None:
        """Undo :meth:`enable_vram_management`."""
        disable_vram_management(self)

    # ----------------------------------------------------------------------------------------- TeaCache
    def enable_teacache(self, threshold: float = 0.05, *, config=None, **kwargs) -> None:
        """TeaCache on ``transformer`` (and ``transformer_2``, each with its own cache).

        Args:
            threshold: see :class:`~diffusers_wan_ext.hooks.TeaCacheConfig` (reference: 0.05-0.08 for 1.3B,
                0.14-0.2 for 14B).
            config: a ready :class:`~diffusers_wan_ext.hooks.TeaCacheConfig` (then no other arguments).
            **kwargs: other :class:`~diffusers_wan_ext.hooks.TeaCacheConfig` fields (``model_id``,
                ``coefficients``, ``num_inference_steps``, ``record``).
        """
        if config is None:
            config = TeaCacheConfig(threshold=threshold, **kwargs)
        elif kwargs:
            raise ValueError(f"pass either config= or TeaCacheConfig fields, not both (got {sorted(kwargs)})")
        enable_teacache(self, config)

    def disable_teacache(self) -> None:
        """Remove TeaCache from ``transformer`` and ``transformer_2``."""
        for name in ("transformer", "transformer_2"):
            model = getattr(self, name, None)
            if model is not None:
                remove_teacache(model)

    # ------------------------------------------------------------------------------------ multi-GPU
    def enable_parallelism(
        self,
        *,
        ulysses_degree: int | None = None,
        ring_degree: int | None = None,
        cfg_parallel: bool | None = None,
        decode_on_all_ranks: bool = False,
    ):
        """Spread this pipeline over the ``torch.distributed`` world (sequence parallel and CFG parallel); see
        :func:`diffusers_wan_ext.parallel.enable_parallelism` (returns its ``ParallelState``).

        Example:
            >>> # torchrun --nproc_per_node=4 my_script.py
            >>> pipe.to(device).enable_parallelism()  # doctest: +SKIP
        """
        return enable_parallelism(
            self, ulysses_degree=ulysses_degree, ring_degree=ring_degree, cfg_parallel=cfg_parallel,
            decode_on_all_ranks=decode_on_all_ranks,
        )

    def decode_latents(self, latents: torch.Tensor, output_type: str = "np"):
        """Un-normalize (``latents_mean`` / ``latents_std``), VAE-decode and post-process, as stock Wan does.

        With ``output_type="latent"``, or on a rank that does not decode under :meth:`enable_parallelism`, the
        latents are returned as they are.
        """
        parallel = getattr(self, "_wan_parallel", None)
        if output_type == "latent" or (parallel is not None and not parallel.decodes):
            return latents
        latents = latents.to(get_module_execution_device(self.vae), dtype=self.vae.dtype)
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)
