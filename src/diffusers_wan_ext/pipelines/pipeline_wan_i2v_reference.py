"""``WanImageToVideoReferencePipeline``: stock ``WanImageToVideoPipeline`` with pre-encoded image latents and the
reference first-frame pinning of Wan2.2 TI2V-5B.

Stock ``WanImageToVideoPipeline`` with ``expand_timesteps=True`` (Wan2.2 TI2V-5B image-to-video) already follows the
original Wan2.2 code and DiffSynth-Studio where the model is concerned: latent frame 0 of the model input is the
image latent, and its tokens get timestep 0 (``(first_frame_mask[0][0][:, ::2, ::2] * t).flatten()``).  It differs
in what it keeps between steps: the references pin the state after every step (original
``latent = (1 - mask2) * z + mask2 * latent``; DiffSynth ``latents[:, :, 0:1] = first_frame_latents``), while stock
steps frame 0 of its state like any other frame and only replaces it in the model input and after the loop.  The
model outputs, the other frames and the final latents are the same (the Euler and UniPC updates act per element);
the state a ``callback_on_step_end`` sees (and may edit) is not -- its frame 0 is drifting noise in stock.

This subclass

* pins frame 0 after every step, before the user's callback runs, so per-step latents equal the references';
* takes ``image_latents`` -- normalized VAE latents of the conditioning frames -- in place of ``image``, so a caller
  that already has them (or a test that only has them) runs without the VAE encoder;
* denoises through the shared loop (:meth:`~diffusers_wan_ext.pipelines.denoising.WanDenoisingMixin.denoise`:
  stock's steps and expert switch, plus CFG batching and CFG parallel; ``cfg_batching=False`` runs stock's two
  forwards) and has our runtime options
  (:class:`~diffusers_wan_ext.pipelines.runtime_options.WanRuntimeOptionsMixin`).

Everything else -- the preprocessing, the conditioning, the decoding -- is stock's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.models import AutoencoderKLWan, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

from ..conversion.image_encoder import clip_image_features, wan_clip_preprocess
from ..utils.shims import ShimPipelineMixin
from ..lora.loader import WanLoraInteropMixin
from ..schedulers import WanFlowMatchScheduler
from .call_arguments import forwarded
from .denoising import WanDenoisingMixin
from .runtime_options import WanRuntimeOptionsMixin

__all__ = ["WanImageToVideoReferencePipeline"]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name


class WanImageToVideoReferencePipeline(
    ShimPipelineMixin, WanLoraInteropMixin, WanRuntimeOptionsMixin, WanDenoisingMixin, WanImageToVideoPipeline
):
    r"""
    Wan image-to-video (Wan2.1 I2V / FLF2V, Wan2.2 I2V-A14B, Wan2.2 TI2V-5B with ``expand_timesteps=True``) with
    reference first-frame pinning and optional pre-encoded image latents.

    Components and config are those of :class:`diffusers.WanImageToVideoPipeline`.  Differences:

    * With ``expand_timesteps=True`` (TI2V-5B) the latents are pinned to the image latent after every scheduler step
      (``latents = (1 - first_frame_mask) * condition + first_frame_mask * latents``), before
      ``callback_on_step_end`` sees them -- the original Wan2.2 / DiffSynth-Studio state.  Model inputs and outputs
      and the final latents are unchanged.
    * ``__call__`` accepts ``image_latents`` instead of ``image`` (see there); the VAE encoder is then not run.  The
      VAE must still be given: the pipeline reads its ``z_dim`` and scale factors.
    * ``cfg_batching`` (class default and call argument): cond + uncond as one forward of batch ``2 x B``.

    Args:
        tokenizer ([`AutoTokenizer`]): umT5 tokenizer (may be ``None`` when only ``prompt_embeds`` are passed).
        text_encoder ([`UMT5EncoderModel`]): umT5 encoder (may be ``None`` when only ``prompt_embeds`` are passed).
        vae ([`AutoencoderKLWan`]): Wan VAE (its config gives ``z_dim`` and the scale factors).
        scheduler ([`FlowMatchEulerDiscreteScheduler`] or another flow scheduler): e.g.
            :class:`~diffusers_wan_ext.schedulers.WanFlowMatchScheduler` (DiffSynth) or
            :class:`~diffusers_wan_ext.schedulers.WanFlowUniPCScheduler` (original Wan code).
        image_processor ([`CLIPImageProcessor`], *optional*): CLIP preprocessing (Wan2.1 I2V / FLF2V only).
        image_encoder ([`CLIPVisionModel`], *optional*): CLIP vision tower (Wan2.1 I2V / FLF2V only).
        transformer ([`WanTransformer3DModel`], *optional*): the (high-noise) DiT.
        transformer_2 ([`WanTransformer3DModel`], *optional*): the low-noise expert of Wan2.2 A14B.
        boundary_ratio (`float`, *optional*): expert switch at ``boundary_ratio * num_train_timesteps``.
        expand_timesteps (`bool`, defaults to `False`): Wan2.2 TI2V-5B mode (first frame = image latent).

    Example:
        >>> import torch
        >>> from diffusers_wan_ext.pipelines import WanImageToVideoReferencePipeline
        >>> from diffusers_wan_ext.schedulers import WanFlowMatchScheduler
        >>> pipe = WanImageToVideoReferencePipeline.from_pretrained(  # doctest: +SKIP
        ...     "Wan2.2-TI2V-5B-Diffusers", scheduler=WanFlowMatchScheduler(shift=5.0), torch_dtype=torch.bfloat16
        ... )
        >>> video = pipe(image=image, prompt="a cat surfing", height=704, width=1280,  # doctest: +SKIP
        ...              num_frames=121).frames[0]
        >>> # or with latents encoded beforehand ([1, 48, 1, 44, 80] for TI2V-5B at 704x1280):
        >>> video = pipe(image_latents=z, prompt="a cat surfing", height=704, width=1280).frames[0]  # doctest: +SKIP
    """

    #: Classifier-free guidance through the shared loop: CFG parallel and CFG batching work.
    supports_cfg_parallel = True
    cfg_batching = True

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler | WanFlowMatchScheduler,
        image_processor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModel | None = None,
        transformer: WanTransformer3DModel | None = None,
        transformer_2: WanTransformer3DModel | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            image_processor=image_processor,
            image_encoder=image_encoder,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=boundary_ratio,
            expand_timesteps=expand_timesteps,
        )
        self._reference_call: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------- overrides
    def encode_image(self, image: PipelineImageInput, device: torch.device | None = None) -> torch.Tensor:
        """CLIP features with the references' preprocessing (original Wan2.1 ``clip.visual`` / DiffSynth).

        Each image is resized to the video size and mapped to ``[-1, 1]`` (the pipeline's own video preprocessing),
        then :func:`~diffusers_wan_ext.conversion.image_encoder.wan_clip_preprocess` resizes it with torch bicubic
        interpolation straight to the encoder's input size (no crop, no antialias) and normalises it; the feature is
        the output of all blocks but the last (``hidden_states[-2]``).  FLF2V passes ``[image, last_image]`` and gets
        both images' tokens.  Stock uses ``CLIPImageProcessor`` (PIL resize of the shortest side + center crop).
        """
        device = device or self._execution_device
        call = self._reference_call or {}
        images = image if isinstance(image, (list, tuple)) else [image]
        size = self.image_encoder.config.image_size
        pixels = []
        for im in images:
            x = self.video_processor.preprocess(im, height=call.get("height"), width=call.get("width"))
            pixels.append(wan_clip_preprocess(x.float(), size))
        return clip_image_features(self.image_encoder, torch.cat(pixels)).to(device)

    def prepare_latents(
        self,
        image: PipelineImageInput,
        batch_size: int,
        num_channels_latents: int = 16,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        last_image: torch.Tensor | None = None,
        image_latents: torch.Tensor | None = None,
    ):
        """Stock preparation, or -- with ``image_latents`` -- the same outputs from the given latents (no VAE)."""
        if image_latents is None:
            return super().prepare_latents(
                image, batch_size, num_channels_latents, height, width, num_frames, dtype, device, generator,
                latents, last_image,
            )
        return self._prepare_from_image_latents(
            image_latents, batch_size, num_channels_latents, height, width, num_frames, dtype, device, generator,
            latents, last_image is not None,
        )

    def _prepare_from_image_latents(
        self, image_latents, batch_size, num_channels_latents, height, width, num_frames, dtype, device, generator,
        latents, has_last_image,
    ):
        num_latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        latent_height = height // self.vae_scale_factor_spatial
        latent_width = width // self.vae_scale_factor_spatial
        shape = (batch_size, num_channels_latents, num_latent_frames, latent_height, latent_width)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for an effective batch size of {batch_size}")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)

        condition = image_latents.to(device=device, dtype=dtype)
        frames = 1 if self.config.expand_timesteps else num_latent_frames
        expected = (num_channels_latents, frames, latent_height, latent_width)
        if condition.ndim != 5 or tuple(condition.shape[1:]) != expected:
            what = "the first latent frame" if self.config.expand_timesteps else "the whole conditioning video"
            raise ValueError(
                f"image_latents must be [B, {', '.join(map(str, expected))}] ({what}), got {tuple(condition.shape)}"
            )
        if condition.shape[0] != batch_size:
            if condition.shape[0] != 1:
                raise ValueError(f"image_latents has batch {condition.shape[0]}, expected 1 or {batch_size}")
            condition = condition.repeat(batch_size, 1, 1, 1, 1)

        if self.config.expand_timesteps:
            first_frame_mask = torch.ones(
                1, 1, num_latent_frames, latent_height, latent_width, dtype=dtype, device=device
            )
            first_frame_mask[:, :, 0] = 0
            return latents, condition, first_frame_mask

        # Wan2.1 I2V / FLF2V mask (as stock): pixel frames 0 (and the last one with an end image) are known; frame 0
        # repeated vae_scale_factor_temporal times, folded into vae_scale_factor_temporal mask channels.
        mask = torch.ones(batch_size, 1, num_frames, latent_height, latent_width)
        if has_last_image:
            mask[:, :, 1 : num_frames - 1] = 0
        else:
            mask[:, :, 1:] = 0
        first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=self.vae_scale_factor_temporal)
        mask = torch.cat([first, mask[:, :, 1:]], dim=2)
        mask = mask.view(batch_size, -1, self.vae_scale_factor_temporal, latent_height, latent_width).transpose(1, 2)
        mask = mask.to(condition.device)
        return latents, torch.cat([mask, condition], dim=1)

    def _any_transformer(self) -> torch.nn.Module:
        return self.transformer if self.transformer is not None else self.transformer_2

    def _image_embeds(self, image, last_image, image_embeds, batch_size: int, device, dtype) -> torch.Tensor | None:
        """CLIP features of ``image`` (and ``last_image``) when the transformer has a CLIP branch (as stock)."""
        if self.transformer is None or self.transformer.config.image_dim is None:
            return image_embeds
        if image_embeds is None:
            image_embeds = self.encode_image(image if last_image is None else [image, last_image], device)
        return image_embeds.repeat(batch_size, 1, 1).to(dtype)

    def _size_and_frames(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        """Stock's rounding: ``num_frames`` to ``4n + 1``, the size to whole patches (each with a warning)."""
        t = self.vae_scale_factor_temporal
        if num_frames % t != 1:
            logger.warning(f"`num_frames - 1` has to be divisible by {t}. Rounding to the nearest number.")
            num_frames = num_frames // t * t + 1
        patch_size = self._any_transformer().config.patch_size
        h_multiple_of = self.vae_scale_factor_spatial * patch_size[1]
        w_multiple_of = self.vae_scale_factor_spatial * patch_size[2]
        calc_height, calc_width = height // h_multiple_of * h_multiple_of, width // w_multiple_of * w_multiple_of
        if height != calc_height or width != calc_width:
            logger.warning(
                f"`height` and `width` must be multiples of ({h_multiple_of}, {w_multiple_of}) for proper "
                f"patchification. Adjusting ({height}, {width}) -> ({calc_height}, {calc_width})."
            )
        return calc_height, calc_width, max(num_frames, 1)

    def _conditioning(self, prepared: tuple) -> dict[str, Callable]:
        """The :meth:`denoise` functions of the conditioning: Wan2.1 / A14B I2V concatenate the mask + condition
        channels; TI2V-5B (``expand_timesteps``) replaces latent frame 0 by the image latent in the model input, gives
        its tokens timestep 0 and pins the state after every step (the references' state)."""
        if not self.config.expand_timesteps:
            condition = prepared[1]
            return dict(model_input=lambda x: torch.cat([x, condition], dim=1))
        _, condition, first_frame_mask = prepared

        def pin(x: torch.Tensor) -> torch.Tensor:
            return (1 - first_frame_mask) * condition + first_frame_mask * x

        def per_token_timesteps(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return (first_frame_mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(x.shape[0], -1)

        return dict(model_input=pin, timestep_of=per_token_timesteps, after_step=lambda x, i: pin(x))

    # ----------------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
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
        image_embeds: torch.Tensor | None = None,
        last_image: torch.Tensor | None = None,
        output_type: str | None = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        image_latents: torch.Tensor | None = None,
        cfg_batching: bool | None = None,
        sliding_window_size: int | None = None,
        sliding_window_stride: int | None = None,
    ) -> WanPipelineOutput | tuple:
        r"""
        Image-to-video generation; the arguments of :meth:`diffusers.WanImageToVideoPipeline.__call__` plus:

        Args:
            image_latents (`torch.Tensor`, *optional*):
                Normalized VAE latents of the conditioning frames (``(vae.encode(x).mode - latents_mean) /
                latents_std``), used instead of encoding ``image`` (and ``last_image``):

                * ``expand_timesteps=True`` (TI2V-5B): the image latent ``[B, z_dim, 1, h, w]``;
                * otherwise: the latents of the whole conditioning video ``[image, zeros..., (last_image)]``,
                  ``[B, z_dim, T_lat, h, w]`` (the frame mask is built here as in stock).

                ``image`` may then be omitted unless the transformer has a CLIP branch and no ``image_embeds`` are
                given (CLIP still needs the pixels).
            cfg_batching (`bool`, *optional*):
                With guidance, run the conditional and unconditional pass as one transformer forward of batch
                ``2 x B`` (default: :attr:`cfg_batching`, ``True``); ``False``: stock's two forwards.
            sliding_window_size (`int`, *optional*), sliding_window_stride (`int`, *optional*):
                Temporal sliding windows in latent frames (DiffSynth-Studio's option): each transformer forward runs per
                window of ``sliding_window_size`` latent frames, ``sliding_window_stride`` apart, and the windows are
                blended (:mod:`diffusers_wan_ext.hooks.sliding_window`, ``docs/long_video.md``).  ``None``: off.

        Examples:
            >>> out = pipe(image_latents=z, latents=noise, prompt_embeds=ctx,  # doctest: +SKIP
            ...            negative_prompt_embeds=neg, height=704, width=1280, num_frames=121, output_type="latent")
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        if image is None and image_latents is None:
            raise ValueError("pass `image` or `image_latents`")
        if image_latents is not None and image is None:
            needs_clip = self.transformer is not None and self.transformer.config.image_dim is not None
            if needs_clip and image_embeds is None:
                raise ValueError(
                    "this transformer has a CLIP branch: with `image_latents` pass `image` or `image_embeds`"
                )
            image = torch.zeros(1, 3, height, width)  # preprocessed as stock does; its pixels are not used
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, negative_prompt, image, height, width, prompt_embeds, negative_prompt_embeds, image_embeds,
            callback_on_step_end_tensor_inputs, guidance_scale_2,
        )
        height, width, num_frames = self._size_and_frames(height, width, num_frames)
        if self.config.boundary_ratio is not None and guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale
        self._guidance_scale, self._guidance_scale_2 = guidance_scale, guidance_scale_2
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        if prompt is not None:  # prompts (not videos), as stock counts them: its CLIP features repeat per prompt
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        transformer_dtype = self._any_transformer().dtype
        prompt_embeds, negative_prompt_embeds = self.encode_text(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            num_videos_per_prompt=num_videos_per_prompt, max_sequence_length=max_sequence_length,
            dtype=transformer_dtype, device=device,
        )
        self._reference_call = {"height": height, "width": width}  # encode_image resizes to the video size
        try:
            image_embeds = self._image_embeds(image, last_image, image_embeds, batch_size, device, transformer_dtype)
        finally:
            self._reference_call = None

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        image = self.video_processor.preprocess(image, height=height, width=width).to(device, dtype=torch.float32)
        if last_image is not None:
            last_image = self.video_processor.preprocess(last_image, height=height, width=width)
            last_image = last_image.to(device, dtype=torch.float32)
        prepared = self.prepare_latents(
            image, batch_size * num_videos_per_prompt, self.vae.config.z_dim, height, width, num_frames,
            torch.float32, device, generator, latents, last_image, image_latents=image_latents,
        )
        conditioning = self._conditioning(prepared)
        latents = self.denoise(**forwarded(
            locals(),
            self.denoise,
            latents=prepared[0],
            transformer_kwargs=dict(encoder_hidden_states_image=image_embeds),
            **conditioning,
        ))
        if self.config.expand_timesteps:  # as stock: frame 0 is the image latent (also when interrupted)
            latents = conditioning["model_input"](latents)
        video = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)
