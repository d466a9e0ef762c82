"""``WanFunControlPipeline``: Wan-Fun Control (control video, optional start frame and reference image).

Covers Wan2.1-Fun-1.3B/14B-Control (``in_channels=48``, CLIP), Wan2.1-Fun-V1.1-1.3B/14B-Control (48, CLIP,
``ref_conv``) and Wan2.2-Fun-A14B-Control (``in_channels=52``, no CLIP, ``ref_conv``, two experts).

Conditioning (DiffSynth-Studio ``WanVideoUnit_FunControl`` / ``WanVideoUnit_FunReference``):

* ``y = cat(VAE(control_video), image part)`` where the image part is the I2V ``y`` of the start frame without its
  mask (Wan2.1, 16 channels) or with it (Wan2.2, 20 channels), or zeros without a start frame;
* ``reference_image`` (``ref_conv`` models): resized to the video size, VAE-encoded to ``reference_latents``
  ``[1, 16, 1, H/8, W/8]``; the transformer prepends its ``ref_conv`` tokens.  With a CLIP encoder its CLIP
  features replace the start frame's;
* CLIP (Wan2.1): features of the reference image, else of the start frame, else zeros ``[1, 257, image_dim]``.

Differences from the references, chosen on purpose:

* Wan2.2 (52 channels) with a start frame keeps mask + image latents, as VideoX-Fun (upstream of the checkpoints)
  does.  DiffSynth-Studio keeps its I2V ``y`` only when a CLIP feature exists too, and Wan2.2-Fun has no CLIP, so
  it zeroes the image part; pass no ``image`` to get DiffSynth's Wan2.2 conditioning.
* A ``ref_conv`` model without ``reference_image`` gets no reference tokens (DiffSynth).  VideoX-Fun passes the
  ``ref_conv`` tokens of an all-zero latent instead.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

from ..utils.media import encode_video, load_image, load_video_frames
from .fun_conditioning import fun_control_condition, i2v_condition
from .call_arguments import forwarded
from .pipeline_wan_fun_base import WanFunCondition, WanFunPipelineBase

__all__ = ["WanFunControlPipeline"]


class WanFunControlPipeline(WanFunPipelineBase):
    r"""
    Wan-Fun Control: video following a control video (depth, pose, canny, ...), optionally from a start frame
    (``image``) and with a reference image (``reference_image``, Fun-V1.1 / Wan2.2-Fun checkpoints with ``ref_conv``).

    Works with Wan2.1-Fun(-V1.1) Control (``in_channels=48``, CLIP ``image_encoder``) and Wan2.2-Fun-A14B-Control
    (``in_channels=52``, no CLIP, ``transformer_2`` + ``boundary_ratio``).  The transformer is
    :class:`~diffusers_wan_ext.WanFunTransformer3DModel`, or stock :class:`diffusers.WanTransformer3DModel` for
    Wan2.1 Fun-Control without ``ref_conv``.  Components and config: see
    :class:`~diffusers_wan_ext.pipelines.pipeline_wan_fun_base.WanFunPipelineBase`.

    Example:
        >>> import torch
        >>> import diffusers_wan_ext  # noqa: F401  (registers the classes with Diffusers)
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import export_to_video, load_image, load_video
        >>> pipe = DiffusionPipeline.from_pretrained(  # doctest: +SKIP
        ...     "converted/Wan2.1-Fun-V1.1-1.3B-Control", dtype=torch.bfloat16
        ... )
        >>> control = [f.resize((832, 480)) for f in load_video("pose.mp4")[:81]]  # doctest: +SKIP
        >>> video = pipe(  # doctest: +SKIP
        ...     control_video=control, reference_image=load_image("character.png"),
        ...     prompt="a girl dancing in a garden", height=480, width=832, num_frames=81,
        ... ).frames[0]
        >>> export_to_video(video, "fun_control.mp4", fps=16)  # doctest: +SKIP
    """

    _supported_y_channels = (32, 36)

    @property
    def has_ref_conv(self) -> bool:
        """Whether the transformer(s) take a reference image (``ref_conv``: Fun-V1.1 / Wan2.2-Fun Control)."""
        return self._experts_have("ref_conv_in_channels")

    def prepare_condition(
        self,
        height: int,
        width: int,
        num_frames: int,
        device: torch.device,
        control_video: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        reference_image: torch.Tensor | None = None,
    ) -> WanFunCondition:
        """``y = fun_control_condition(VAE(control), in_channels - 32, i2v_y of image or None)``, reference latents,
        and the image CLIP should see (reference image first, then the start frame)."""
        z_dim = self.vae.config.z_dim
        control_latents = encode_video(self.vae, control_video)
        i2v_y = i2v_condition(self.vae, image, num_frames) if image is not None else None
        y = fun_control_condition(control_latents, self.condition_channels - z_dim, i2v_y)
        extra = {}
        if reference_image is not None:
            extra["reference_latents"] = encode_video(self.vae, reference_image.unsqueeze(2))
        clip_image = reference_image if reference_image is not None else image
        return WanFunCondition(y=y, clip_image=clip_image, transformer_kwargs=extra)

    @torch.no_grad()
    def __call__(
        self,
        control_video: Any = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        image: PipelineImageInput | None = None,
        reference_image: PipelineImageInput | None = None,
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
        Generate a video that follows ``control_video``.

        Args:
            control_video (required):
                The control video with exactly ``num_frames`` frames of ``height x width`` (it is not resized): a
                list of PIL images, a numpy array ``[F, H, W, 3]`` (uint8, or float in [0, 1]), a torch tensor
                ``[F, 3, H, W]`` / ``[1, 3, F, H, W]`` in [-1, 1], or a path to a video file.
            prompt (`str` or `list[str]`, *optional*): the prompt(s); or pass ``prompt_embeds``.
            negative_prompt (`str` or `list[str]`, *optional*): the negative prompt(s) (default ``""``).
            image (*optional*):
                Start frame (PIL images are resized to ``width x height``): its VAE latents (and, Wan2.2, the
                first-frame mask) fill the image part of ``y``; Wan2.1 models also get its CLIP features.
            reference_image (*optional*):
                Reference image (PIL images are resized to ``width x height``) for checkpoints with ``ref_conv``
                (Fun-V1.1 Control, Wan2.2-Fun Control); with a CLIP encoder its CLIP features are used.
            height (`int`, defaults to 480), width (`int`, defaults to 832): video size, multiples of 16.
            num_frames (`int`, defaults to 81): frames, ``4n + 1``; the control video must have as many.
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
                Precomputed CLIP features (Wan2.1 Fun only), used instead of those of ``reference_image`` /
                ``image`` / zeros.
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
            >>> video = pipe(control_video=frames, prompt="a robot", num_frames=len(frames)).frames[0]  # doctest: +SKIP

        Returns:
            [`WanPipelineOutput`] with ``frames``, or a tuple ``(frames,)`` when ``return_dict=False``.
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        if control_video is None:
            raise ValueError(
                "WanFunControlPipeline needs `control_video` (num_frames frames of height x width: a list of PIL "
                "images, a numpy array [F, H, W, 3] or a video path); for image-to-video use WanFunInpaintPipeline"
            )
        self.check_fun_inputs(
            prompt, negative_prompt, height, width, num_frames, prompt_embeds, negative_prompt_embeds, image_embeds,
            callback_on_step_end_tensor_inputs, guidance_scale_2,
        )
        if reference_image is not None and not self.has_ref_conv:
            raise ValueError(
                "`reference_image` needs a transformer with ref_conv (Fun-V1.1 Control or Wan2.2-Fun Control "
                "checkpoints); this one has none (Wan2.1 Fun-Control): leave reference_image out, or pass the "
                "picture as the start frame `image`"
            )
        control = load_video_frames(control_video, num_frames, height, width, name="control_video")
        first = load_image(image, height, width, name="image") if image is not None else None
        reference = None
        if reference_image is not None:
            reference = load_image(reference_image, height, width, name="reference_image")
        condition_inputs = {"control_video": control, "image": first, "reference_image": reference}
        return self.generate(**forwarded(locals(), self.generate))
