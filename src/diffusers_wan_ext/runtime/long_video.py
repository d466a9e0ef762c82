"""Latent-space continuation: a long video as segments, each conditioned on the last frames of the previous one.

:func:`generate_long_video` runs an image-to-video pipeline (any pipeline whose ``__call__`` takes ``image``: stock
``WanImageToVideoPipeline`` for Wan2.1 I2V / Wan2.2 I2V-A14B / TI2V-5B, our reference and Fun InP pipelines, ...)
segment by segment: the last decoded frame of a segment is the next segment's ``image``, and the next segment's
first frame (its reconstruction of that image) is dropped when the segments are joined.  Pipelines that continue a
*video* (their ``video`` argument takes the conditioning frames and their output starts with them, like
LongCat-Video's) condition on the last ``overlap_frames`` frames with ``condition="video"``.

The conditioning goes through the VAE again (decoded frame -> 8-bit image -> encoded by the pipeline), so a
segment sees what the viewer sees; small drifts of colour and detail accumulate over many segments (keep segments
long, e.g. 81 frames, and their number moderate).  For one long shot without seams prefer the context windows of
:mod:`diffusers_wan_ext.runtime.context_windows` (T2V) -- continuation is for going on from a given image.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["CONDITIONS", "continuation_frames", "generate_long_video", "to_pil"]

#: how a segment is conditioned on the previous one: ``image`` (last frame) or ``video`` (last ``overlap_frames``)
CONDITIONS = ("image", "video")


def continuation_frames(segments: int, num_frames: int, overlap_frames: int = 1) -> int:
    """Frames of a video of ``segments`` segments of ``num_frames`` frames, each after the first repeating
    ``overlap_frames`` frames of the previous one: ``num_frames + (segments - 1) * (num_frames - overlap_frames)``."""
    return num_frames + (segments - 1) * (num_frames - overlap_frames)


def to_pil(frame: np.ndarray) -> Image.Image:
    """An ``[H, W, 3]`` float frame in ``[0, 1]`` (a pipeline's ``"np"`` output) as an 8-bit RGB image (rounded, as
    Diffusers' ``numpy_to_pil``)."""
    return Image.fromarray((np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8))


def _check_arguments(pipe: Any, prompt: Any, segments: Any, num_frames: Any, overlap_frames: Any, condition: str,
                     kwargs: dict[str, Any]) -> list[str]:
    """Validate before anything runs; return the prompt of every segment."""
    for name, value in (("segments", segments), ("num_frames", num_frames), ("overlap_frames", overlap_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if overlap_frames >= num_frames:
        raise ValueError(f"overlap_frames ({overlap_frames}) must be smaller than num_frames ({num_frames})")
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    if condition == "image" and overlap_frames != 1:
        raise ValueError(f"overlap_frames={overlap_frames}: an image-conditioned segment continues from one frame "
                         "(use overlap_frames=1, or condition='video' with a pipeline that takes several frames)")
    parameters = inspect.signature(pipe.__call__).parameters
    if condition not in parameters:
        raise ValueError(f"condition={condition!r}: {type(pipe).__name__}.__call__ takes no {condition!r} argument")
    for name in ("output_type", "return_dict", "num_frames", "prompt", condition):
        if name in kwargs:
            raise ValueError(f"generate_long_video sets {name!r} itself; remove it from the pipeline arguments")
    if kwargs.get("num_videos_per_prompt", 1) != 1:
        raise ValueError("generate_long_video makes one video: num_videos_per_prompt must be 1")
    prompts = [prompt] * segments if isinstance(prompt, str) else list(prompt)
    if len(prompts) != segments or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a list of {segments} strings (one per segment)")
    return prompts


def generate_long_video(
    pipe: Any,
    prompt: str | list[str],
    *,
    image: Image.Image | None = None,
    segments: int = 2,
    num_frames: int = 81,
    overlap_frames: int = 1,
    condition: str = "image",
    **kwargs: Any,
) -> np.ndarray:
    """Generate ``segments`` segments of ``num_frames`` frames, each conditioned on the end of the previous one.

    Args:
        pipe: a pipeline whose ``__call__`` takes ``condition`` (``image`` or ``video``), ``prompt``, ``num_frames``,
            ``output_type="np"``.
        prompt: one prompt, or one per segment (a story told segment by segment).
        image: the first segment's image (``None``: the first segment is whatever the pipeline makes without one,
            e.g. text-to-video).
        segments: number of segments (``1``: a single call).
        num_frames: video frames per segment, conditioning included (``4n + 1`` for Wan: 81 at 16 fps = 5 s).
        overlap_frames: frames of the previous segment each segment starts from (1 with ``condition="image"``);
            they are dropped from the continuation when joining.
        condition: ``"image"`` -- the last frame is the next ``image``; ``"video"`` -- the last ``overlap_frames``
            frames (``[k, H, W, 3]`` floats in ``[0, 1]``) are the next ``video``, for pipelines whose output starts
            with the frames they continue.
        **kwargs: passed to every call (``negative_prompt``, ``height``, ``width``, ``num_inference_steps``,
            ``guidance_scale``, ``generator`` -- one generator continues its random stream across segments -- ...).

    Returns:
        ``[continuation_frames(segments, num_frames, overlap_frames), H, W, 3]`` float32 frames in ``[0, 1]``.

    Raises:
        ValueError: a bad count, ``overlap_frames >= num_frames``, a pipeline without the ``condition`` argument,
            an argument this function sets itself, or a prompt list of the wrong length (all before any call).
    """
    prompts = _check_arguments(pipe, prompt, segments, num_frames, overlap_frames, condition, kwargs)
    video: list[np.ndarray] = []
    for index, segment_prompt in enumerate(prompts):
        call = dict(kwargs, prompt=segment_prompt, num_frames=num_frames, output_type="np", return_dict=True)
        if index == 0:
            if image is not None:
                call["image"] = image
        elif condition == "image":
            call["image"] = to_pil(video[-1])
        else:
            call["video"] = np.stack(video[-overlap_frames:])
        frames = np.asarray(pipe(**call).frames[0], dtype=np.float32)
        if frames.ndim != 4 or frames.shape[0] != num_frames:
            raise ValueError(f"segment {index}: {type(pipe).__name__} returned frames of shape {frames.shape}, "
                             f"expected [{num_frames}, H, W, 3]")
        video.extend(frames if index == 0 else frames[overlap_frames:])
    return np.stack(video)
