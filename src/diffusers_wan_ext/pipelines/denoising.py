"""``WanDenoisingMixin``: the one denoising loop of our pipelines (:meth:`WanDenoisingMixin.denoise`).

Stock Wan's loop -- the expert switch at ``boundary_ratio`` (Wan2.2 A14B), classifier-free guidance, callbacks,
``interrupt``, the progress bar -- written once, with the points where pipelines differ passed in as functions
(``model_input``, ``timestep_of``, ``guide``, ``prediction_of``, ``step``, ``after_step``) and the transformer inputs
as dictionaries.  Classifier-free guidance runs one of three ways:

* **CFG parallel** (``enable_parallelism`` with ``cfg_degree > 1``): this rank runs its branch only (under
  ``cache_context("cond")`` or ``("uncond")``), and one all-gather per step brings the other;
* **CFG batching** (``cfg_batching=True``, the default): one transformer forward of batch ``2 x B`` (latents and
  timesteps repeated, ``[prompt_embeds; negative_prompt_embeds]``) under ``cache_context("cond_uncond")``, the output
  split -- step-caching hooks (TeaCache, FirstBlockCache, MagCache) then make one joint decision for both halves.
  Two forwards when the shapes of the two branches differ;
* **two forwards** (``cfg_batching=False``): exactly stock's ``"cond"`` / ``"uncond"`` passes.

Pipelines declare what they support as class attributes, read by :mod:`diffusers_wan_ext.parallel` and
:mod:`diffusers_wan_ext.hooks.vram`: :attr:`WanDenoisingMixin.supports_cfg_parallel` and
:attr:`WanDenoisingMixin.cfg_batching` (the default of the ``cfg_batching`` call argument).

Sliding windows (``sliding_window_size`` / ``sliding_window_stride``, DiffSynth-Studio's option): :meth:`denoise`
puts :mod:`diffusers_wan_ext.hooks.sliding_window` on the transformer(s) -- both experts -- for the loop and removes
it after, also on errors.  :meth:`WanDenoisingMixin.check_sliding_window_options` refuses them up front for a
pipeline that declares :attr:`WanDenoisingMixin.sliding_window_unsupported_reason` or whose transformer's class
declares ``_sliding_window_unsupported_reason``.

The mixin holds methods and class attributes only (no ``__init__``, no config), so it goes before the Diffusers
pipeline class in the bases without changing ``from_pretrained`` or the component signature.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Collection

import torch
from diffusers.utils import is_torch_xla_available, logging

from ..hooks.sliding_window import check_sliding_window, sliding_window_unsupported_reason, windowed

if is_torch_xla_available():
    import torch_xla.core.xla_model as xm

    XLA_AVAILABLE = True
else:
    XLA_AVAILABLE = False

__all__ = ["CFG_BATCH_CONTEXT", "WanDenoisingMixin", "cfg_guide"]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

#: Cache-context name of a batched cond + uncond forward (stock: ``"cond"`` and ``"uncond"``).
CFG_BATCH_CONTEXT = "cond_uncond"


def cfg_guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)`` (stock Wan's)."""
    return uncond + scale * (cond - uncond)


