"""``WanAnimate2Pipeline``: Wan2.2-Animate-2-14B (and its distilled DiT) character animation, as a classic
``DiffusionPipeline``.

The release (and DiffSynth-Studio 2.1.12, the reference: ``WanVideoUnit_Animate2*`` of
``diffsynth/pipelines/wan_video.py`` and ``examples/wanvideo/model_inference/Wan2.2-Animate-2-14B*.py``) takes a
**reference image** (the character) and a **driving video** (the motion; DiffSynth's ``animate2_reference_video``,
raw frames -- no pose / face / background / mask videos, no replacement mode), a prompt, a negative prompt and a
*reference prompt* describing the driving video (``prompt_ref``, DiffSynth's ``animate2_prompt_ref``).  Per clip of
``num_frames`` frames:

* the reference image and the driving clip are resized to ``width x height`` (PIL ``resize``, aspect not kept);
* ``y``: the reference image's VAE latent with an all-ones mask (latent frame 0), then the VAE latents of
  ``num_frames`` zero frames -- or of the previous clip's last frames followed by zeros when continuing -- with a mask
  that is one on those frames;
* the driving clip's VAE latents (with an all-ones mask) run once through the DiT (``kv_cache_mode="extract"``,
  timestep fixed to 1 inside the model) with the reference prompt and the CLIP features of the clip's first frame,
  filling every block's K/V cache;
* every denoising step attends to that cache (``kv_cache_mode="cached"``) with the prompt and the reference image's
  CLIP features; with guidance the negative branch uses the negative prompt and skips block 9 (DiffSynth's
  ``positive=False`` -> ``is_uncondtion``); ``log_scale`` (DiffSynth's ``animate2_log_scale``) biases the scores
  of generation latent frame 1 in both branches (the distilled release: ``-1.3``);
* the schedule is DiffSynth's flow-match Euler (``sigmas = linspace(1, 0, N + 1)[:N]`` through the scheduler's
  shift, 5 for the release); the first latent frame (the reference image's slot) is dropped before decoding.

**Long videos** (``long_video=True``, DiffSynth's ``generate_long_video``): clips of ``num_frames`` frames stepping by
``num_frames - prev_clip_frames``; the driving video is zigzag-padded (``0 1 .. n-1 n-2 .. 0 1 ..``) to whole clips;
each clip after the first is conditioned on the last ``prev_clip_frames`` generated frames of the one before (8-bit
quantized, as DiffSynth's PIL frames are) and its first ``prev_clip_frames`` output frames are dropped; every clip
starts from the same initial noise (DiffSynth re-seeds every clip with the same seed); the output is trimmed to the
driving video's length.

The transformer runs as :class:`~diffusers_wan_ext.models.WanAnimate2ExtTransformer3DModel` (a stock
``WanAnimate2Transformer3DModel`` is wrapped on the fly, weights shared): dense attention on any device, and
``log_scale``.  Batch 1 (one prompt, one video), as the reference.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import PIL.Image
import torch
from diffusers import DiffusionPipeline, WanAnimate2Transformer3DModel
from diffusers.models import AutoencoderKLWan
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

from ..conversion.animate2 import convert_animate2_lora_state_dict, is_animate2_lora_state_dict
from ..conversion.image_encoder import clip_image_features, wan_clip_preprocess
from ..conversion.text_encoder import encode_prompt_context
from ..lora.convert import load_lora_file
from ..lora.loader import WanLoraInteropMixin
from ..models.transformer_wan_animate2 import WanAnimate2ExtTransformer3DModel
from ..utils.media import encode_video, load_image, read_video_file, video_to_tensor
from ..utils.shims import ShimPipelineMixin
from ..utils.validation import validate_video_size
from .pipeline_wan_video2video_reference import set_strength_schedule
from .runtime_options import WanRuntimeOptionsMixin

__all__ = ["WanAnimate2Pipeline", "animate2_i2v_mask", "plan_clips", "zigzag_indices"]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

#: DiffSynth-Studio's default ``animate2_prompt_ref``.
DEFAULT_PROMPT_REF = " "


def zigzag_indices(length: int, target_len: int) -> list[int]:
    """DiffSynth's ``zigzag_padding`` of a ``length``-frame video to ``target_len`` frames, as frame indices: forward,
    then back and forth between the ends (``length == 1``: the one frame repeated).

    Example:
        >>> zigzag_indices(4, 9)
        [0, 1, 2, 3, 2, 1, 0, 1, 2]
    """
    if length == 1:
        return [0] * target_len
    idx, step, out = 0, 1, []
    while len(out) < target_len:
        out.append(idx)
        idx += step
        if idx in (0, length - 1):
            step = -step
    return out[:target_len]


def plan_clips(num_frames: int, clip_len: int, prev_clip_frames: int = 1) -> tuple[int, list[int]]:
    """DiffSynth's long-video clips over a ``num_frames``-frame driving video: the padded length and each clip's
    first frame (clips of ``clip_len`` frames stepping by ``clip_len - prev_clip_frames``).

    Example:
        >>> plan_clips(12, 5)  # clips 0..4, 4..8, 8..12 of a video zigzag-padded to 13 frames
        (13, [0, 4, 8])
    """
    step = clip_len - prev_clip_frames
    num_clips = 1 if num_frames <= clip_len else (num_frames - clip_len + step - 1) // step + 1
    return clip_len + (num_clips - 1) * step, [i * step for i in range(num_clips)]


def animate2_i2v_mask(lat_t: int, lat_h: int, lat_w: int, mask_len: int, device: torch.device) -> torch.Tensor:
    """The reference's conditioning mask ``[4, lat_t, lat_h, lat_w]``: one on the first ``mask_len`` pixel frames of
    the ``4 (lat_t - 1) + 1`` frames a latent grid of ``lat_t`` frames covers (frame 0 repeated 4 times)."""
    msk = torch.zeros(1, (lat_t - 1) * 4 + 1, lat_h, lat_w, device=device)
    msk[:, :mask_len] = 1
    msk = torch.cat([msk[:, :1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)
    return msk.view(1, lat_t, 4, lat_h, lat_w).transpose(1, 2)[0]


def _load_frames(video: Any, height: int, width: int, name: str) -> torch.Tensor:
    """A video (file path, PIL list -- resized to ``width x height`` -- numpy ``[F, H, W, 3]`` or torch in [-1, 1]
    at that size) as ``[3, F, H, W]`` float32 in [-1, 1]."""
    if isinstance(video, (str, os.PathLike)):
        video = read_video_file(video, name)
    if isinstance(video, (list, tuple)) and video and all(isinstance(f, PIL.Image.Image) for f in video):
        return torch.cat([load_image(f, height, width, name) for f in video]).transpose(0, 1)
    t = video_to_tensor(video, name)[0]
    if tuple(t.shape[-2:]) != (height, width):
        raise ValueError(f"{name} frames are {t.shape[-2]}x{t.shape[-1]} (height x width) but height={height}, "
                         f"width={width}: resize the video, pass PIL frames or a file (resized), or pass that size")
    return t


def _quantize(frames: torch.Tensor) -> torch.Tensor:
    """Decoded frames in [-1, 1] through 8 bits, as DiffSynth's PIL output (truncating)."""
    q = ((frames.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return q.float() * (2 / 255) - 1


class WanAnimate2Pipeline(ShimPipelineMixin, WanLoraInteropMixin, WanRuntimeOptionsMixin, DiffusionPipeline):
    r"""
    Wan2.2-Animate-2-14B: the character of a reference image performs the motion of a driving video (see the module
    docstring for what each input does and how long videos are made).

    Args:
        tokenizer (`AutoTokenizer`): the umT5 tokenizer.
        text_encoder (`UMT5EncoderModel`): umT5-XXL encoder.
        vae (`AutoencoderKLWan`): the Wan2.1 VAE.
        scheduler (`FlowMatchEulerDiscreteScheduler`): flow-match Euler (``shift`` 5 in the release).
        image_encoder (`CLIPVisionModel`): the open-clip ViT-H/14 of Wan2.1.
        transformer (`WanAnimate2Transformer3DModel`): stock's or our
            :class:`~diffusers_wan_ext.models.WanAnimate2ExtTransformer3DModel` (a stock one is wrapped).
        log_scale (`float`, defaults to 0): the default of the call's ``log_scale`` (``model_index.json`` of a
            converted distilled folder: -1.3).
        num_inference_steps (`int`, defaults to 40), guidance_scale (`float`, defaults to 3.0): the defaults of the
            call's sampling (``model_index.json`` of a converted distilled folder: 10 steps, guidance 1).

    Example:
        >>> import torch
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import export_to_video
        >>> import diffusers_wan_ext  # registers WanAnimate2Pipeline
        >>> pipe = DiffusionPipeline.from_pretrained(  # doctest: +SKIP
        ...     "Wan2.2-Animate-2-14B-diffusers", torch_dtype=torch.bfloat16).to("cuda")
        >>> video = pipe(image="refimage.jpg", driving_video="refvideo.mp4", prompt="a woman dancing",  # doctest: +SKIP
        ...              prompt_ref="the person in the video moves, the background is still", long_video=True).frames[0]
        >>> export_to_video(video, "animated.mp4", fps=24)  # doctest: +SKIP
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents"]
    #: the two guidance branches differ in more than the context (block 9 is skipped): one forward each
    supports_cfg_parallel = False
    cfg_batching = False

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        image_encoder: CLIPVisionModel,
        transformer: WanAnimate2Transformer3DModel,
        log_scale: float = 0.0,
        num_inference_steps: int = 40,
        guidance_scale: float = 3.0,
    ) -> None:
        super().__init__()
        if transformer is not None:
            transformer = WanAnimate2ExtTransformer3DModel.from_stock(transformer)
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                              image_encoder=image_encoder, transformer=transformer)
        self.register_to_config(log_scale=float(log_scale), num_inference_steps=int(num_inference_steps),
                                guidance_scale=float(guidance_scale))
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
                        **kwargs):
        """Our loader's formats (:class:`~diffusers_wan_ext.lora.loader.WanLoraInteropMixin`) plus DiffSynth-Studio's
        Animate-2 LoRAs on the release's module names (``blocks.N.block.self_attn.q.lora_A.default.weight``; a dict
        or a local file), converted by
        :func:`~diffusers_wan_ext.conversion.animate2.convert_animate2_lora_state_dict`."""
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, (str, os.PathLike)) and os.path.isfile(source) and not kwargs.get("weight_name"):
            source = load_lora_file(source)
        if isinstance(source, dict) and is_animate2_lora_state_dict(source):
            state_dict = convert_animate2_lora_state_dict(source)
            return (state_dict, None) if kwargs.get("return_lora_metadata") else state_dict
        return super().lora_state_dict(source, **kwargs)

    def enable_teacache(self, *args, **kwargs) -> None:
        """Not available: there are no TeaCache coefficients for Animate-2, and its generation pass attends to a
        per-clip reference K/V cache that a skipped step would leave unused (the reference has no TeaCache for it)."""
        raise NotImplementedError(
            "TeaCache is not supported for Wan2.2-Animate-2 (no reference coefficients; the generation pass attends "
            "to a per-clip reference K/V cache); use the distilled DiT (10 steps) or enable_vram_management() instead"
        )

    def enable_parallelism(self, *args, **kwargs):
        """Not available: sequence parallel cannot split the tokens (each generation latent frame attends to its own
        cached reference frame through a frame-structured mask over the whole clip), and the two guidance branches
        differ in more than their inputs (block 9 is skipped in the negative one), so no CFG-parallel split either."""
        raise NotImplementedError(
            "Wan2.2-Animate-2 cannot run in parallel: sequence parallel would split the frame-structured reference "
            "attention, and the guidance branches run different blocks (CFG parallel); run it on one GPU "
            "(enable_vram_management() to fit it)"
        )

    # ------------------------------------------------------------------------------------------------ encoders
    def encode_text(self, prompt: str, max_sequence_length: int, device: torch.device) -> torch.Tensor:
        """umT5 context ``[1, L, C]`` of one prompt (rows past the prompt zeroed), in the transformer's dtype."""
        inputs = self.tokenizer([prompt_clean(prompt)], padding="max_length", max_length=max_sequence_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        embeds = encode_prompt_context(self.text_encoder, inputs.input_ids, inputs.attention_mask)
        return embeds.to(device=device, dtype=self.transformer.dtype)

    def encode_prompt(self, prompt: str, negative_prompt: str | None = None, do_classifier_free_guidance: bool = True,
                      max_sequence_length: int | None = None, device: torch.device | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt context, negative context or None)`` (the training input builder's interface)."""
        length = max_sequence_length or self.transformer.config.text_len
        device = device or self._execution_device
        negative = self.encode_text(negative_prompt or "", length, device) if do_classifier_free_guidance else None
        return self.encode_text(prompt, length, device), negative

    def encode_clip(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """CLIP features of ``[1, 3, H, W]`` pixels in [-1, 1] (Wan's preprocessing, penultimate block)."""
        size = self.image_encoder.config.image_size
        return clip_image_features(self.image_encoder, wan_clip_preprocess(pixels.float(), size)).to(
            device=device, dtype=self.transformer.dtype)

    def clip_condition(self, image_latents: torch.Tensor, clip_pixels: torch.Tensor, tail: torch.Tensor | None
                       ) -> dict[str, torch.Tensor]:
        """The VAE conditioning of one clip: ``y`` (reference image + continuation frames, masks on channels) and the
        driving clip's ``condition_latents`` / ``condition_y`` for the reference pass.

        Args:
            image_latents: the reference image's normalized latents ``[16, 1, h, w]``.
            clip_pixels: the driving clip ``[3, F, H, W]`` in [-1, 1].
            tail: the previous clip's last frames ``[3, n, H, W]`` (continuation), or ``None``.
        """
        _, frames, height, width = clip_pixels.shape
        device = image_latents.device
        lat_h, lat_w = image_latents.shape[-2:]
        y_ref = torch.cat([animate2_i2v_mask(1, lat_h, lat_w, 1, device), image_latents.float()])
        reft = torch.zeros(3, frames, height, width)
        mask_len = 0 if tail is None else tail.shape[1]
        if tail is not None:
            reft[:, :mask_len] = tail.to(reft)
        y_reft = encode_video(self.vae, reft[None])[0].float()
        y_reft = torch.cat([animate2_i2v_mask(y_reft.shape[1], lat_h, lat_w, mask_len, y_reft.device), y_reft])
        condition = encode_video(self.vae, clip_pixels[None])[0].float()
        condition_y = torch.cat([animate2_i2v_mask(condition.shape[1], lat_h, lat_w, frames, condition.device),
                                 condition])
        return {"y": torch.cat([y_ref, y_reft.to(device)], dim=1), "condition_latents": condition,
                "condition_y": condition_y}

    # --------------------------------------------------------------------------------------------------- checks
    def check_inputs(self, image: Any, driving_video: Any, prompt: Any, negative_prompt: Any, prompt_ref: Any,
                     height: int, width: int, num_frames: int, prev_clip_frames: int, long_video: bool,
                     refert_images: Any, max_sequence_length: int) -> None:
        if image is None:
            raise ValueError("image is required: the reference (character) image, as a PIL image, a file path or an "
                             "array")
        if driving_video is None:
            raise ValueError("driving_video is required: the video whose motion the character performs (a video file "
                             "path, a list of PIL images or an array)")
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt), ("prompt_ref", prompt_ref)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be one string (the pipeline makes one video at a time); got "
                                 f"{type(value).__name__}")
        if prompt is None:
            raise ValueError("prompt is required (a description of the character and the scene)")
        patch = self.transformer.config.patch_size[1]
        validate_video_size(height, width, num_frames, self.vae_scale_factor_spatial, self.vae_scale_factor_temporal,
                            patch)
        if isinstance(prev_clip_frames, bool) or not isinstance(prev_clip_frames, int) or not (
                1 <= prev_clip_frames < num_frames):
            raise ValueError(f"prev_clip_frames must be an integer in [1, num_frames) = [1, {num_frames}); got "
                             f"{prev_clip_frames!r}")
        if long_video and refert_images is not None:
            raise ValueError("refert_images continues one clip from given frames; long_video chains the clips itself: "
                             "pass one or the other")
        text_len = self.transformer.config.text_len
        if not 1 <= max_sequence_length <= text_len:
            raise ValueError(f"max_sequence_length={max_sequence_length} must be in [1, {text_len}] (the "
                             "transformer's text_len)")

    def _driving_frames(self, driving_video: Any, height: int, width: int, num_frames: int, long_video: bool
                        ) -> torch.Tensor:
        frames = _load_frames(driving_video, height, width, "driving_video")
        if not long_video and frames.shape[1] < num_frames:
            raise ValueError(
                f"driving_video has {frames.shape[1]} frames but num_frames={num_frames}: pass a longer video, "
                f"num_frames={(frames.shape[1] - 1) // 4 * 4 + 1} or long_video=True (which pads it)")
        return frames if long_video else frames[:, :num_frames]

    # ----------------------------------------------------------------------------------------------- sampling
    def denoise_clip(self, noise: torch.Tensor, cond: dict[str, torch.Tensor], texts: dict[str, torch.Tensor | None],
                     clip_features: dict[str, torch.Tensor], num_inference_steps: int, guidance_scale: float,
                     log_scale: float, origin_area: list[int], callback: Callable | None = None,
                     offload_kv: bool = False) -> torch.Tensor:
        """Fill the reference K/V cache from the driving clip, then denoise ``noise`` ``[16, T + 1, h, w]`` (T latent
        frames plus the reference image's slot) against it; returns the clean latents."""
        model, device = self.transformer, self._execution_device
        dtype, patch = model.dtype, model.config.patch_size
        set_strength_schedule(self.scheduler, num_inference_steps, 1.0, device)
        ref, latents = cond["condition_latents"], noise.to(device)
        grid_ref = torch.tensor([[ref.shape[1] // patch[0], ref.shape[2] // patch[1], ref.shape[3] // patch[2]]])
        seq_len = math.ceil(latents.shape[1:].numel() / (patch[0] * patch[1] * patch[2]))
        cache = model.new_kv_cache("cpu" if offload_kv else None)
        model([ref.to(device, dtype)], self.scheduler.timesteps[:1].to(dtype), [texts["ref"][0]],
              [cond["condition_y"].to(device, dtype)], cache, "extract", seq_len=int(grid_ref.prod()),
              encoder_hidden_states_image=clip_features["ref"], offset_grid_sizes=grid_ref)
        origin_len = 4 * (ref.shape[1] - 1) + 1
        shared = dict(kv_cache=cache, kv_cache_mode="cached", seq_len=seq_len, reference_grid_sizes=grid_ref,
                      encoder_hidden_states_image=clip_features["image"], origin_len=origin_len,
                      origin_area=origin_area, log_scale=log_scale, return_dict=False)
        y = [cond["y"].to(device, dtype)]
        self._num_timesteps = len(self.scheduler.timesteps)
        with self.progress_bar(total=self._num_timesteps) as bar:
            for i, t in enumerate(self.scheduler.timesteps):
                timestep = t.reshape(1).to(device, dtype)
                pred = model([latents.to(dtype)], timestep, [texts["prompt"][0]], y, **shared)[0][0].float()
                if guidance_scale != 1.0:
                    neg = model([latents.to(dtype)], timestep, [texts["negative"][0]], y, is_uncondtion=True,
                                **shared)[0][0].float()
                    pred = neg + guidance_scale * (pred - neg)
                latents = self.scheduler.step(pred[None], t, latents[None].float(), return_dict=False)[0][0]
                if callback is not None:
                    latents = callback(self, i, t, {"latents": latents}).get("latents", latents)
                bar.update()
        cache.clear()
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents ``[16, T, h, w]`` -> frames ``[3, F, H, W]`` in [-1, 1]."""
        z = self.vae.config.z_dim
        latents = latents[None].to(self.vae.dtype)
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
        std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
        return self.vae.decode(latents * std + mean, return_dict=False)[0][0].float()

    @torch.no_grad()
    def __call__(
        self,
        image: Any = None,
        driving_video: Any = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        prompt_ref: str | None = DEFAULT_PROMPT_REF,
        height: int = 1280,
        width: int = 720,
        num_frames: int = 81,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        log_scale: float | None = None,
        long_video: bool = False,
        prev_clip_frames: int = 1,
        offload_kv: bool | None = None,
        refert_images: Any = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        max_sequence_length: int | None = None,
    ) -> WanPipelineOutput | tuple:
        r"""
        Animate the character of ``image`` with the motion of ``driving_video``.

        Args:
            image (`PIL.Image.Image | str | np.ndarray | torch.Tensor`): the reference (character) image: PIL image (resized to ``width x height``), file path, numpy
                ``[H, W, 3]`` or torch ``[1, 3, H, W]`` in [-1, 1] at that size.
            driving_video (`str | list[PIL.Image.Image] | np.ndarray | torch.Tensor`): the motion: video file path, list of PIL images (resized), numpy ``[F, H, W, 3]`` or torch
                in [-1, 1].  Without ``long_video`` its first ``num_frames`` frames are used.
            prompt (`str`): the character and the scene.
            negative_prompt: the guidance branch's prompt (default ``""``; unused at ``guidance_scale=1``).
            prompt_ref: a description of the driving video for the reference pass (DiffSynth's
                ``animate2_prompt_ref``, default ``" "``; its example: "the person in the video moves, the
                background is still", in Chinese).
            height, width: the video size (release: 1280 x 720, portrait).
            num_frames: frames per clip (``4n + 1``; release: 81).
            num_inference_steps, guidance_scale: default: the pipeline's config (``model_index.json``): 40 and
                3.0 for the release, 10 and 1.0 for a converted distilled folder.
            log_scale: added to the attention scores of generation latent frame 1 (default: the pipeline's
                ``log_scale`` config, -1.3 in a converted distilled folder, else 0).
            long_video: generate the whole driving video in clips (see the module docstring).
            prev_clip_frames: frames of one clip that condition the next (DiffSynth's ``first_num``, 1).
            offload_kv: keep the reference K/V cache in CPU memory (DiffSynth's ``animate2_offload_kv``; the
                release's cache is ~60 GB in bf16 at 1280 x 720 x 81); default: on under
                :meth:`enable_vram_management`.
            refert_images: continue from these frames (DiffSynth's ``animate2_refert_images``): the first
                ``len(refert_images)`` frames of the clip are conditioned on them.  Same formats as
                ``driving_video``.
            generator, latents: the initial noise ``[1, 16, (num_frames - 1) / 4 + 2, H / 8, W / 8]`` (one latent
                frame more than the video: the reference image's slot), shared by all clips.
            output_type: ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"`` (the last clip's latents, reference slot
                dropped).
            callback_on_step_end: ``callback(pipe, step, timestep, {"latents": ...}) -> dict`` after every step.
            max_sequence_length: umT5 context length (default: the transformer's ``text_len``, 512).

        Returns:
            :class:`~diffusers.pipelines.wan.pipeline_output.WanPipelineOutput` with ``frames`` ``[1, F, H, W, 3]``.
        """
        max_sequence_length = max_sequence_length or self.transformer.config.text_len
        log_scale = self.config.log_scale if log_scale is None else float(log_scale)
        num_inference_steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        offload_kv = getattr(self, "_wan_vram_plan", None) is not None if offload_kv is None else offload_kv
        self.check_inputs(image, driving_video, prompt, negative_prompt, prompt_ref, height, width, num_frames,
                          prev_clip_frames, long_video, refert_images, max_sequence_length)
        device = self._execution_device
        image_pixels = load_image(image, height, width)
        frames = self._driving_frames(driving_video, height, width, num_frames, long_video)
        tail = None if refert_images is None else _load_frames(refert_images, height, width, "refert_images")
        if tail is not None and not 1 <= tail.shape[1] <= num_frames:
            raise ValueError(f"refert_images has {tail.shape[1]} frames; pass 1 to num_frames={num_frames}")
        real_len = frames.shape[1]
        target_len, starts = plan_clips(real_len, num_frames, prev_clip_frames) if long_video else (num_frames, [0])
        frames = frames[:, zigzag_indices(real_len, target_len)]

        texts = {"prompt": self.encode_text(prompt, max_sequence_length, device),
                 "ref": self.encode_text(prompt_ref or "", max_sequence_length, device),
                 "negative": None if guidance_scale == 1.0 else self.encode_text(negative_prompt or "",
                                                                                   max_sequence_length, device)}
        clip_image = self.encode_clip(image_pixels, device)
        image_latents = encode_video(self.vae, image_pixels[:, :, None].to(device))[0]
        lat_t = (num_frames - 1) // self.vae_scale_factor_temporal + 2
        shape = (1, self.vae.config.z_dim, lat_t, height // self.vae_scale_factor_spatial,
                 width // self.vae_scale_factor_spatial)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}; expected {shape}")
        noise = latents if latents is not None else randn_tensor(shape, generator=generator, dtype=torch.float32)

        outputs, clip_latents = [], None
        for k, start in enumerate(starts):
            clip_pixels = frames[:, start:start + num_frames]
            cond = self.clip_condition(image_latents, clip_pixels.to(device), tail)
            clip_features = {"image": clip_image, "ref": self.encode_clip(clip_pixels[:, 0][None].to(device), device)}
            clip_latents = self.denoise_clip(noise[0].float(), cond, texts, clip_features, num_inference_steps,
                                             guidance_scale, log_scale, [width, height], callback_on_step_end,
                                             offload_kv)[:, 1:]
            if output_type == "latent" and k == len(starts) - 1:
                break
            video = self.decode(clip_latents)
            tail = _quantize(video[:, -prev_clip_frames:]).cpu() if long_video else None
            outputs.append(video if k == 0 else video[:, prev_clip_frames:])

        if output_type == "latent":
            result = clip_latents[None]
        else:
            video = torch.cat(outputs, dim=1)[:, :real_len] if long_video else outputs[0]
            result = self.video_processor.postprocess_video(video[None], output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return WanPipelineOutput(frames=result)
