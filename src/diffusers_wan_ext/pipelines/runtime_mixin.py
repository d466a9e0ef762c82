"""``WanRuntimeMixin``: runtime options shared by our Wan pipelines, and the shared denoising loop.

* :meth:`WanRuntimeMixin.set_attention_backend` -- the pipeline's attention kernel
  (:mod:`diffusers_wan_ext.runtime.attention`; ``"auto"`` picks the fastest installed one);
* :meth:`WanRuntimeMixin.enable_vram_management` / :meth:`~WanRuntimeMixin.disable_vram_management` -- delegate to
  :mod:`diffusers_wan_ext.hooks.vram`;
* :meth:`WanRuntimeMixin.enable_teacache` / :meth:`~WanRuntimeMixin.disable_teacache` -- TeaCache
  (:mod:`diffusers_wan_ext.hooks.teacache`) on ``transformer`` and ``transformer_2``;
* :meth:`WanRuntimeMixin._denoising_loop` -- stock Wan's two-expert (``boundary_ratio``) loop with classifier-free
  guidance, written once for :class:`~diffusers_wan_ext.pipelines.pipeline_wan_ext.WanExtPipeline` and the Wan-Fun
  pipelines, with optional *CFG batching*: the conditional and the unconditional pass run as one transformer forward
  of batch ``2 x B`` (latents, timesteps and ``[prompt_embeds; negative_prompt_embeds]`` concatenated, the output
  split), under ``cache_context("cond_uncond")``.  Step-caching hooks (TeaCache, FirstBlockCache) then see one
  context and make one joint decision for both halves.

The mixin holds methods only (no ``__init__``, no config), so it goes before the Diffusers pipeline class in the
bases without changing ``from_pretrained`` or the component signature.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Collection

import torch
from diffusers.utils import is_torch_xla_available, logging
from diffusers.utils.torch_utils import get_module_execution_device

if is_torch_xla_available():
    import torch_xla.core.xla_model as xm

    XLA_AVAILABLE = True
else:
    XLA_AVAILABLE = False

__all__ = ["WanRuntimeMixin"]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

#: Cache-context name of a batched cond + uncond forward (stock: ``"cond"`` and ``"uncond"``).
CFG_BATCH_CONTEXT = "cond_uncond"


def _vram_module():
    name = "diffusers_wan_ext.hooks.vram"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise ImportError(
            f"VRAM management needs {name}, which this installation of diffusers_wan_ext does not have: update the "
            "package (pip install -U diffusers_wan_ext, or pull the repository for an editable install)"
        ) from e


def _twice(value: Any, batch_size: int) -> Any:
    """A per-sample transformer input for a batched cond + uncond forward: batch ``B`` -> ``[value; value]``."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch_size:
        return torch.cat([value, value])
    return value


def _same_shape(a: Any, b: Any) -> bool:
    return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape


