"""``WanSpeedControlPipeline``: stock ``WanPipeline`` with the Wan2.1 speed-control motion controller.

``DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1`` adds a small MLP (:class:`~diffusers_wan_ext.WanMotionControllerModel`)
to Wan2.1-T2V-1.3B: ``motion_bucket_id`` (larger = more motion; DiffSynth's examples use 0 and 100) becomes an offset
of the transformer's ``6 x dim`` block modulation.  As DiffSynth-Studio (``WanVideoUnit_SpeedControl`` +
``model_fn_wan_video``), the offset is computed once, is the same at every step, and is added in the conditional and
the unconditional pass alike.

The offset enters through a Diffusers hook on the transformer's ``condition_embedder``
(:func:`~diffusers_wan_ext.models.motion_controller.apply_motion_control`), active only during the call, so the
transformer stays stock ``WanTransformer3DModel``; the call is :class:`~diffusers_wan_ext.WanExtPipeline`'s (the
shared denoising loop, CFG batching).  With ``motion_bucket_id=None`` and ``cfg_batching=False`` the pipeline is
exactly stock ``WanPipeline``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import AutoencoderKLWan, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from transformers import AutoTokenizer, UMT5EncoderModel

from ..models.motion_controller import WanMotionControllerModel, apply_motion_control
from ..schedulers import WanFlowMatchScheduler
from .call_arguments import forwarded
from .pipeline_wan_ext import WanExtPipeline

__all__ = ["WanSpeedControlPipeline"]


class WanSpeedControlPipeline(WanExtPipeline):
    r"""
    Text-to-video with speed control (``motion_bucket_id``): :class:`~diffusers_wan_ext.WanExtPipeline` (stock
    :class:`diffusers.WanPipeline` with CFG batching and the runtime options) plus the optional ``motion_controller``
    component.

    Args:
        tokenizer ([`AutoTokenizer`]): umT5 tokenizer (may be ``None`` when only ``prompt_embeds`` are passed).
        text_encoder ([`UMT5EncoderModel`]): umT5 encoder (may be ``None`` when only ``prompt_embeds`` are passed).
        vae ([`AutoencoderKLWan`]): the Wan VAE.
        scheduler ([`FlowMatchEulerDiscreteScheduler`] or another flow scheduler): e.g.
            :class:`~diffusers_wan_ext.schedulers.WanFlowMatchScheduler` (DiffSynth-Studio) or UniPC.
        transformer ([`WanTransformer3DModel`], *optional*): the (high-noise) DiT.
        transformer_2 ([`WanTransformer3DModel`], *optional*): the low-noise expert (Wan2.2 A14B layout).
        motion_controller ([`~diffusers_wan_ext.WanMotionControllerModel`], *optional*):
            Maps ``motion_bucket_id`` to the modulation offset; its ``dim`` must be the transformer's width.
        boundary_ratio (`float`, *optional*): expert switch at ``boundary_ratio * num_train_timesteps``.
        expand_timesteps (`bool`, defaults to `False`): stock's Wan2.2 TI2V-5B mode.

    Example:
        >>> import torch
        >>> import diffusers_wan_ext  # noqa: F401  (registers the classes with Diffusers)
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import export_to_video
        >>> pipe = DiffusionPipeline.from_pretrained(  # doctest: +SKIP
        ...     "converted/Wan2.1-1.3b-speedcontrol-v1", dtype=torch.bfloat16
        ... )
        >>> for bucket in (0, 100):  # doctest: +SKIP
        ...     video = pipe(prompt="a dog running in a park", motion_bucket_id=bucket, num_frames=81).frames[0]
        ...     export_to_video(video, f"speed_{bucket}.mp4", fps=16)
    """

    model_cpu_offload_seq = "text_encoder->motion_controller->transformer->transformer_2->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _optional_components = ["transformer", "transformer_2", "motion_controller"]
    #: ``load_lora_weights`` also accepts ``motion_controller.*`` LoRA keys (Diffusers format).
    _lora_loadable_modules = ["transformer", "transformer_2", "motion_controller"]

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler | WanFlowMatchScheduler,
        transformer: WanTransformer3DModel | None = None,
        transformer_2: WanTransformer3DModel | None = None,
        motion_controller: WanMotionControllerModel | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=boundary_ratio,
            expand_timesteps=expand_timesteps,
        )
        self.register_modules(motion_controller=motion_controller)

    def motion_offset(self, motion_bucket_id: float | int | torch.Tensor) -> torch.Tensor:
        """The modulation offset ``[1, 6 * dim]`` for ``motion_bucket_id`` (checks the motion controller first)."""
        if self.motion_controller is None:
            raise ValueError(
                "`motion_bucket_id` needs the speed-control `motion_controller` (WanMotionControllerModel), which "
                "this pipeline lacks: load a converted Wan2.1-1.3b-speedcontrol-v1 folder or pass "
                "motion_controller=WanMotionControllerModel.from_pretrained(...); or leave motion_bucket_id=None"
            )
        ids = torch.as_tensor(motion_bucket_id, dtype=torch.float64)
        if ids.numel() != 1:
            raise ValueError(
                f"motion_bucket_id must be one number (e.g. 0 for slow, 100 for fast motion), got shape "
                f"{tuple(ids.shape)}"
            )
        width = self.motion_controller.config.dim
        for name, model in (("transformer", self.transformer), ("transformer_2", self.transformer_2)):
            if model is None:
                continue
            inner = model.config.num_attention_heads * model.config.attention_head_dim
            if inner != width:
                raise ValueError(
                    f"the motion controller is for a {width}-wide transformer but `{name}` is {inner} wide: it "
                    "belongs to another checkpoint (speed control ships for Wan2.1-T2V-1.3B, width 1536)"
                )
        return self.motion_controller(ids.reshape(1), return_dict=False)[0]

    @torch.no_grad()
    def __call__(
        self,
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
        output_type: str | None = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        motion_bucket_id: float | None = None,
        cfg_batching: bool | None = None,
        sliding_window_size: int | None = None,
        sliding_window_stride: int | None = None,
    ) -> WanPipelineOutput | tuple:
        r"""
        Text-to-video; the arguments of :meth:`diffusers_wan_ext.WanExtPipeline.__call__` plus:

        Args:
            motion_bucket_id (`float`, *optional*):
                Amount of motion (DiffSynth-Studio's examples: 0 = slow, 100 = fast).  Needs the
                ``motion_controller`` component.  ``None``: no offset (with ``cfg_batching=False``, exactly stock
                ``WanPipeline``).
            cfg_batching (`bool`, *optional*): see :meth:`diffusers_wan_ext.WanExtPipeline.__call__`.
            sliding_window_size (`int`, *optional*), sliding_window_stride (`int`, *optional*):
                Temporal sliding windows in latent frames (DiffSynth-Studio's option): each transformer forward runs per
                window of ``sliding_window_size`` latent frames, ``sliding_window_stride`` apart, and the windows are
                blended (:mod:`diffusers_wan_ext.hooks.sliding_window`, ``docs/long_video.md``).  ``None``: off.

        Examples:
            >>> slow = pipe(prompt="waves on a beach", motion_bucket_id=0).frames[0]  # doctest: +SKIP
            >>> fast = pipe(prompt="waves on a beach", motion_bucket_id=100).frames[0]  # doctest: +SKIP

        Returns:
            [`WanPipelineOutput`] with ``frames``, or a tuple ``(frames,)`` when ``return_dict=False``.
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        offset = self.motion_offset(motion_bucket_id) if motion_bucket_id is not None else None
        with contextlib.ExitStack() as stack:
            if offset is not None:
                for model in (self.transformer, self.transformer_2):
                    if model is not None:
                        stack.enter_context(apply_motion_control(model, offset))
            return super().__call__(**forwarded(locals(), super().__call__))