def _twice(value: Any, batch_size: int) -> Any:
    """A per-sample transformer input for a batched cond + uncond forward: batch ``B`` -> ``[value; value]``."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch_size:
        return torch.cat([value, value])
    return value


def _same_shape(a: Any, b: Any) -> bool:
    return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape


class _NoProgress:
    """Stands in for the progress bar of an inner loop (``progress=False``)."""

    def update(self, n: int = 1) -> None:
        pass


class WanDenoisingMixin:
    """The shared denoising loop (:meth:`denoise`) and the capabilities it declares.

    Attributes:
        supports_cfg_parallel: the pipeline's guidance can be split over ranks by
            :func:`diffusers_wan_ext.parallel.enable_parallelism` (``False`` for pipelines without classifier-free
            guidance; a stock Diffusers pipeline lacks the attribute and counts as ``False``).
        cfg_batching: default of the ``cfg_batching`` call argument (``None`` there means this value).
        sliding_window_unsupported_reason: why this pipeline refuses ``sliding_window_size`` (``None``: it takes it
            when its transformers can be windowed).

    Example:
        >>> out = pipe(prompt="a cat surfing a wave", guidance_scale=5.0)  # doctest: +SKIP  (one 2B forward/step)
        >>> out = pipe(prompt="a cat surfing a wave", cfg_batching=False)  # doctest: +SKIP  (stock's two forwards)
    """

    supports_cfg_parallel: ClassVar[bool] = True
    cfg_batching: bool = True
    sliding_window_unsupported_reason: ClassVar[str | None] = None
    _cfg_batching_logged: bool = False

    def check_sliding_window_options(self, sliding_window_size: int | None, sliding_window_stride: int | None) -> None:
        """Validate the ``sliding_window_size`` / ``sliding_window_stride`` call arguments (latent frames; both
        ``None`` = off) before any work: one-line ``ValueError`` for a bad pair, or when this pipeline or one of its
        transformers cannot be windowed (the declared reason)."""
        check_sliding_window(sliding_window_size, sliding_window_stride)
        if sliding_window_size is None:
            return
        reason = self.sliding_window_unsupported_reason
        for name in ("transformer", "transformer_2"):
            model = getattr(self, name, None)
            if reason is None and model is not None:
                reason = sliding_window_unsupported_reason(model)
        if reason:
            raise ValueError(
                f"{type(self).__name__} does not take sliding_window_size / sliding_window_stride: {reason}"
            )

    def encode_text(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        *,
        num_videos_per_prompt: int,
        max_sequence_length: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text step of a pipeline: stock ``encode_prompt`` (the negative prompt only with classifier-free
        guidance) with both embeddings cast to the transformer's ``dtype``."""
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype)
        return prompt_embeds.to(dtype), negative_prompt_embeds

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
        guidance_scale_2: float | None = None,
        num_inference_steps: int,
        transformer_dtype: torch.dtype,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Collection[str] = ("latents",),
        cfg_batching: bool | None = None,
        model_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
        timestep_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        transformer_kwargs: dict[str, Any] | None = None,
        broadcast_kwargs: Collection[str] = (),
        uncond_transformer_kwargs: dict[str, Any] | None = None,
        guide: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
        prediction_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
        after_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        transformer: torch.nn.Module | None = None,
        progress: bool = True,
        sliding_window_size: int | None = None,
        sliding_window_stride: int | None = None,
    ) -> torch.Tensor:
        """Denoise ``latents`` over ``timesteps``; returns the latents.

        Args:
            latents: the initial latents (noise, or noised video latents).
            timesteps: the scheduler's timesteps (``num_inference_steps * scheduler.order`` of them, or fewer).
            prompt_embeds, negative_prompt_embeds: the text context of the conditional and unconditional pass.
            guidance_scale: guidance of ``transformer`` (Wan2.2 A14B: the high-noise expert); guidance runs when the
                pipeline's ``do_classifier_free_guidance`` says so.
            guidance_scale_2: guidance of ``transformer_2`` (the low-noise expert, below ``boundary_ratio``).
            num_inference_steps: for the progress bar and the step-caching hooks' warm-up.
            transformer_dtype: the dtype of the transformer inputs.
            attention_kwargs: given to the transformer (e.g. the LoRA ``scale``).
            callback_on_step_end, callback_on_step_end_tensor_inputs: as stock (``"latents"``, ``"prompt_embeds"``,
                ``"negative_prompt_embeds"``; the callback may return replacements).
            cfg_batching: run cond and uncond as one forward of batch ``2 x B`` under ``cache_context("cond_uncond")``
                (two forwards when the branches differ in shape); ``None``: :attr:`cfg_batching`.
            model_input: ``latents -> hidden_states`` (default: the latents; Fun: ``cat([latents, y])``).
            timestep_of: ``(t, latents) -> timestep`` (default: ``t.expand(B)``; TI2V: per-token timesteps).
            transformer_kwargs: extra transformer inputs of both passes.  With CFG batching, a tensor of batch ``B``
                is concatenated with itself, except the names in ``broadcast_kwargs``, passed as they are (the
                transformer broadcasts them, e.g. Fun's ``reference_latents``).
            broadcast_kwargs: see ``transformer_kwargs``.
            uncond_transformer_kwargs: inputs that differ in the unconditional pass (they replace the same names of
                ``transformer_kwargs`` there; e.g. Video-As-Prompt's negative reference context, S2V's zero audio).
                With CFG batching they are concatenated with their conditional counterparts.
            guide: ``(cond, uncond, scale) -> prediction`` (default :func:`cfg_guide`; LongCat: CFG-Zero*).
            prediction_of: ``(model_output, latents) -> prediction``, applied to each transformer output before
                guidance (default: the output; LongCat: the noisy frames, negated).
            step: ``(prediction, t, latents, step_index) -> latents`` (default: ``scheduler.step``).
            after_step: ``(latents, step_index) -> latents`` after the step, before the callback (e.g. TI2V's
                first-frame pinning).
            transformer: the model of every step (default: ``transformer`` / ``transformer_2`` at
                ``boundary_ratio``).
            progress: show the progress bar (``False`` for inner loops).
            sliding_window_size, sliding_window_stride: temporal sliding windows in latent frames (DiffSynth's
                option; :mod:`diffusers_wan_ext.hooks.sliding_window`) on the step's transformer(s) for this loop;
                ``None``: off.
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        models = [transformer] if transformer is not None else [
            getattr(self, "transformer", None), getattr(self, "transformer_2", None)]
        cfg_batching = self.cfg_batching if cfg_batching is None else cfg_batching
        transformer_kwargs = dict(transformer_kwargs or {})
        uncond_kwargs = {**transformer_kwargs, **(uncond_transformer_kwargs or {})}
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        self._cfg_batching_logged = False
        sigmas = getattr(self.scheduler, "sigmas", None)  # not every scheduler has them
        if step is None:
            step = self._scheduler_step

        with windowed(models, sliding_window_size, sliding_window_stride), (
            self.progress_bar(total=num_inference_steps) if progress else contextlib.nullcontext(_NoProgress())
        ) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                model, scale = self._expert(t, transformer, guidance_scale, guidance_scale_2)
                noise_pred = self._predict(
                    model,
                    (model_input(latents) if model_input is not None else latents).to(transformer_dtype),
                    timestep_of(t, latents) if timestep_of is not None else t.expand(latents.shape[0]),
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    scale=scale,
                    cache_kwargs=dict(
                        step_index=i,
                        sigma=float(sigmas[i]) if sigmas is not None and i < len(sigmas) else None,
                        num_inference_steps=len(timesteps),
                    ),
                    attention_kwargs=attention_kwargs,
                    cfg_batching=cfg_batching,
                    transformer_kwargs=transformer_kwargs,
                    uncond_transformer_kwargs=uncond_kwargs,
                    paired_kwargs=tuple(uncond_transformer_kwargs or ()),
                    broadcast_kwargs=broadcast_kwargs,
                    guide=guide,
                    prediction_of=None if prediction_of is None else (lambda out: prediction_of(out, latents)),
                )
                latents = step(noise_pred, t, latents, i)
                if after_step is not None:
                    latents = after_step(latents, i)
                if callback_on_step_end is not None:
                    latents, prompt_embeds, negative_prompt_embeds = self._step_callback(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, i, t,
                        latents, prompt_embeds, negative_prompt_embeds,
                    )
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                if XLA_AVAILABLE:
                    xm.mark_step()

        self._current_timestep = None
        return latents

    # ------------------------------------------------------------------------------------------- one step
    def _expert(
        self,
        t: torch.Tensor,
        transformer: torch.nn.Module | None,
        guidance_scale: float,
        guidance_scale_2: float | None,
    ) -> tuple[torch.nn.Module, float]:
        """The model and guidance scale at timestep ``t``: ``transformer`` above ``boundary_ratio`` (or always, for
        Wan2.1 and single-model pipelines), ``transformer_2`` below."""
        if transformer is not None:
            return transformer, guidance_scale
        boundary_ratio = getattr(self.config, "boundary_ratio", None)  # pipelines without experts lack it
        if boundary_ratio is None or t >= boundary_ratio * self.scheduler.config.num_train_timesteps:
            return self.transformer, guidance_scale  # Wan2.1, or Wan2.2's high-noise expert
        return self.transformer_2, guidance_scale_2  # Wan2.2's low-noise expert

    def _scheduler_step(self, noise_pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, i: int) -> torch.Tensor:
        return self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

    def _predict(
        self,
        model: torch.nn.Module,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        *,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        scale: float,
        cache_kwargs: dict[str, Any],
        attention_kwargs: dict[str, Any] | None = None,
        cfg_batching: bool = True,
        transformer_kwargs: dict[str, Any] | None = None,
        uncond_transformer_kwargs: dict[str, Any] | None = None,
        paired_kwargs: Collection[str] = (),
        broadcast_kwargs: Collection[str] = (),
        guide: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None,
        prediction_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One step's guided prediction: the transformer forward(s) (CFG parallel, batched, or cond then uncond),
        ``prediction_of`` on each output, then ``guide``.

        ``uncond_transformer_kwargs`` are the complete inputs of the unconditional pass; ``paired_kwargs`` the names
        whose value differs between the passes (concatenated when batched); ``cache_kwargs`` go to
        ``model.cache_context`` (``step_index``, ``sigma``, ``num_inference_steps``).
        """
        cond_kwargs = transformer_kwargs or {}
        uncond_kwargs = cond_kwargs if uncond_transformer_kwargs is None else uncond_transformer_kwargs
        guide = cfg_guide if guide is None else guide

        def forward(context: str, hidden, t, text, kwargs) -> torch.Tensor:
            with model.cache_context(context, **cache_kwargs):
                out = model(
                    hidden_states=hidden,
                    timestep=t,
                    encoder_hidden_states=text,
                    attention_kwargs=attention_kwargs,
                    return_dict=False,
                    **kwargs,
                )[0]
            return out if prediction_of is None else prediction_of(out)

        if not self.do_classifier_free_guidance:
            return forward("cond", hidden_states, timestep, prompt_embeds, cond_kwargs)
        parallel = getattr(self, "_wan_parallel", None)  # set by enable_parallelism
        if parallel is not None and parallel.cfg_degree > 1:
            # CFG parallel: this rank's half of the mesh runs one branch; one all-gather per step
            if parallel.cfg_rank == 0:
                mine = forward("cond", hidden_states, timestep, prompt_embeds, cond_kwargs)
            else:
                mine = forward("uncond", hidden_states, timestep, negative_prompt_embeds, uncond_kwargs)
            return guide(*parallel.gather_cfg(mine), scale)
        if cfg_batching and self._can_batch(
            hidden_states, prompt_embeds, negative_prompt_embeds, cond_kwargs, uncond_kwargs, paired_kwargs
        ):
            b = hidden_states.shape[0]
            both_kwargs = {k: (v if k in broadcast_kwargs else _twice(v, b)) for k, v in cond_kwargs.items()}
            both_kwargs.update({k: torch.cat([cond_kwargs[k], uncond_kwargs[k]]) for k in paired_kwargs})
            both = forward(
                CFG_BATCH_CONTEXT,
                torch.cat([hidden_states, hidden_states]),
                torch.cat([timestep, timestep]),
                torch.cat([prompt_embeds, negative_prompt_embeds]),
                both_kwargs,
            )
            return guide(*both.chunk(2), scale)
        cond = forward("cond", hidden_states, timestep, prompt_embeds, cond_kwargs)
        uncond = forward("uncond", hidden_states, timestep, negative_prompt_embeds, uncond_kwargs)
        return guide(cond, uncond, scale)

    def _can_batch(
        self,
        hidden_states: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        cond_kwargs: dict[str, Any],
        uncond_kwargs: dict[str, Any],
        paired_kwargs: Collection[str],
    ) -> bool:
        """Whether cond and uncond can run as one batch (same shapes); logs once per call when not."""
        ok = (
            negative_prompt_embeds is not None
            and negative_prompt_embeds.shape == prompt_embeds.shape
            and prompt_embeds.shape[0] == hidden_states.shape[0]
            and all(_same_shape(cond_kwargs.get(k), uncond_kwargs[k]) for k in paired_kwargs)
        )
        if not ok and not self._cfg_batching_logged:
            logger.info("cfg_batching: the two guidance branches differ in shape; two forwards per step")
            self._cfg_batching_logged = True  # once per call
        return ok

    def _step_callback(
        self,
        callback: Callable,
        tensor_inputs: Collection[str],
        i: int,
        t: torch.Tensor,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run ``callback_on_step_end``; returns the (possibly replaced) latents and embeddings."""
        available = {
            "latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds
        }
        outputs = callback(self, i, t, {k: available[k] for k in tensor_inputs}) or {}
        return (
            outputs.pop("latents", latents),
            outputs.pop("prompt_embeds", prompt_embeds),
            outputs.pop("negative_prompt_embeds", negative_prompt_embeds),
        )
