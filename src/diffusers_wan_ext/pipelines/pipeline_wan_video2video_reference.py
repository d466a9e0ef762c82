"""``WanVideoToVideoReferencePipeline``: stock ``WanVideoToVideoPipeline`` plus DiffSynth's ``denoising_strength``.

Two video-to-video rules exist for Wan:

* **Stock Diffusers** (``strength``, img2img style): the scheduler's full ``N``-step schedule is built and its first
  ``N - int(N * strength)`` steps are dropped; the input latents are noised at the first remaining timestep.  The
  loop runs ``int(N * strength)`` steps.
* **DiffSynth-Studio** (``denoising_strength``, ``WanVideoPipeline`` with ``input_video``): the schedule itself is
  rebuilt as ``linspace(strength, 0, N + 1)[:N]`` (then shifted), so **all N steps run**, starting at
  ``sigma_0 = shift(strength)``; the input latents are noised to that sigma, ``(1 - sigma_0) * x0 + sigma_0 * noise``.

For the same ``N`` and strength the two give different timesteps and a different number of steps (N = 4, strength
0.6, shift 5: stock runs 2 steps, ``[833.3, 625.0]`` -- the tail of the Wan schedule ``[1000, 937.5, 833.3, 625]``
--, DiffSynth runs 4 steps at ``[882.4, 803.6, 681.8, 468.8]``).  The stock pipeline asks the scheduler for the
full ``N``-step schedule and then truncates it by ``strength``, so a scheduler alone cannot give DiffSynth's rule;
this subclass overrides how the timesteps and the start latents are prepared (stock's ``get_timesteps`` /
``prepare_latents`` with extra arguments) and denoises through the shared loop
(:meth:`~diffusers_wan_ext.pipelines.denoising.WanDenoisingMixin.denoise`: stock's steps, plus CFG batching and CFG
parallel; ``cfg_batching=False`` runs stock's two forwards and gives stock's result).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderKLWan, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan_video2video import (
    WanVideoToVideoPipeline,
    retrieve_latents,
    retrieve_timesteps,
)
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils import is_torch_xla_available
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import AutoTokenizer, UMT5EncoderModel

from ..utils.shims import ShimPipelineMixin
from ..lora.loader import WanLoraInteropMixin
from ..schedulers import WanFlowMatchScheduler
from .call_arguments import forwarded
from .denoising import WanDenoisingMixin
from .runtime_options import WanRuntimeOptionsMixin

__all__ = ["WanVideoToVideoReferencePipeline", "set_strength_schedule"]

XLA_AVAILABLE = is_torch_xla_available()


class WanVideoToVideoReferencePipeline(
    ShimPipelineMixin, WanLoraInteropMixin, WanRuntimeOptionsMixin, WanDenoisingMixin, WanVideoToVideoPipeline
):
    r"""
    Wan video-to-video with DiffSynth-Studio's ``denoising_strength`` and optional pre-encoded input latents.

    Everything of :class:`diffusers.WanVideoToVideoPipeline` is unchanged (components, ``strength``, callbacks,
    offloading, LoRA loading), plus our runtime options
    (:class:`~diffusers_wan_ext.pipelines.runtime_options.WanRuntimeOptionsMixin`) and ``cfg_batching``; three more
    call arguments are added:

    * ``denoising_strength`` -- DiffSynth's rule: all ``num_inference_steps`` steps on the schedule that starts at
      ``shift(denoising_strength)``.  The scheduler must either take ``set_timesteps(..., denoising_strength=)``
      (:class:`~diffusers_wan_ext.schedulers.WanFlowMatchScheduler`, exact DiffSynth schedule) or be a flow
      scheduler that shifts custom ``sigmas`` (``FlowMatchEulerDiscreteScheduler`` without dynamic shifting, UniPC
      with ``use_flow_sigmas``, :class:`~diffusers_wan_ext.schedulers.WanFlowUniPCScheduler`); those get
      ``sigmas=linspace(denoising_strength, 0, N + 1)[:N]``.  ``strength`` is ignored when it is given.
    * ``video_latents`` -- the clean, normalized latents of the input video (what ``vae.encode`` followed by the
      ``latents_mean`` / ``latents_std`` normalization returns), instead of ``video``; the VAE encoder is skipped.
    * ``noise`` -- the Gaussian noise mixed into the input latents (default: drawn with ``generator``, as stock does).

    Args:
        tokenizer ([`AutoTokenizer`]): umT5 tokenizer (may be ``None`` when only ``prompt_embeds`` are passed).
        text_encoder ([`UMT5EncoderModel`]): umT5 encoder (may be ``None`` when only ``prompt_embeds`` are passed).
        transformer ([`WanTransformer3DModel`]): the Wan DiT.
        vae ([`AutoencoderKLWan`]): Wan VAE (may be ``None`` with ``video_latents`` and ``output_type="latent"``).
        scheduler ([`FlowMatchEulerDiscreteScheduler`] or any flow scheduler): e.g.
            :class:`~diffusers_wan_ext.schedulers.WanFlowMatchScheduler` for DiffSynth-exact sampling.

    Example:
        >>> import torch
        >>> from diffusers_wan_ext.pipelines import WanVideoToVideoReferencePipeline
        >>> from diffusers_wan_ext.schedulers import WanFlowMatchScheduler
        >>> pipe = WanVideoToVideoReferencePipeline.from_pretrained(  # doctest: +SKIP
        ...     "Wan2.1-T2V-1.3B-Diffusers", scheduler=WanFlowMatchScheduler(shift=5.0), torch_dtype=torch.bfloat16
        ... )
        >>> video = pipe(video=frames, prompt="a cat surfing", denoising_strength=0.6,  # doctest: +SKIP
        ...              num_inference_steps=50).frames[0]
    """

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        transformer: WanTransformer3DModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler | WanFlowMatchScheduler,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
        )

    #: Classifier-free guidance through the shared loop: CFG parallel and CFG batching work.
    supports_cfg_parallel = True
    cfg_batching = True

    # ------------------------------------------------------------------------------------------- overrides
    def get_timesteps(
        self,
        num_inference_steps: int,
        timesteps: torch.Tensor,
        strength: float,
        device,
        denoising_strength: float | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Stock truncation by ``strength``, or -- with ``denoising_strength`` -- DiffSynth's full ``N``-step schedule
        starting at ``shift(denoising_strength)`` (``timesteps`` is then rebuilt on the scheduler)."""
        if denoising_strength is None:
            return super().get_timesteps(num_inference_steps, timesteps, strength, device)
        set_strength_schedule(self.scheduler, num_inference_steps, denoising_strength, device)
        return self.scheduler.timesteps, len(self.scheduler.timesteps)

    def prepare_latents(
        self,
        video: torch.Tensor | None = None,
        batch_size: int = 1,
        num_channels_latents: int = 16,
        height: int = 480,
        width: int = 832,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        video_latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stock start latents, or the given clean ``video_latents`` (else ``video``, encoded as stock does) noised
        with ``noise`` (else drawn with ``generator``) to ``timestep``."""
        if video_latents is None and noise is None:
            return super().prepare_latents(
                video, batch_size, num_channels_latents, height, width, dtype, device, generator, latents, timestep
            )
        clean = self.encode_video_latents(video, device=device, dtype=dtype) if video_latents is None else video_latents
        clean = clean.to(device=device, dtype=dtype)
        if clean.shape[0] != batch_size:
            if clean.shape[0] != 1:
                raise ValueError(f"video_latents has batch {clean.shape[0]}, expected 1 or {batch_size}")
            clean = clean.expand(batch_size, *clean.shape[1:])
        if noise is None:
            noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=dtype)
        else:
            noise = noise.to(device=device, dtype=dtype)
            if tuple(noise.shape) != tuple(clean.shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, the input latents {tuple(clean.shape)}")
        if hasattr(self.scheduler, "add_noise"):
            return self.scheduler.add_noise(clean, noise, timestep)
        return self.scheduler.scale_noise(clean, timestep, noise)

    def encode_video_latents(
        self, video: torch.Tensor, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Normalized VAE latents of a preprocessed video ``[B, 3, F, H, W]`` in ``[-1, 1]`` (stock's encoding)."""
        video = video.to(device=device, dtype=self.vae.dtype)
        init = torch.cat([retrieve_latents(self.vae.encode(v.unsqueeze(0)), sample_mode="argmax") for v in video])
        init = init.to(dtype)
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(init.device, init.dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(init.device, init.dtype)
        return (init - mean) * inv_std

    @staticmethod
    def _check_reference_inputs(video, latents, timesteps, denoising_strength, video_latents, noise) -> None:
        if video_latents is not None and (video is not None or latents is not None):
            raise ValueError("pass only one of `video`, `video_latents` and `latents`")
        if noise is not None and latents is not None:
            raise ValueError("`latents` are already-noised start latents; `noise` applies to `video` / `video_latents`")
        if denoising_strength is not None:
            if not 0.0 <= float(denoising_strength) <= 1.0:
                raise ValueError(f"`denoising_strength` must be in [0, 1], got {denoising_strength}")
            if timesteps is not None:
                raise ValueError("`denoising_strength` builds its own schedule; do not pass `timesteps`")

    # ----------------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        video: list[Image.Image] | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 832,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 5.0,
        strength: float = 0.8,
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
        denoising_strength: float | None = None,
        video_latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        cfg_batching: bool | None = None,
        sliding_window_size: int | None = None,
        sliding_window_stride: int | None = None,
    ) -> WanPipelineOutput | tuple:
        r"""
        Video-to-video generation; the arguments of :meth:`diffusers.WanVideoToVideoPipeline.__call__` plus:

        Args:
            denoising_strength (`float`, *optional*):
                DiffSynth-Studio's strength in ``[0, 1]``: all ``num_inference_steps`` steps run on the schedule
                ``linspace(denoising_strength, 0, N + 1)[:N]`` (shifted by the scheduler), and the input latents are
                noised to its first sigma.  ``None`` keeps stock's ``strength`` rule.
            video_latents (`torch.Tensor`, *optional*):
                Clean normalized latents ``[B, C, T, h, w]`` of the input video, instead of ``video`` (the VAE
                encoder is not run).  Mutually exclusive with ``video`` and ``latents``.
            noise (`torch.Tensor`, *optional*):
                Noise of the same shape as the input latents, mixed in as ``(1 - sigma_0) * x0 + sigma_0 * noise``
                (default: drawn with ``generator``).  Not used together with ``latents`` (already noised start
                latents, used as given as in stock).
            cfg_batching (`bool`, *optional*):
                With guidance, run the conditional and unconditional pass as one transformer forward of batch
                ``2 x B`` (default: :attr:`cfg_batching`, ``True``); ``False``: stock's two forwards.
            sliding_window_size (`int`, *optional*), sliding_window_stride (`int`, *optional*):
                Temporal sliding windows in latent frames (DiffSynth-Studio's option): each transformer forward runs per
                window of ``sliding_window_size`` latent frames, ``sliding_window_stride`` apart, and the windows are
                blended (:mod:`diffusers_wan_ext.hooks.sliding_window`, ``docs/long_video.md``).  ``None``: off.

        Examples:
            >>> out = pipe(video_latents=x0, noise=eps, denoising_strength=0.6, num_inference_steps=4,  # doctest: +SKIP
            ...            prompt_embeds=ctx, negative_prompt_embeds=neg, height=480, width=832, output_type="latent")
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        self._check_reference_inputs(video, latents, timesteps, denoising_strength, video_latents, noise)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = height or self.transformer.config.sample_height * self.vae_scale_factor_spatial
        width = width or self.transformer.config.sample_width * self.vae_scale_factor_spatial
        self.check_inputs(
            prompt, negative_prompt, height, width, video, latents if video_latents is None else video_latents,
            prompt_embeds, negative_prompt_embeds, callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        transformer_dtype = self.transformer.dtype
        prompt_embeds, negative_prompt_embeds = self.encode_text(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            num_videos_per_prompt=1,  # as stock: one video per prompt
            max_sequence_length=max_sequence_length, dtype=transformer_dtype, device=device,
        )

        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, "cpu" if XLA_AVAILABLE else device, timesteps
        )
        timesteps, num_inference_steps = self.get_timesteps(
            num_inference_steps, timesteps, strength, device, denoising_strength=denoising_strength
        )
        if latents is None and video_latents is None:
            video = self.video_processor.preprocess_video(video, height=height, width=width).to(device, torch.float32)
        latents = self.prepare_latents(
            video, prompt_embeds.shape[0], self.transformer.config.in_channels, height, width, torch.float32, device,
            generator, latents, timesteps[:1].repeat(prompt_embeds.shape[0]), video_latents=video_latents, noise=noise,
        )

        latents = self.denoise(**forwarded(locals(), self.denoise))
        video = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)


def set_strength_schedule(scheduler, num_inference_steps: int, denoising_strength: float, device=None) -> None:
    """Set DiffSynth's ``denoising_strength`` schedule on ``scheduler``: ``N`` steps from ``shift(strength)`` to 0.

    Schedulers with a ``denoising_strength`` argument (``WanFlowMatchScheduler``) build it themselves; flow schedulers
    that shift custom sigmas get ``sigmas = linspace(strength, 0, N + 1)[:N]``.  Anything else raises.
    """
    params = inspect.signature(scheduler.set_timesteps).parameters
    if "denoising_strength" in params:
        scheduler.set_timesteps(num_inference_steps, device=device, denoising_strength=denoising_strength)
        return
    cfg = scheduler.config
    shifts_sigmas = (
        isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or bool(cfg.get("use_flow_sigmas", False))
    ) and not cfg.get("use_dynamic_shifting", False)
    if "sigmas" not in params or not shifts_sigmas:
        raise ValueError(
            f"{type(scheduler).__name__} cannot run DiffSynth's `denoising_strength` schedule: use "
            "WanFlowMatchScheduler, or a flow scheduler with a fixed shift that shifts custom `sigmas`"
        )
    sigmas = np.linspace(float(denoising_strength), 0.0, num_inference_steps + 1)[:-1]
    scheduler.set_timesteps(sigmas=sigmas, device=device)