class WanRuntimeMixin:
    """Runtime options of our Wan pipelines (attention backend, VRAM management, TeaCache) and the shared loop.

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
        from ..runtime.attention import set_attention_backend

        return set_attention_backend(self, backend, verbose=verbose)

    def reset_attention_backend(self) -> None:
        """Back to Diffusers' default attention (``DIFFUSERS_ATTN_BACKEND``, else ``native``)."""
        from ..runtime.attention import reset_attention_backend

        reset_attention_backend(self)

    # --------------------------------------------------------------------------------------------- VRAM
    def enable_vram_management(self, vram_limit: float | str = "auto", **kwargs):
        """Keep the pipeline within ``vram_limit``; see :func:`diffusers_wan_ext.hooks.vram.enable_vram_management`
        (returns its ``VramPlan``).  It reads :attr:`cfg_batching` / the ``cfg_batching`` call default to plan
        the transformer's activations."""
        return _vram_module().enable_vram_management(self, vram_limit, **kwargs)

    def disable_vram_management(self) -> None:
        """Undo :meth:`enable_vram_management`."""
        _vram_module().disable_vram_management(self)

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
        from ..hooks.teacache import TeaCacheConfig, enable_teacache

        if config is None:
            config = TeaCacheConfig(threshold=threshold, **kwargs)
        elif kwargs:
            raise ValueError(f"pass either config= or TeaCacheConfig fields, not both (got {sorted(kwargs)})")
        enable_teacache(self, config)

    def disable_teacache(self) -> None:
        """Remove TeaCache from ``transformer`` and ``transformer_2``."""
        from ..hooks.teacache import remove_teacache

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
        from ..parallel import enable_parallelism

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

    # ----------------------------------------------------------------------------------- denoising loop
    def _denoising_loop(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
        guidance_scale_2: float | None,
        num_inference_steps: int,
        transformer_dtype: torch.dtype,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Collection[str] = ("latents",),
        cfg_batching: bool = True,
        model_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
        timestep_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        transformer_kwargs: dict[str, Any] | None = None,
        broadcast_kwargs: Collection[str] = (),
        uncond_transformer_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Stock Wan's denoising loop (expert switch at ``boundary_ratio``, CFG, callbacks, interrupt); the latents.

        Args:
            cfg_batching: with CFG (``guidance_scale > 1``), run cond and uncond as one forward of batch ``2 x B``
                under ``cache_context("cond_uncond")``.  Falls back to two forwards when the prompt and negative
                embeddings differ in shape.
            model_input: ``latents -> hidden_states`` (default: the latents; Fun: ``cat([latents, y])``).
            timestep_of: ``(t, latents) -> timestep`` (default: ``t.expand(B)``; TI2V: per-token timesteps).
            transformer_kwargs: extra transformer inputs given to both passes.  With CFG batching, a tensor of batch
                ``B`` is concatenated with itself, except the names in ``broadcast_kwargs``, which are passed as
                they are (the transformer broadcasts them, e.g. Fun's ``reference_latents``).
            uncond_transformer_kwargs: inputs that differ in the unconditional pass (they replace the same names of
                ``transformer_kwargs`` there; e.g. Video-As-Prompt's ``negative_vap_prompt`` context, S2V's zero audio).  With CFG
                batching they are concatenated with their conditional counterparts (two forwards when the shapes
                differ).
        """
        transformer_kwargs = dict(transformer_kwargs or {})
        uncond_kwargs = {**transformer_kwargs, **(uncond_transformer_kwargs or {})}
        paired = tuple(uncond_transformer_kwargs or ())
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        boundary_timestep = None
        boundary_ratio = getattr(self.config, "boundary_ratio", None)  # pipelines without experts lack it
        if boundary_ratio is not None:
            boundary_timestep = boundary_ratio * self.scheduler.config.num_train_timesteps
        sigmas = getattr(self.scheduler, "sigmas", None)
        batched_logged = False

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                if boundary_timestep is None or t >= boundary_timestep:
                    model, scale = self.transformer, guidance_scale  # Wan2.1, or Wan2.2's high-noise expert
                else:
                    model, scale = self.transformer_2, guidance_scale_2  # Wan2.2's low-noise expert

                hidden_states = (model_input(latents) if model_input is not None else latents).to(transformer_dtype)
                timestep = timestep_of(t, latents) if timestep_of is not None else t.expand(latents.shape[0])
                # where the loop is, for step-caching hooks (as stock Wan pipelines pass it)
                sigma = float(sigmas[i]) if sigmas is not None and i < len(sigmas) else None
                ctx = dict(step_index=i, sigma=sigma, num_inference_steps=len(timesteps))

                cfg = self.do_classifier_free_guidance
                batch = (
                    cfg
                    and cfg_batching
                    and negative_prompt_embeds is not None
                    and negative_prompt_embeds.shape == prompt_embeds.shape
                    and prompt_embeds.shape[0] == hidden_states.shape[0]
                    and all(_same_shape(transformer_kwargs.get(k), uncond_kwargs[k]) for k in paired)
                )
                if cfg and cfg_batching and not batch and not batched_logged:
                    logger.info("cfg_batching: prompt and negative embeddings differ in shape; two forwards per step")
                    batched_logged = True

                parallel = getattr(self, "_wan_parallel", None)
                if cfg and parallel is not None and parallel.cfg_degree > 1:
                    # CFG parallel: this rank's half of the mesh runs one branch; one all-gather per step
                    branch = parallel.cfg_rank
                    with model.cache_context("cond" if branch == 0 else "uncond", **ctx):
                        mine = model(
                            hidden_states=hidden_states,
                            timestep=timestep,
                            encoder_hidden_states=prompt_embeds if branch == 0 else negative_prompt_embeds,
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                            **(transformer_kwargs if branch == 0 else uncond_kwargs),
                        )[0]
                    noise_pred, noise_uncond = parallel.gather_cfg(mine)
                    noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
                elif batch:
                    b = hidden_states.shape[0]
                    extra = {
                        k: (v if k in broadcast_kwargs else _twice(v, b)) for k, v in transformer_kwargs.items()
                    }
                    extra.update({k: torch.cat([transformer_kwargs[k], uncond_kwargs[k]]) for k in paired})
                    with model.cache_context(CFG_BATCH_CONTEXT, **ctx):
                        both = model(
                            hidden_states=torch.cat([hidden_states, hidden_states]),
                            timestep=torch.cat([timestep, timestep]),
                            encoder_hidden_states=torch.cat([prompt_embeds, negative_prompt_embeds]),
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                            **extra,
                        )[0]
                    noise_pred, noise_uncond = both.chunk(2)
                    noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)
                else:
                    with model.cache_context("cond", **ctx):
                        noise_pred = model(
                            hidden_states=hidden_states,
                            timestep=timestep,
                            encoder_hidden_states=prompt_embeds,
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                            **transformer_kwargs,
                        )[0]
                    if cfg:
                        with model.cache_context("uncond", **ctx):
                            noise_uncond = model(
                                hidden_states=hidden_states,
                                timestep=timestep,
                                encoder_hidden_states=negative_prompt_embeds,
                                attention_kwargs=attention_kwargs,
                                return_dict=False,
                                **uncond_kwargs,
                            )[0]
                        noise_pred = noise_uncond + scale * (noise_pred - noise_uncond)

                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

                if XLA_AVAILABLE:
                    xm.mark_step()

        self._current_timestep = None
        return latents
