"""``WanFunCameraControlPipeline``: Wan-Fun Control-Camera (image-to-video along a camera trajectory).

Covers Wan2.1-Fun-V1.1-1.3B/14B-Control-Camera (``in_channels=32``, CLIP) and Wan2.2-Fun-A14B-Control-Camera
(``in_channels=36``, no CLIP, two experts).  As DiffSynth-Studio's ``WanVideoUnit_FunCameraControl``:

* the camera is a CameraCtrl trajectory -- generated from ``camera_control_direction`` / ``camera_control_speed`` /
  ``camera_control_origin``, or given per frame as ``camera_poses`` -- turned into a per-pixel Plücker map and
  packed to ``[1, 24, T_lat, H, W]`` (:func:`~diffusers_wan_ext.utils.camera.camera_control_latents`); the
  transformer's ``control_adapter`` adds it to the patch embeddings (conditional and unconditional pass);
* ``y``: Wan2.1 (16 channels) zeros with latent frame 0 = VAE(image) and no mask; Wan2.2 (20 channels) the I2V
  ``y`` (mask + VAE of ``[image, black frames]``);
* CLIP features of ``image`` for the Wan2.1 camera models.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

from ..utils.camera import CAMERA_DIRECTIONS, DEFAULT_CAMERA_SPEED, camera_control_latents
from ..utils.media import load_image
from .fun_conditioning import fun_camera_condition
from .call_arguments import forwarded
from .pipeline_wan_fun_base import WanFunCondition, WanFunPipelineBase

__all__ = ["WanFunCameraControlPipeline"]


class WanFunCameraControlPipeline(WanFunPipelineBase):
    r"""
    Wan-Fun Control-Camera: video from a first frame (``image``) with the camera moving along a trajectory.

    Give the trajectory either as ``camera_control_direction`` (one of
    :data:`~diffusers_wan_ext.utils.camera.CAMERA_DIRECTIONS`: ``Left``, ``Right``, ``Up``, ``Down``, ``LeftUp``,
    ``LeftDown``, ``RightUp``, ``RightDown``, ``In``, ``Out``) with ``camera_control_speed`` (default 1/54 per frame)
    and ``camera_control_origin`` (the first CameraCtrl row), or as explicit ``camera_poses`` (one 19-number
    CameraCtrl row per frame).  The transformer must have the camera ``control_adapter``
    (:class:`~diffusers_wan_ext.WanFunTransformer3DModel` with ``control_adapter_in_channels=24``).  Components
    and config: see :class:`~diffusers_wan_ext.pipelines.pipeline_wan_fun_base.WanFunPipelineBase`.

    Example:
        >>> import torch
        >>> import diffusers_wan_ext  # noqa: F401  (registers the classes with Diffusers)
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import export_to_video, load_image
        >>> pipe = DiffusionPipeline.from_pretrained(  # doctest: +SKIP
        ...     "converted/Wan2.1-Fun-V1.1-1.3B-Control-Camera", dtype=torch.bfloat16
        ... )
        >>> video = pipe(  # doctest: +SKIP
        ...     image=load_image("street.png"), camera_control_direction="Left",
        ...     prompt="a quiet street at dusk", height=480, width=832, num_frames=81,
        ... ).frames[0]
        >>> export_to_video(video, "fun_camera.mp4", fps=16)  # doctest: +SKIP
    """

    _supported_y_channels = (16, 20)

    @property
    def has_camera_adapter(self) -> bool:
        """Whether the transformer(s) have the camera ``control_adapter`` (Fun Control-Camera checkpoints)."""
        return self._experts_have("control_adapter_in_channels")

    def prepare_condition(
        self,
        height: int,
        width: int,
        num_frames: int,
        device: torch.device,
        image: torch.Tensor | None = None,
        control_camera_latents: torch.Tensor | None = None,
    ) -> WanFunCondition:
        """``y = fun_camera_condition(image)`` (16 or 20 channels), the camera map, and CLIP of ``image``."""
        y = fun_camera_condition(self.vae, image, num_frames, self.condition_channels)
        return WanFunCondition(
            y=y, clip_image=image, transformer_kwargs={"control_camera_latents": control_camera_latents}
        )

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        camera_control_direction: str | None = None,
        camera_control_speed: float = DEFAULT_CAMERA_SPEED,
        camera_control_origin: Sequence[float] | None = None,
        camera_poses: Sequence[Sequence[float]] | torch.Tensor | None = None,
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
        Generate a video from ``image`` with a camera move.

        Args:
            image (required):
                The first frame (PIL images are resized to ``width x height``; numpy ``[H, W, 3]`` / torch
                ``[1, 3, H, W]`` in [-1, 1] must have that size).
            prompt (`str` or `list[str]`, *optional*): the prompt(s); or pass ``prompt_embeds``.
            negative_prompt (`str` or `list[str]`, *optional*): the negative prompt(s) (default ``""``).
            camera_control_direction (`str`, *optional*):
                One of ``Left``, ``Right``, ``Up``, ``Down``, ``LeftUp``, ``LeftDown``, ``RightUp``, ``RightDown``,
                ``In``, ``Out`` (DiffSynth-Studio's trajectories).  Give this or ``camera_poses``.
            camera_control_speed (`float`, defaults to 1/54): step per frame of the generated trajectory.
            camera_control_origin (19 numbers, *optional*):
                First CameraCtrl row of the generated trajectory (default: identity pose, 1280x720 intrinsics).
            camera_poses (*optional*):
                Explicit trajectory: ``num_frames`` CameraCtrl rows ``[frame, fx, fy, cx, cy, 0, 0, w2c (3x4,
                row-major)]`` (list, numpy array or tensor ``[F, 19]``).  Give this or ``camera_control_direction``.
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
                Precomputed CLIP features (Wan2.1 camera models only) used instead of encoding ``image``.
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
            >>> video = pipe(image=img, camera_control_direction="In", prompt="a forest").frames[0]  # doctest: +SKIP

        Returns:
            [`WanPipelineOutput`] with ``frames``, or a tuple ``(frames,)`` when ``return_dict=False``.
        """
        self.check_sliding_window_options(sliding_window_size, sliding_window_stride)
        if image is None:
            raise ValueError(
                "WanFunCameraControlPipeline needs `image`: Fun Control-Camera generates from a first frame "
                "(pass a PIL image)"
            )
        self.check_fun_inputs(
            prompt, negative_prompt, height, width, num_frames, prompt_embeds, negative_prompt_embeds, image_embeds,
            callback_on_step_end_tensor_inputs, guidance_scale_2,
        )
        if not self.has_camera_adapter:
            raise ValueError(
                "camera control needs a transformer with the camera control_adapter (a Fun Control-Camera "
                "checkpoint: WanFunTransformer3DModel with control_adapter_in_channels=24); this one has none -- "
                "for plain image-to-video use WanFunInpaintPipeline"
            )
        if (camera_control_direction is None) == (camera_poses is None):
            raise ValueError(
                "pass exactly one of `camera_control_direction` (one of " + ", ".join(CAMERA_DIRECTIONS) + ") or "
                "`camera_poses` (one CameraCtrl row per frame); got "
                + ("both" if camera_poses is not None else "neither")
            )
        if camera_control_direction is not None and camera_control_direction not in CAMERA_DIRECTIONS:
            raise ValueError(
                f"unknown camera_control_direction {camera_control_direction!r}; pass one of "
                + ", ".join(CAMERA_DIRECTIONS)
            )
        if camera_poses is not None and camera_control_origin is not None:
            raise ValueError(
                "`camera_control_origin` only applies to `camera_control_direction`; with `camera_poses` put the "
                "start pose in camera_poses[0]"
            )
        first = load_image(image, height, width, name="image")
        camera = camera_control_latents(
            num_frames,
            height,
            width,
            direction=camera_control_direction,
            speed=camera_control_speed,
            origin=camera_control_origin,
            poses=camera_poses,
        )
        condition_inputs = {"image": first, "control_camera_latents": camera}
        return self.generate(**forwarded(locals(), self.generate))
