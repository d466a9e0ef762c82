"""``WanExtPipeline``: stock ``WanPipeline`` (text-to-video) with CFG batching and the runtime options.

Everything stock ``WanPipeline`` does is kept -- Wan2.2 A14B's two experts (``transformer`` / ``transformer_2`` at
``boundary_ratio``, ``guidance_scale_2``), TI2V-5B's ``expand_timesteps``, callbacks, ``attention_kwargs`` (LoRA
scale), ``interrupt``, ``output_type`` / ``return_dict`` -- plus:

* ``cfg_batching`` (call argument; default :attr:`~WanExtPipeline.cfg_batching`, ``True``): with classifier-free
  guidance (``guidance_scale > 1``) the conditional and the unconditional pass run as **one** transformer forward
  of batch ``2 x B`` (latents and timesteps repeated, ``[prompt_embeds; negative_prompt_embeds]``), and the output
  is split.  The result equals the two-forward loop
  within float rounding; on a GPU the larger batch usually runs faster, at the cost of the activation memory of the
  second half.  The forward runs under ``transformer.cache_context("cond_uncond")``: step-caching hooks (our
  TeaCache, Diffusers' FirstBlockCache) see one context and make one joint decision for both halves (for TeaCache
  this changes nothing: its indicator, the timestep modulation, is the same in both halves).
  ``cfg_batching=False`` is exactly stock's loop (``"cond"`` / ``"uncond"`` contexts).
* :class:`~diffusers_wan_ext.pipelines.runtime_options.WanRuntimeOptionsMixin`: ``pipe.set_attention_backend("auto")``,
  ``pipe.enable_vram_management(...)``, ``pipe.enable_teacache(...)``.

Components and config are stock ``WanPipeline``'s, so a stock text-to-video folder loads with
``WanExtPipeline.from_pretrained(folder)``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.utils import logging

from ..utils.shims import ShimPipelineMixin
from ..lora.loader import WanLoraInteropMixin
from .call_arguments import forwarded
from .denoising import WanDenoisingMixin
from .runtime_options import WanRuntimeOptionsMixin

__all__ = ["WanExtPipeline"]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name


class WanExtPipeline(ShimPipelineMixin, WanLoraInteropMixin, WanRuntimeOptionsMixin, WanDenoisingMixin, WanPipeline):
    r"""
    Text-to-video: stock :class:`diffusers.WanPipeline` plus ``cfg_batching`` and the runtime options of
    :class:`~diffusers_wan_ext.pipelines.runtime_options.WanRuntimeOptionsMixin`.

    Components (``tokenizer``, ``text_encoder``, ``vae``, ``scheduler``, ``transformer``, ``transformer_2``) and
    config (``boundary_ratio``, ``expand_timesteps``) are those of :class:`diffusers.WanPipeline`.

    Example:
        >>> import torch
        >>> from diffusers_wan_ext import WanExtPipeline
        >>> pipe = WanExtPipeline.from_pretrained(  # doctest: +SKIP
        ...     "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", dtype=torch.bfloat16
        ... ).to("cuda")
        >>> pipe.set_attention_backend()  # doctest: +SKIP  (fastest installed kernel)
        >>> video = pipe(prompt="a cat surfing a wave", guidance_scale=5.0).frames[0]  # doctest: +SKIP
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        negative_prompt: str | list[str] = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        cfg_batching: bool | None = None,
        sliding_window_size: int | None = None,
        sliding_window_stride: int | None = None,
    ) -> WanPipelineOutput | tuple:
        r"""
        Text-to-video; the arguments of :meth:`diffusers.WanPipeline.__call__` plus:

        Args:
            cfg_batching (`bool`, *optional*):
                With classifier-free guidance (``guidance_scale > 1``), run the conditional and the unconditional
                pass as one transformer forward of batch ``2 x B`` under ``cache_context("cond_uncond")``.
                ``False``: stock's two forwards per step.  Without guidance there is one forward either way.
                ``None``: the pipeline's :attr:`cfg_batching` (``True`` unless set).
            sliding_window_size (`int`, *optional*), sliding_window_stride (`int`, *optional*):
                Temporal sliding windows in latent frames (DiffSynth-Studio's option): each transformer forward runs per
                window of ``sliding_window_size`` latent frames, ``sliding_window_stride`` apart, and the windows are
                blended (:mod:`diffusers_wan_ext.hooks.sliding_window`, ``docs/long_video.md``).  ``None``: off.

        Examples:
            >>> video = pipe(prompt="waves on a beach", num_frames=81).frames[0]  # doctest: +SKIP
            >>> video = pipe(prompt="waves on a beach", cfg_batching=False).frames[0]  # doctest: +SKIP

        Returns:
            [`WanPipelineOutput`] with ``frames``, or a tuple ``(frames,)`` when ``return_dict=False``.
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        # Steps 1-5 and the decode are stock WanPipeline.__call__ (diffusers 0.42); the loop is the shared one.
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. check inputs
        self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs,
            guidance_scale_2,
        )

        if num_frames % self.vae_scale_factor_temporal != 1:
            logger.warning(
                f"`num_frames - 1` has to be divisible by {self.vae_scale_factor_temporal}. Rounding to the nearest "
                "number."
            )
            num_frames = num_frames // self.vae_scale_factor_temporal * self.vae_scale_factor_temporal + 1
        num_frames = max(num_frames, 1)

        patch_size = (
            self.transformer.config.patch_size
            if self.transformer is not None
            else self.transformer_2.config.patch_size
        )
        h_multiple_of = self.vae_scale_factor_spatial * patch_size[1]
        w_multiple_of = self.vae_scale_factor_spatial * patch_size[2]
        calc_height = height // h_multiple_of * h_multiple_of
        calc_width = width // w_multiple_of * w_multiple_of
        if height != calc_height or width != calc_width:
            logger.warning(
                f"`height` and `width` must be multiples of ({h_multiple_of}, {w_multiple_of}) for proper "
                f"patchification. Adjusting ({height}, {width}) -> ({calc_height}, {calc_width})."
            )
            height, width = calc_height, calc_width

        if self.config.boundary_ratio is not None and guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale

        self._guidance_scale = guidance_scale
        self._guidance_scale_2 = guidance_scale_2
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        device = self._execution_device

        # 2. batch size
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        # 3. text
        transformer_dtype = self.transformer.dtype if self.transformer is not None else self.transformer_2.dtype
        prompt_embeds, negative_prompt_embeds = self.encode_text(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            num_videos_per_prompt=num_videos_per_prompt, max_sequence_length=max_sequence_length,
            dtype=transformer_dtype, device=device,
        )

        # 4. timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 5. latents
        num_channels_latents = (
            self.transformer.config.in_channels
            if self.transformer is not None
            else self.transformer_2.config.in_channels
        )
        latents = self.prepare_latents(
            batch_size * num_videos_per_prompt,
            num_channels_latents,
            height,
            width,
            num_frames,
            torch.float32,
            device,
            generator,
            latents,
        )

        timestep_of = None
        if self.config.expand_timesteps:
            mask = torch.ones(latents.shape, dtype=torch.float32, device=device)

            def per_token_timesteps(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                # Wan2.2 TI2V-5B: [batch, num_latent_frames * (H/2) * (W/2)]
                temp_ts = (mask[0][0][:, ::2, ::2] * t).flatten()
                return temp_ts.unsqueeze(0).expand(x.shape[0], -1)

            timestep_of = per_token_timesteps

        # 6. denoising loop (stock's, with optional CFG batching)
        self.scheduler.set_begin_index(0)  # as stock: no device-to-host sync for the step index
        latents = self.denoise(**forwarded(locals(), self.denoise))

        # 7. decode (stock; only rank 0 under enable_parallelism)
        video = self.decode_latents(latents, output_type)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)
