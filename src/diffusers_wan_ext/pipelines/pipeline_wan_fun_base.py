"""``WanFunPipelineBase``: the generation routine shared by the Wan-Fun conditioning pipelines.

Every Wan-Fun variant (InP, Control, Control-Camera; Wan2.1 and Wan2.2-A14B) is stock Wan image-to-video sampling
with a different ``y`` -- the conditioning latents concatenated to the noisy latents on the channel axis -- and, for
some checkpoints, one extra transformer input (``reference_latents`` for ``ref_conv``, ``control_camera_latents``
for the camera ``control_adapter``).  This module holds what they share:

* prompt encoding (stock :meth:`diffusers.WanImageToVideoPipeline.encode_prompt`);
* CLIP image features when the transformer has a CLIP branch (Wan2.1 Fun), with the reference preprocessing
  (:func:`~diffusers_wan_ext.conversion.image_encoder.wan_clip_preprocess`, the penultimate block's output);
* the noise latents, the stock two-expert (``boundary_ratio``) denoising loop with classifier-free guidance
  (``guidance_scale``, ``guidance_scale_2``), step-end callbacks, ``output_type`` / ``return_dict`` -- the loop is
  :meth:`~diffusers_wan_ext.pipelines.denoising.WanDenoisingMixin.denoise`, shared with
  :class:`~diffusers_wan_ext.WanExtPipeline`, with CFG batching (the ``cfg_batching`` call argument, default
  ``pipe.cfg_batching``, ``True``);
* the runtime options of :class:`~diffusers_wan_ext.pipelines.runtime_options.WanRuntimeOptionsMixin`
  (``set_attention_backend``, ``enable_vram_management``, ``enable_teacache``);
* input validation: ``height`` / ``width`` multiples of 16, ``num_frames = 4n + 1``, and ``y`` channels equal to the
  transformer's ``in_channels - 16`` (the error names the checkpoint kind the transformer belongs to).

A variant implements :meth:`WanFunPipelineBase.prepare_condition` (its ``y``, the image CLIP should see, and the
extra transformer inputs) and a ``__call__`` with its own arguments that validates them and calls
:meth:`WanFunPipelineBase.generate`, the shared arguments forwarded in one line by
:func:`~diffusers_wan_ext.pipelines.call_arguments.forwarded`.  The extra transformer inputs go to the conditional
and the unconditional pass alike (DiffSynth-Studio shares them between its positive and negative inputs).

The transformer may be :class:`~diffusers_wan_ext.WanFunTransformer3DModel` or stock
:class:`diffusers.WanTransformer3DModel` (the converters emit the stock class for Fun checkpoints it can
represent); features are read from the config (``ref_conv_in_channels``, ``control_adapter_in_channels``,
``image_dim``), and the extra inputs are passed only when used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderKLWan, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

from ..conversion.image_encoder import clip_image_features, wan_clip_preprocess
from ..lora.loader import WanLoraInteropMixin
from ..schedulers import WanFlowMatchScheduler
from ..utils.shims import ShimPipelineMixin
from .call_arguments import forwarded
from .denoising import WanDenoisingMixin
from .runtime_options import WanRuntimeOptionsMixin

__all__ = ["CHECKPOINT_KINDS", "WanFunCondition", "WanFunPipelineBase"]

#: What a transformer with ``in_channels = 16 + k`` is, by ``k`` (what its ``y`` holds, and which pipeline runs it).
CHECKPOINT_KINDS: dict[int, tuple[str, str]] = {
    0: ("a text-to-video checkpoint (no conditioning channels)", "WanPipeline or WanSpeedControlPipeline"),
    16: ("a Wan2.1 Fun Control-Camera checkpoint (y = 16 image-latent channels)", "WanFunCameraControlPipeline"),
    20: (
        "a Fun-InP / Wan2.1 I2V / Wan2.2-Fun Control-Camera checkpoint (y = 4 mask + 16 image-latent channels)",
        "WanFunInpaintPipeline (or WanFunCameraControlPipeline if it has a camera control_adapter)",
    ),
    32: (
        "a Wan2.1 Fun-Control / Fun-V1.1-Control checkpoint (y = 16 control + 16 image-latent channels)",
        "WanFunControlPipeline",
    ),
    36: (
        "a Wan2.2-Fun-A14B-Control checkpoint (y = 16 control + 4 mask + 16 image-latent channels)",
        "WanFunControlPipeline",
    ),
}

#: CLIP tokens of Wan's ViT-H/14 at 224 px (256 patches + class token); the size of the zero CLIP context.
DEFAULT_CLIP_TOKENS = 257


@dataclass
class WanFunCondition:
    """What a Wan-Fun variant adds to stock sampling (returned by :meth:`WanFunPipelineBase.prepare_condition`).

    Attributes:
        y (`torch.Tensor`): conditioning latents ``[1 or B, in_channels - 16, T_lat, H/8, W/8]``, concatenated to the
            noisy latents on the channel axis at every step.
        clip_image (`torch.Tensor`, *optional*): the image (``[1, 3, H, W]`` in ``[-1, 1]``) whose CLIP features
            condition a transformer with a CLIP branch; ``None``: zero features (Fun-Control without an image,
            as DiffSynth-Studio).
        transformer_kwargs (`dict`): extra transformer inputs (``reference_latents``, ``control_camera_latents``),
            given to the conditional and the unconditional pass.
        negative_transformer_kwargs (`dict`): inputs that differ in the unconditional pass (they replace the same
            names of ``transformer_kwargs`` there, e.g. Video-As-Prompt's negative reference prompt).
    """

    y: torch.Tensor
    clip_image: torch.Tensor | None = None
    transformer_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    negative_transformer_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)


def _match_batch(t: torch.Tensor, batch_size: int, name: str, expand: bool = True) -> torch.Tensor:
    """``t`` with batch ``batch_size`` (a batch of 1 is broadcast, without a copy); ``expand=False`` only checks."""
    if t.shape[0] == batch_size:
        return t
    if t.shape[0] == 1:
        return t.expand(batch_size, *t.shape[1:]) if expand else t
    raise ValueError(f"{name} has batch {t.shape[0]}, expected 1 or {batch_size}")


class WanFunPipelineBase(
    ShimPipelineMixin, WanLoraInteropMixin, WanRuntimeOptionsMixin, WanDenoisingMixin, WanImageToVideoPipeline
):
    r"""
    Shared core of the Wan-Fun pipelines (not used directly): stock Wan image-to-video sampling with a
    variant-specific conditioning ``y`` and optional extra transformer inputs.

    Subclasses implement :meth:`prepare_condition` and a ``__call__`` that validates their inputs and calls
    :meth:`generate`.  Components and config are those of :class:`diffusers.WanImageToVideoPipeline`.

    Args:
        tokenizer ([`AutoTokenizer`]): umT5 tokenizer (may be ``None`` when only ``prompt_embeds`` are passed).
        text_encoder ([`UMT5EncoderModel`]): umT5 encoder (may be ``None`` when only ``prompt_embeds`` are passed).
        vae ([`AutoencoderKLWan`]): the Wan2.1 VAE (all Fun checkpoints, Wan2.2-Fun-A14B included, use it).
        scheduler ([`FlowMatchEulerDiscreteScheduler`] or another flow scheduler): e.g.
            :class:`~diffusers_wan_ext.schedulers.WanFlowMatchScheduler` (DiffSynth-Studio) or UniPC.
        image_processor ([`CLIPImageProcessor`], *optional*): kept for stock compatibility; CLIP inputs are
            preprocessed as the references do (``wan_clip_preprocess``), not with it.
        image_encoder ([`CLIPVisionModel`], *optional*): CLIP vision tower (Wan2.1 Fun checkpoints only).
        transformer ([`WanTransformer3DModel`] or [`~diffusers_wan_ext.WanFunTransformer3DModel`]):
            the (high-noise) DiT.
        transformer_2 (*optional*): the low-noise expert of Wan2.2-Fun-A14B.
        boundary_ratio (`float`, *optional*): expert switch at ``boundary_ratio * num_train_timesteps``
            (``transformer`` at and above it, ``transformer_2`` below).
        expand_timesteps (`bool`, defaults to `False`): stock's Wan2.2 TI2V-5B mode; no Fun checkpoint uses it, so
            it must stay ``False`` (the argument exists so that the signature matches the stock parent).

    Example:
        >>> from diffusers_wan_ext.pipelines.pipeline_wan_fun_base import WanFunCondition, WanFunPipelineBase
        >>> class MyFunPipeline(WanFunPipelineBase):  # doctest: +SKIP
        ...     def prepare_condition(self, height, width, num_frames, device, image=None):
        ...         y = ...  # [1, in_channels - 16, T_lat, height // 8, width // 8]
        ...         return WanFunCondition(y=y, clip_image=image)
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->transformer_2->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _optional_components = ["transformer", "transformer_2", "image_encoder", "image_processor"]

    #: ``in_channels - 16`` values this pipeline builds ``y`` for (subclasses set it).
    _supported_y_channels: tuple[int, ...] = ()

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
        if expand_timesteps:
            raise ValueError(
                "expand_timesteps=True is stock's Wan2.2 TI2V-5B mode; Wan-Fun checkpoints do not use it -- "
                "load TI2V-5B with diffusers.WanImageToVideoPipeline instead"
            )
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

    # ------------------------------------------------------------------------------------------- features
    def _transformers(self) -> list[torch.nn.Module]:
        experts = [self.transformer]
        if self.config.boundary_ratio is not None and self.transformer_2 is not None:
            experts.append(self.transformer_2)
        return [t for t in experts if t is not None]

    def _experts_have(self, config_key: str) -> bool:
        """Whether every transformer in use has a non-empty ``config_key`` (an optional Fun module)."""
        experts = self._transformers()
        return bool(experts) and all(getattr(t.config, config_key, None) for t in experts)

    @property
    def has_clip_branch(self) -> bool:
        """Whether the transformer takes CLIP image features (Wan2.1 Fun; Wan2.2-Fun has no CLIP branch)."""
        return self.transformer is not None and getattr(self.transformer.config, "image_dim", None) is not None

    @property
    def condition_channels(self) -> int:
        """Channels of ``y``: the transformer's ``in_channels`` minus the noisy latents' ``z_dim``."""
        return self.transformer.config.in_channels - self.vae.config.z_dim

    def _checkpoint_kind(self, y_channels: int) -> tuple[str, str]:
        return CHECKPOINT_KINDS.get(
            y_channels, (f"a checkpoint with {y_channels} conditioning channels that no Wan-Fun variant uses", "?")
        )

    # ---------------------------------------------------------------------------------------------- checks
    def check_transformer(self) -> None:
        """Raise unless the transformer(s) fit this pipeline: present, same ``in_channels``, supported ``y``."""
        if self.transformer is None:
            raise ValueError(f"{type(self).__name__} needs a `transformer`; pass one or load a folder that has one")
        if self.config.boundary_ratio is not None and self.transformer_2 is None:
            raise ValueError(
                f"boundary_ratio={self.config.boundary_ratio} selects two experts, but `transformer_2` is missing: "
                "pass the low-noise expert as `transformer_2` or set boundary_ratio=None"
            )
        experts = self._transformers()
        if len({t.config.in_channels for t in experts}) != 1:
            raise ValueError(
                "transformer and transformer_2 take different in_channels "
                f"({[t.config.in_channels for t in experts]}): they are not the two experts of one checkpoint"
            )
        c = self.condition_channels
        if c not in self._supported_y_channels:
            kind, use = self._checkpoint_kind(c)
            raise ValueError(
                f"the transformer takes in_channels={self.transformer.config.in_channels} "
                f"({self.vae.config.z_dim} latents + {c} conditioning channels): {kind}. {type(self).__name__} "
                f"builds {' or '.join(map(str, self._supported_y_channels))} conditioning channels; use {use}"
            )

    def check_fun_inputs(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        num_frames: int,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        guidance_scale_2: float | None = None,
    ) -> None:
        """Checks shared by every variant (size, frame count, prompts, callbacks, guidance, transformer)."""
        self.check_transformer()
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(
                f"height and width must be positive multiples of {multiple} (VAE factor x patch size), got "
                f"{height}x{width}; e.g. pass height={max(multiple, height // multiple * multiple)}, "
                f"width={max(multiple, width // multiple * multiple)}"
            )
        t = self.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % t:
            fix = max(1, (num_frames - 1) // t * t + 1)
            raise ValueError(f"num_frames must be {t}n + 1 (1, 5, ..., 81), got {num_frames}; e.g. pass {fix}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass `prompt` (a string or a list of strings) or `prompt_embeds`")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise ValueError(
                f"`negative_prompt` must be a string or a list of strings, got {type(negative_prompt).__name__}"
            )
        if image_embeds is not None and not self.has_clip_branch:
            raise ValueError(
                "`image_embeds` given, but this transformer has no CLIP image branch (Wan2.2-Fun): leave it out"
            )
        bad = [k for k in (callback_on_step_end_tensor_inputs or []) if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {bad}"
            )
        if self.config.boundary_ratio is None and guidance_scale_2 is not None:
            raise ValueError(
                "`guidance_scale_2` is the low-noise expert's scale: it needs a pipeline with `boundary_ratio` "
                "(and transformer_2); leave it out for single-expert checkpoints"
            )

    # ---------------------------------------------------------------------------------------------- hooks
    def prepare_condition(self, height: int, width: int, num_frames: int, device: torch.device, **inputs: Any
                          ) -> WanFunCondition:
        """The variant's conditioning: ``y``, the image for CLIP and the extra transformer inputs."""
        raise NotImplementedError(f"{type(self).__name__} must implement prepare_condition")

    def encode_clip_image(self, image: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """CLIP features of a ``[B, 3, H, W]`` image in ``[-1, 1]`` with the references' preprocessing.

        The image (already at the video size, as DiffSynth-Studio resizes it) is bicubic-resized straight to the
        encoder's input size and normalized (:func:`~diffusers_wan_ext.conversion.image_encoder.wan_clip_preprocess`);
        the feature is the penultimate block's output (``hidden_states[-2]``).
        """
        if self.image_encoder is None:
            raise ValueError(
                "this transformer has a CLIP image branch (Wan2.1 Fun), but the pipeline has no `image_encoder`: "
                "load the checkpoint's image_encoder (CLIPVisionModel) or pass `image_embeds`"
            )
        device = device or self._execution_device
        pixels = wan_clip_preprocess(image.float(), self.image_encoder.config.image_size)
        return clip_image_features(self.image_encoder, pixels).to(device)

    def _pad_text_context(self, embeds: torch.Tensor) -> torch.Tensor:
        """With a CLIP branch, zero-pad the umT5 context to the transformer's ``text_len`` (512 for stock).

        The CLIP-branch cross-attention splits its context as ``[image tokens, last text_len tokens]``, so the text
        part must be exactly ``text_len`` long.  The umT5 embeddings are already zero beyond the prompt's tokens, so
        padding a shorter ``max_sequence_length`` context with zeros gives the same tensor as encoding at
        ``text_len`` (what the original Wan code always does).  Without a CLIP branch the context is left as is.
        """
        if not self.has_clip_branch:
            return embeds
        text_len = getattr(self.transformer.config, "text_len", None) or 512
        if embeds.shape[1] > text_len:
            raise ValueError(
                f"the text context has {embeds.shape[1]} tokens, more than the transformer's text_len={text_len}: "
                f"pass max_sequence_length <= {text_len} (or shorter prompt_embeds)"
            )
        if embeds.shape[1] < text_len:
            embeds = torch.cat([embeds, embeds.new_zeros(embeds.shape[0], text_len - embeds.shape[1], embeds.shape[2])],
                               dim=1)
        return embeds

    def _zero_clip_features(self, device: torch.device) -> torch.Tensor:
        tokens = DEFAULT_CLIP_TOKENS
        if self.image_encoder is not None:
            cfg = self.image_encoder.config
            tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
        return torch.zeros(1, tokens, self.transformer.config.image_dim, device=device)

    def _check_condition(self, condition: WanFunCondition, shape: tuple[int, ...]) -> None:
        y = condition.y
        want = self.condition_channels
        if y.ndim != 5 or y.shape[1] != want or tuple(y.shape[2:]) != tuple(shape[2:]):
            kind, use = self._checkpoint_kind(want)
            raise ValueError(
                f"{type(self).__name__} built y of shape {tuple(y.shape)}, but the transformer takes "
                f"[B, {want}, {', '.join(map(str, shape[2:]))}] (in_channels={self.transformer.config.in_channels}: "
                f"{kind}); use {use}"
            )

    # ------------------------------------------------------------------------------------------ generation
    def generate(
        self,
        condition_inputs: dict[str, Any],
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        cfg_batching: bool | None = None,
        sliding_window_size: int | None = None,
        sliding_window_stride: int | None = None,
    ) -> WanPipelineOutput | tuple:
        """The shared routine; ``condition_inputs`` go to :meth:`prepare_condition`.  Inputs are checked already
        (the variant's ``__call__`` runs :meth:`check_fun_inputs` and its own checks first).

        ``cfg_batching``: run the conditional and unconditional pass as one transformer forward of batch ``2 x B``
        (see :meth:`~diffusers_wan_ext.pipelines.denoising.WanDenoisingMixin.denoise`); ``None``: the
        pipeline's :attr:`cfg_batching` setting."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if self.config.boundary_ratio is not None and guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale

        self._guidance_scale = guidance_scale
        self._guidance_scale_2 = guidance_scale_2
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        # 1. text
        transformer_dtype = self.transformer.dtype
        prompt_embeds, negative_prompt_embeds = self.encode_text(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            num_videos_per_prompt=num_videos_per_prompt, max_sequence_length=max_sequence_length,
            dtype=transformer_dtype, device=device,
        )
        prompt_embeds = self._pad_text_context(prompt_embeds)  # zero padding: the same before or after the cast
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = self._pad_text_context(negative_prompt_embeds)
        total = prompt_embeds.shape[0]  # prompts x num_videos_per_prompt

        # 2. conditioning of the variant
        condition = self.prepare_condition(
            height=height, width=width, num_frames=num_frames, device=device, **condition_inputs
        )

        # 3. CLIP image features (Wan2.1 Fun only)
        if self.has_clip_branch:
            if image_embeds is None:
                if condition.clip_image is not None:
                    image_embeds = self.encode_clip_image(condition.clip_image, device)
                else:
                    image_embeds = self._zero_clip_features(device)
            image_embeds = _match_batch(image_embeds.to(device), total, "image_embeds").to(transformer_dtype)
        else:
            image_embeds = None

        # 4. timesteps and noise
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        shape = (
            total,
            self.vae.config.z_dim,
            (num_frames - 1) // self.vae_scale_factor_temporal + 1,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(
                f"got {len(generator)} generators for an effective batch of {total} "
                "(prompts x num_videos_per_prompt): pass one generator per video"
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=torch.float32)

        self._check_condition(condition, shape)
        y = _match_batch(condition.y.to(device=device, dtype=torch.float32), total, "y")
        # batch-1 extras stay batch 1: WanFunTransformer3DModel broadcasts them (the camera map is large)
        extra = {
            name: _match_batch(value.to(device=device, dtype=transformer_dtype), total, name, expand=False)
            for name, value in condition.transformer_kwargs.items()
            if value is not None
        }
        # per-pass inputs (cond in `extra`, uncond here) are expanded to the batch: CFG batching concatenates them
        uncond_extra = {}
        for name, value in condition.negative_transformer_kwargs.items():
            if value is None or extra.get(name) is None:
                raise ValueError(f"negative_transformer_kwargs[{name!r}] needs a conditional value of the same name")
            extra[name] = _match_batch(extra[name], total, name)
            uncond_extra[name] = _match_batch(value.to(device=device, dtype=transformer_dtype), total, name)

        # 5. denoising loop (stock two-expert loop, shared with WanExtPipeline; extra inputs on both passes)
        latents = self.denoise(**forwarded(
            locals(),
            self.denoise,
            model_input=lambda x: torch.cat([x, y], dim=1),
            transformer_kwargs={"encoder_hidden_states_image": image_embeds, **extra},
            # WanFunTransformer3DModel repeats a batch-1 (or batch-B) reference / camera map to the latent batch
            broadcast_kwargs=tuple(k for k in extra if k not in uncond_extra),
            uncond_transformer_kwargs=uncond_extra,
        ))

        # 6. decode (only rank 0 under enable_parallelism)
        video = self.decode_latents(latents, output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)
