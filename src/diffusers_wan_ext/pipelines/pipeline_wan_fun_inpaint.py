"""``WanFunInpaintPipeline``: Wan-Fun InP (image-to-video with an optional end frame).

Covers Wan2.1-Fun(-V1.1)-1.3B/14B-InP (CLIP branch, one transformer) and Wan2.2-Fun-A14B-InP (no CLIP, two experts
switched at ``boundary_ratio``).  The conditioning is the I2V ``y`` of DiffSynth-Studio's
``WanVideoUnit_ImageEmbedderVAE``: 4 mask channels (1 on the given frames) + the VAE latents of
``[image, black frames..., (end_image)]``.  CLIP (Wan2.1 only) sees the first image only: DiffSynth concatenates
the end image's CLIP tokens only for FLF2V models (``has_image_pos_emb``), and Fun-InP has no such embedding.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

from ..utils.media import load_image
from .fun_conditioning import i2v_condition
from .call_arguments import forwarded
from .pipeline_wan_fun_base import WanFunCondition, WanFunPipelineBase

__all__ = ["WanFunInpaintPipeline"]


class WanFunInpaintPipeline(WanFunPipelineBase):
    r"""
    Wan-Fun InP: video from a first frame (``image``) and optionally a last frame (``end_image``).

    Works with Wan2.1-Fun InP checkpoints (``in_channels=36``, CLIP image branch, ``image_encoder`` needed) and
    Wan2.2-Fun-A14B-InP (``in_channels=36``, no CLIP, ``transformer_2`` + ``boundary_ratio``).  The transformer may
    be stock :class:`diffusers.WanTransformer3DModel` (what the converters emit for InP) or
    :class:`~diffusers_wan_ext.WanFunTransformer3DModel`.  Components and config: see
    :class:`~diffusers_wan_ext.pipelines.pipeline_wan_fun_base.WanFunPipelineBase`.

    Example:
        >>> import torch
        >>> import diffusers_wan_ext  # noqa: F401  (registers the classes with Diffusers)
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import export_to_video, load_image
        >>> pipe = DiffusionPipeline.from_pretrained(  # doctest: +SKIP
        ...     "converted/Wan2.1-Fun-1.3B-InP", dtype=torch.bfloat16
        ... )
        >>> pipe.enable_model_cpu_offload()  # doctest: +SKIP
        >>> video = pipe(  # doctest: +SKIP
        ...     image=load_image("first.png"), end_image=load_image("last.png"),
        ...     prompt="a corgi running on the beach", height=480, width=832, num_frames=81,
        ... ).frames[0]
        >>> export_to_video(video, "fun_inpaint.mp4", fps=16)  # doctest: +SKIP
    """

    _supported_y_channels = (20,)

    def prepare_condition(
        self,
        height: int,
        width: int,
        num_frames: int,
        device: torch.device,
        image: torch.Tensor | None = None,
        end_image: torch.Tensor | None = None,
    ) -> WanFunCondition:
        """``y = cat(mask, VAE([image, 0..., (end_image)]))``; CLIP sees ``image`` (``[1, 3, H, W]`` in [-1, 1])."""
        y = i2v_condition(self.vae, image, num_frames, end_image=end_image)
        return WanFunCondition(y=y, clip_image=image)

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        end_image: PipelineImageInput | None = None,
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
        r"""
        Generate a video that starts at ``image`` (and ends at ``end_image``).

        Args:
            image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`):
                The first frame (required).  PIL images are resized to ``width x height``; arrays must have that
                size already (numpy ``[H, W, 3]`` uint8 or float in [0, 1], torch ``[1, 3, H, W]`` in [-1, 1]).
            prompt (`str` or `list[str]`, *optional*): the prompt(s); or pass ``prompt_embeds``.
            negative_prompt (`str` or `list[str]`, *optional*): the negative prompt(s) (default ``""``).
            end_image (*optional*):
                The last frame (same formats as ``image``): mask and VAE input get it as the last frame.
            height (`int`, defaults to 480), width (`int`, defaults to 832): video size, multiples of 16.
            num_frames (`int`, defaults to 81): frames, ``4n + 1``.
            num_inference_steps (`int`, defaults to 50): denoising steps.
            guidance_scale (`float`, defaults to 5.0):
                Classifier-free guidance scale (of the high-noise expert with two experts); ``<= 1`` disables CFG.
            guidance_scale_2 (`float`, *optional*):
                Scale of the low-noise expert (``transformer_2``); defaults to ``guidance_scale``.
            num_videos_per_prompt (`int`, defaults to 1): videos per prompt.
            generator (`torch.Generator` or a list of them, *optional*): for the initial noise.
            latents (`torch.Tensor`, *optional*): initial noise ``[B, 16, T_lat, H/8, W/8]``.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed umT5 embeddings.
            image_embeds (`torch.Tensor`, *optional*):
                Precomputed CLIP features (Wan2.1 Fun only) used instead of encoding ``image``.
            output_type (`str`, defaults to `"np"`): ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``.
            return_dict (`bool`, defaults to `True`): return a [`WanPipelineOutput`] rather than a tuple.
            attention_kwargs (`dict`, *optional*): passed to the attention processors (e.g. LoRA ``scale``).
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in stock Diffusers pipelines.
            max_sequence_length (`int`, defaults to 512): umT5 context length.
            cfg_batching (`bool`, *optional*):
                Run the conditional and the unconditional pass as one transformer forward of batch ``2 x B``
                (``False``: two forwards per step, as stock); ``None``: the pipeline's :attr:`cfg_batching`
                (``True`` unless set).
            sliding_window_size (`int`, *optional*), sliding_window_stride (`int`, *optional*):
                Temporal sliding windows in latent frames (DiffSynth-Studio's option): each transformer forward runs per
                window of ``sliding_window_size`` latent frames, ``sliding_window_stride`` apart, and the windows are
                blended (:mod:`diffusers_wan_ext.hooks.sliding_window`, ``docs/long_video.md``).  ``None``: off.

        Examples:
            >>> video = pipe(image=first, prompt="a cat", height=480, width=832).frames[0]  # doctest: +SKIP

        Returns:
            [`WanPipelineOutput`] with ``frames``, or a tuple ``(frames,)`` when ``return_dict=False``.
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        if image is None:
            raise ValueError(
                "WanFunInpaintPipeline needs `image`: Fun-InP generates from a first frame (pass a PIL image; "
                "`end_image` optionally adds a last frame). For video without an image use a text-to-video pipeline"
            )
        self.check_fun_inputs(
            prompt, negative_prompt, height, width, num_frames, prompt_embeds, negative_prompt_embeds, image_embeds,
            callback_on_step_end_tensor_inputs, guidance_scale_2,
        )
        first = load_image(image, height, width, name="image")
        last = load_image(end_image, height, width, name="end_image") if end_image is not None else None
        condition_inputs = {"image": first, "end_image": last}
        return self.generate(**forwarded(locals(), self.generate))
