"""``LongCatVideoPipeline``: meituan-longcat/LongCat-Video text-to-video, video continuation and image-to-video.

Components: umT5 ``tokenizer`` / ``text_encoder`` and the Wan2.1 ``vae`` (stock Diffusers / Transformers classes),
a flow-matching ``scheduler`` (stock ``FlowMatchEulerDiscreteScheduler``, ``shift`` 12 as released) and the
:class:`~diffusers_wan_ext.LongCatVideoTransformer3DModel`.

Sampling follows the original ``LongCatVideoPipeline`` (``generate_t2v`` / ``generate_vc`` / ``generate_i2v``):

* sigmas ``linspace(1, 0.001, N)`` through the scheduler's shift; for continuation the original's ``enhance_hf``
  schedule (the steps above t = 500, then 10 uniform steps 500, 450, ..., 50); ``use_distill`` gives the schedule of
  the released distillation LoRA;
* the transformer output is the *negated* velocity; guidance is CFG-Zero* (``cfg_zero_star``: the unconditional
  prediction is rescaled by ``<cond, uncond> / |uncond|^2`` per sample, over the generated frames) --
  ``cfg_zero_star=False`` gives plain CFG (DiffSynth-Studio);
* conditioning (``video`` = the last ``num_cond_frames`` frames, or ``image`` = one frame) is VAE-encoded (posterior
  mean, normalized) into the first ``K`` latent frames, which keep timestep 0, stay clean through sampling and are
  computed once into a KV cache (``use_kv_cache``, the original's default for continuation);
* the timestep reaches the transformer in its dtype (bf16 rounds it, as the original does).

Deviations from the original (text-to-video is unaffected):

* the CFG-Zero* scale is always taken over the generated frames; the original's uncached paths (``generate_i2v``,
  ``generate_vc(use_kv_cache=False)``) also count the conditioning frames' discarded predictions, so there caching
  changed the result -- here ``use_kv_cache`` only changes speed;
* the conditioning frames are encoded with the posterior mean (the original samples the posterior with the
  generator; DiffSynth-Studio uses the mean);
* the size is not snapped to the original's resolution buckets: pass ``height`` / ``width``.

The returned video holds all ``num_frames`` frames, the (VAE-reconstructed) conditioning frames first.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import LTXVideoLoraLoaderMixin
from diffusers.models import AutoencoderKLWan
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, UMT5EncoderModel

from ..utils.shims import ShimPipelineMixin
from ..conversion.longcat import convert_longcat_lora_state_dict, is_longcat_lora_state_dict
from ..conversion.text_encoder import encode_prompt_context
from ..lora.loader import check_lora_state_dict
from ..models.transformer_longcat import LongCatVideoTransformer3DModel
from ..utils.validation import validate_video_size
from ..utils.media import encode_video, load_image, read_video_file, video_to_tensor
from .call_arguments import forwarded
from .denoising import WanDenoisingMixin, cfg_guide
from .runtime_options import WanRuntimeOptionsMixin

__all__ = ["LongCatVideoLoraLoaderMixin", "LongCatVideoPipeline", "cfg_zero_star_guide", "longcat_sigmas"]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

#: The original's ``enhance_hf`` tail: steps above ``start`` are kept, then ``num`` uniform steps ``start .. > 0``.
ENHANCE_HF_TAIL = dict(start=500.0, num=10)
#: Steps of the original distillation schedule (``use_distill``: ``_num_distill_sample_steps``).
DISTILL_STEPS = 50


def longcat_sigmas(
    num_inference_steps: int, shift: float, *, enhance_hf: bool = False, use_distill: bool = False
) -> np.ndarray:
    """The original LongCat-Video sampling sigmas (after the scheduler's shift), without the final 0.

    * default: ``linspace(1, 0.001, N)`` shifted by ``shift * s / (1 + (shift - 1) * s)``;
    * ``use_distill``: every ``1000 / 50``-th training timestep, ``N`` of them, shifted;
    * ``enhance_hf``: of those, the ones above t = 500, then 10 uniform timesteps 500, 450, ..., 50 (not shifted).

    Example:
        >>> [round(float(s), 4) for s in longcat_sigmas(4, 12.0)]
        [1.0, 0.9601, 0.8575, 0.0119]
        >>> len(longcat_sigmas(50, 12.0, enhance_hf=True))  # 46 steps above t = 500, then 500, 450, ..., 50
        56
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1; got {num_inference_steps}")
    if use_distill and enhance_hf:
        raise ValueError("use_distill and enhance_hf cannot both be set (the original refuses it too)")
    if use_distill:
        idx = (np.arange(1, DISTILL_STEPS + 1, dtype=np.float32) * (1000 // DISTILL_STEPS)).round().astype(np.int64)
        picks = np.floor(np.linspace(0, DISTILL_STEPS, num=num_inference_steps, endpoint=False)).astype(np.int64)
        base = idx[::-1][picks].astype(np.float32) / 1000
    else:
        base = np.linspace(1, 0.001, num_inference_steps).astype(np.float32)
    sigmas = (shift * base / (1 + (shift - 1) * base)).astype(np.float32)
    if enhance_hf:
        start, num = ENHANCE_HF_TAIL["start"], ENHANCE_HF_TAIL["num"]
        tail = np.linspace(start, 0, num, endpoint=False, dtype=np.float32)
        sigmas = np.concatenate([sigmas[sigmas * 1000 > start], tail / 1000]).astype(np.float32)
    return sigmas


def cfg_zero_star_guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG-Zero* (the original's ``optimized_scale``): the unconditional prediction rescaled per sample by
    ``<cond, uncond> / |uncond|^2``, then classifier-free guidance."""
    c, u = cond.flatten(1).float(), uncond.flatten(1).float()
    st = ((c * u).sum(1) / (u.pow(2).sum(1) + 1e-8)).view(-1, *([1] * (cond.ndim - 1)))
    return cfg_guide(cond, uncond * st.to(uncond.dtype), scale)


def _load_condition_video(video: Any, height: int, width: int) -> torch.Tensor:
    """``video`` -> ``[1, 3, F, H, W]`` in [-1, 1]; PIL frames and files are resized to ``height x width`` (LANCZOS,
    as the original's ``VideoProcessor``), arrays and tensors must already have that size."""
    if isinstance(video, (str, os.PathLike)):
        video = read_video_file(video, "video")
    if isinstance(video, (list, tuple)) and video and all(isinstance(f, PIL.Image.Image) for f in video):
        video = [f.convert("RGB") if f.size == (width, height) else f.convert("RGB").resize((width, height), PIL.Image.LANCZOS)
                 for f in video]
    t = video_to_tensor(video, "video")
    if tuple(t.shape[-2:]) != (height, width):
        raise ValueError(
            f"video frames are {t.shape[-2]}x{t.shape[-1]} (height x width) but height={height}, width={width}: resize "
            f"them, pass PIL frames (resized for you), or pass height={t.shape[-2]}, width={t.shape[-1]}"
        )
    return t


class LongCatVideoLoraLoaderMixin(LTXVideoLoraLoaderMixin):
    """``load_lora_weights`` / ``save_lora_weights`` / ``fuse_lora`` for the single ``transformer`` (Diffusers'
    single-transformer LoRA loader), reading Diffusers / PEFT files and the original LongCat-Video format (the
    release's ``lora/cfg_step_lora.safetensors`` and ``lora/refinement_lora.safetensors``), which is converted by
    :func:`~diffusers_wan_ext.conversion.longcat.convert_longcat_lora_state_dict`.  Every key is checked against
    the transformer first (:func:`~diffusers_wan_ext.lora.loader.check_lora_state_dict`): none is dropped.

    Example:
        >>> pipe.load_lora_weights("LongCat-Video/lora", weight_name="cfg_step_lora.safetensors",  # doctest: +SKIP
        ...                        adapter_name="distill")
        >>> video = pipe(prompt, num_inference_steps=16, guidance_scale=1.0, use_distill=True).frames[0]  # doctest: +SKIP
    """

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        with_metadata = kwargs.get("return_lora_metadata", False)
        out = super().lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        state_dict, metadata = out if with_metadata else (out, None)
        if is_longcat_lora_state_dict(state_dict):
            state_dict = convert_longcat_lora_state_dict(state_dict)
        return (state_dict, metadata) if with_metadata else state_dict

    @classmethod
    def load_lora_into_transformer(cls, state_dict, transformer, *args, **kwargs):
        """Stock loading, after checking every key against the transformer: keys that match no layer, or whose
        shapes do not fit it, raise a ``ValueError`` naming them (stock would log and drop them)."""
        state_dict = check_lora_state_dict(transformer, state_dict, prefix=cls.transformer_name)
        return super().load_lora_into_transformer(state_dict, transformer, *args, **kwargs)


class LongCatVideoPipeline(
    ShimPipelineMixin, WanRuntimeOptionsMixin, WanDenoisingMixin, LongCatVideoLoraLoaderMixin, DiffusionPipeline
):
    r"""
    LongCat-Video: text-to-video, video continuation (``video``) and image-to-video (``image``).

    Args:
        tokenizer (`AutoTokenizer`): the umT5 tokenizer.
        text_encoder (`UMT5EncoderModel`): umT5-XXL encoder (the Wan2.1 text encoder).
        vae (`AutoencoderKLWan`): the Wan2.1 VAE.
        scheduler (`FlowMatchEulerDiscreteScheduler`): flow-matching Euler (``shift`` 12 in the release).
        transformer (`LongCatVideoTransformer3DModel`): the LongCat-Video DiT.

    LoRA: :class:`LongCatVideoLoraLoaderMixin` (Diffusers / PEFT files and the original LongCat format, e.g. the
    released distillation LoRA: ``use_distill=True``, 16 steps, ``guidance_scale=1``).

    Example:
        >>> import torch
        >>> from diffusers import DiffusionPipeline
        >>> import diffusers_wan_ext  # registers LongCatVideoPipeline
        >>> pipe = DiffusionPipeline.from_pretrained("LongCat-Video-diffusers", torch_dtype=torch.bfloat16)  # doctest: +SKIP
        >>> pipe.to("cuda")  # doctest: +SKIP
        >>> video = pipe("a cat surfing a wave", num_frames=93).frames[0]  # doctest: +SKIP
        >>> more = pipe("the cat jumps off the board", video=video, num_cond_frames=13).frames[0]  # doctest: +SKIP
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    #: Classifier-free guidance (CFG-Zero*) through the shared loop: CFG parallel and CFG batching work.
    supports_cfg_parallel = True
    cfg_batching = True

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer: LongCatVideoTransformer3DModel,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
        )
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    # ---------------------------------------------------------------------------------------------- prompts
    def _get_t5_prompt_embeds(
        self, prompt: str | list[str], num_videos_per_prompt: int, max_sequence_length: int, device, dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = [prompt_clean(p) for p in ([prompt] if isinstance(prompt, str) else prompt)]
        inputs = self.tokenizer(
            prompt, padding="max_length", max_length=max_sequence_length, truncation=True, add_special_tokens=True,
            return_attention_mask=True, return_tensors="pt",
        )
        embeds = encode_prompt_context(self.text_encoder, inputs.input_ids, inputs.attention_mask)
        embeds = embeds.to(device=device, dtype=dtype).repeat_interleave(num_videos_per_prompt, dim=0)
        mask = inputs.attention_mask.to(device).repeat_interleave(num_videos_per_prompt, dim=0)
        return embeds, mask

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """umT5 embeddings ``[B, L, C]`` (rows past each prompt zeroed) and their masks ``[B, L]`` for the prompt
        and, with guidance, the negative prompt (default ``""``).  Given embeddings without a mask get an all-ones
        mask (every row is a real token)."""
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype
        if prompt_embeds is None:
            prompt_embeds, prompt_attention_mask = self._get_t5_prompt_embeds(
                prompt, num_videos_per_prompt, max_sequence_length, device, dtype
            )
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            batch = len(prompt) if isinstance(prompt, list) else (1 if prompt is not None else prompt_embeds.shape[0])
            negative_prompt = negative_prompt or ""
            negative_prompt = batch * [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if len(negative_prompt) != batch:
                raise ValueError(
                    f"negative_prompt has {len(negative_prompt)} entries but there are {batch} prompts; pass one "
                    "negative prompt or one per prompt"
                )
            negative_prompt_embeds, negative_prompt_attention_mask = self._get_t5_prompt_embeds(
                negative_prompt, num_videos_per_prompt, max_sequence_length, device, dtype
            )
        elif negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(
                negative_prompt_embeds.shape[:2], dtype=torch.long, device=negative_prompt_embeds.device
            )
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    # ---------------------------------------------------------------------------------------------- checks
    def check_inputs(
        self, prompt, negative_prompt, height, width, num_frames, prompt_embeds, negative_prompt_embeds, video, image,
        num_cond_frames, callback_on_step_end_tensor_inputs,
    ) -> None:
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass `prompt` (a string or a list of strings) or `prompt_embeds`")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` must be a string or a list of strings; got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise ValueError(f"`negative_prompt` must be a string or a list of strings; got {type(negative_prompt).__name__}")
        patch = self.transformer.config.patch_size[1]
        validate_video_size(height, width, num_frames, self.vae_scale_factor_spatial, self.vae_scale_factor_temporal, patch)
        if video is not None and image is not None:
            raise ValueError("pass either `video` (continuation) or `image` (image-to-video), not both")
        if num_cond_frames is not None and video is None:
            raise ValueError("`num_cond_frames` selects frames of `video`; pass `video` too (or drop num_cond_frames)")
        if callback_on_step_end_tensor_inputs is not None:
            bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if bad:
                raise ValueError(f"callback_on_step_end_tensor_inputs {bad} not in {self._callback_tensor_inputs}")

    def prepare_condition(
        self, video: Any, image: Any, num_cond_frames: int | None, num_frames: int, height: int, width: int
    ) -> torch.Tensor | None:
        """Normalized VAE latents ``[1, C, K, H/8, W/8]`` of the conditioning frames (``None`` without any): the last
        ``num_cond_frames`` frames of ``video`` (default: all of them), or ``image`` as one frame."""
        t = self.vae_scale_factor_temporal
        if image is not None:
            frames = load_image(image, height, width).unsqueeze(2)  # [1, 3, 1, H, W]
        elif video is not None:
            frames = _load_condition_video(video, height, width)
            available = frames.shape[2]
            n = available if num_cond_frames is None else num_cond_frames
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 or (n - 1) % t:
                raise ValueError(
                    f"num_cond_frames={n!r} must be {t}n+1 (1, 5, 9, 13, ...): the conditioning frames are VAE-encoded"
                    + ("" if num_cond_frames is not None else
                       f"; `video` has {available} frames -- pass num_cond_frames to use its last 4n+1 frames")
                )
            if n > available:
                raise ValueError(
                    f"video has only {available} frame(s) but num_cond_frames={n}: pass a longer video or "
                    f"num_cond_frames <= {available} (4n+1)"
                )
            frames = frames[:, :, available - n:]
        else:
            return None
        k = (frames.shape[2] - 1) // t + 1
        total = (num_frames - 1) // t + 1
        if k >= total:
            raise ValueError(
                f"{frames.shape[2]} conditioning frame(s) fill all {num_frames} frames: num_frames must exceed them "
                f"by at least {t} (e.g. num_frames={frames.shape[2] + t}); num_frames counts the conditioning frames"
            )
        return encode_video(self.vae, frames)

    def prepare_latents(
        self,
        cond: torch.Tensor | None,
        batch_size: int,
        num_frames: int,
        height: int,
        width: int,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The start latents ``[B, C, T_lat, H/8, W/8]`` (fp32): noise (``latents``, else drawn with ``generator``)
        whose first latent frames are replaced by the conditioning latents ``cond``."""
        shape = (
            batch_size, self.transformer.config.in_channels, (num_frames - 1) // self.vae_scale_factor_temporal + 1,
            height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for these settings; got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)
        if cond is None:
            return latents
        cond = cond.to(device=device, dtype=torch.float32).expand(batch_size, -1, -1, -1, -1)
        return torch.cat([cond, latents[:, :, cond.shape[2]:]], dim=2)

    # ---------------------------------------------------------------------------------------------- helpers
    def _set_schedule(self, sigmas: np.ndarray, device) -> torch.Tensor:
        """Give the scheduler these (already shifted) sigmas: the scheduler re-applies its ``shift``, so they are
        passed through its inverse, with the exact timesteps ``1000 * sigma``."""
        cfg = self.scheduler.config
        if getattr(cfg, "use_dynamic_shifting", False) or not hasattr(cfg, "shift"):
            raise ValueError(
                f"{type(self.scheduler).__name__} (dynamic shifting: {getattr(cfg, 'use_dynamic_shifting', None)}) cannot "
                "take LongCat's schedule: use FlowMatchEulerDiscreteScheduler(shift=12.0) (the release scheduler)"
            )
        shift = float(cfg.shift)
        pre = sigmas / (shift - (shift - 1) * sigmas)
        self.scheduler.set_timesteps(
            sigmas=pre.tolist(), timesteps=(sigmas * cfg.num_train_timesteps).tolist(), device=device
        )
        return self.scheduler.timesteps

    def _step_noisy_frames(self, velocity: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, k: int) -> torch.Tensor:
        """A scheduler step of the generated frames; the ``k`` conditioning frames are kept as they are (clean)."""
        stepped = self.scheduler.step(velocity, t, latents[:, :, k:], return_dict=False)[0]
        return torch.cat([latents[:, :, :k], stepped], dim=2) if k else stepped

    # ---------------------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        video: Any = None,
        image: Any = None,
        num_cond_frames: int | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 93,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        cfg_zero_star: bool = True,
        enhance_hf: bool | None = None,
        use_distill: bool = False,
        use_kv_cache: bool = True,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        cfg_batching: bool | None = None,
        sliding_window_size: int | None = None,
        sliding_window_stride: int | None = None,
    ) -> WanPipelineOutput | tuple:
        r"""
        Generate a video; with ``video`` continue it, with ``image`` start from it.

        Args:
            prompt (`str` or `list[str]`): what to generate.
            negative_prompt (`str` or `list[str]`, *optional*): what to avoid (default ``""``), used with guidance.
            video (*optional*): frames to continue -- a list of PIL images, an mp4 path, a numpy array
                ``[F, H, W, 3]`` (uint8, or float in [0, 1]) or a tensor ``[F, 3, H, W]`` in [-1, 1].  PIL frames and
                files are resized to ``height x width``.
            image (*optional*): a first frame (PIL image, path, array or tensor) for image-to-video.
            num_cond_frames (`int`, *optional*): use the last ``num_cond_frames`` frames of ``video`` (``4n + 1``;
                the original's continuation uses 13); default: all of ``video``, which must then be ``4n + 1`` long.
            height, width (`int`): frame size, multiples of 16 (the original's 480p bucket is 480 x 832).
            num_frames (`int`): frames of the output video *including* the conditioning frames, ``4n + 1``.
            num_inference_steps (`int`): sampling steps (with ``enhance_hf`` the schedule has the steps above t = 500
                plus 10).
            guidance_scale (`float`): classifier-free guidance; ``<= 1`` disables it (the distilled LoRA uses 1).
            cfg_zero_star (`bool`): CFG-Zero* rescaling of the unconditional prediction (the original); ``False``:
                plain CFG (DiffSynth-Studio).
            enhance_hf (`bool`, *optional*): the original continuation schedule; default: on with ``video`` (unless
                ``use_distill``).
            use_distill (`bool`): the schedule of the released ``cfg_step_lora`` (load it first; use 16 steps,
                ``guidance_scale=1``).
            use_kv_cache (`bool`): compute the conditioning frames once into a KV cache (the original's
                ``use_kv_cache``): the same result within float rounding, faster.
            num_videos_per_prompt (`int`): videos per prompt.
            generator (`torch.Generator`, *optional*): noise generator(s).
            latents (`torch.Tensor`, *optional*): initial noise ``[B, 16, T_lat, H/8, W/8]`` (its conditioning
                frames are replaced).
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): umT5 embeddings ``[B, L, C]``, with
                optional masks ``prompt_attention_mask`` / ``negative_prompt_attention_mask`` ``[B, L]``.
            output_type (`str`): ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``.
            return_dict (`bool`): return a ``WanPipelineOutput``.
            attention_kwargs (`dict`, *optional*): passed to the transformer (``{"scale": lora_scale}``).
            callback_on_step_end, callback_on_step_end_tensor_inputs: step-end callback, as in Diffusers.
            max_sequence_length (`int`): umT5 tokens (512 in the release).
            cfg_batching (`bool`, *optional*): with guidance, run the conditional and unconditional pass as one
                transformer forward of batch ``2 x B`` (default: :attr:`cfg_batching`, ``True``); ``False``: two
                forwards.
            sliding_window_size (`int`, *optional*), sliding_window_stride (`int`, *optional*):
                Not supported by this model (a ``ValueError`` gives the reason); long videos come from video continuation (``video``, ``num_cond_frames``).

        Examples:
            >>> video = pipe("a red fox runs through snow", num_frames=93).frames[0]  # doctest: +SKIP
            >>> longer = pipe("the fox jumps", video=video, num_cond_frames=13, num_frames=93).frames[0]  # doctest: +SKIP

        Returns:
            [`WanPipelineOutput`] with ``frames`` (conditioning frames included), or ``(frames,)``.
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(
            prompt, negative_prompt, height, width, num_frames, prompt_embeds, negative_prompt_embeds, video, image,
            num_cond_frames, callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        transformer_dtype = self.transformer.dtype

        # 1. prompts
        prompt_embeds, prompt_mask, negative_prompt_embeds, negative_mask = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance, num_videos_per_prompt, prompt_embeds,
            prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask, max_sequence_length,
            device, transformer_dtype,
        )
        batch = prompt_embeds.shape[0]

        # 2. conditioning latents, noise
        cond = self.prepare_condition(video, image, num_cond_frames, num_frames, height, width)
        k = 0 if cond is None else cond.shape[2]
        latents = self.prepare_latents(cond, batch, num_frames, height, width, device, generator, latents)

        # 3. schedule
        if enhance_hf is None:
            enhance_hf = video is not None and not use_distill
        sigmas = longcat_sigmas(num_inference_steps, float(self.scheduler.config.shift), enhance_hf=enhance_hf,
                                use_distill=use_distill)
        timesteps = self._set_schedule(sigmas, device)
        self._num_timesteps = len(timesteps)

        # 4. conditioning frames once (KV cache), or in the sequence with num_cond_latents
        kv_cache = None
        if k and use_kv_cache:
            cond = cond[:1].to(device=device, dtype=transformer_dtype)
            kv_cache = self.transformer.build_kv_cache(cond, attention_kwargs=attention_kwargs)

        # 5. denoising (the shared loop; the conditioning frames stay clean)
        latents = self.denoise(**forwarded(
            locals(),
            self.denoise,
            num_inference_steps=len(timesteps),
            model_input=(lambda x: x[:, :, k:]) if kv_cache is not None else None,
            timestep_of=lambda t, x: t.expand(x.shape[0]).to(transformer_dtype),  # bf16 rounds it, as the original
            transformer_kwargs=dict(encoder_attention_mask=prompt_mask, kv_cache=kv_cache,
                                    num_cond_latents=0 if kv_cache is not None else k),
            uncond_transformer_kwargs=dict(encoder_attention_mask=negative_mask),
            guide=cfg_zero_star_guide if cfg_zero_star else None,
            prediction_of=lambda out, x: -out[:, :, out.shape[2] - (x.shape[2] - k):],
            step=lambda velocity, t, x, i: self._step_noisy_frames(velocity, t, x, k),
        ))
        video_out = self.decode_latents(latents, output_type)  # (only the decoding ranks under enable_parallelism)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video_out,)
        return WanPipelineOutput(frames=video_out)
