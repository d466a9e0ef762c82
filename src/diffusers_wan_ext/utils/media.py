"""Video and image inputs of the pipelines: loading into ``[-1, 1]`` tensors, and VAE encoding to normalized latents.

Used by the Wan-Fun, Video-As-Prompt, S2V, Animate and LongCat pipelines and by training:

* :func:`load_video_frames` / :func:`load_image` -- a list of PIL images, a numpy array (uint8 0..255 or float
  0..1), a torch tensor in ``[-1, 1]`` or a file path -> float32 ``[1, 3, F, H, W]`` / ``[1, 3, H, W]`` in
  ``[-1, 1]`` with the reference's mapping ``x * (2/255) - 1``.  Videos are never resized silently: their frame
  count and size must match the request (PIL images are resized, as the references do);
* :func:`video_to_tensor` / :func:`read_video_file` -- the same conversion without the size checks;
* :func:`encode_video` -- normalized VAE latents: posterior mode, then ``(z - latents_mean) / latents_std``;
* :func:`check_positive_ints`, :func:`check_frame_count`, :func:`vae_scale_factors` -- the shared checks.

Example:
    >>> import numpy as np
    >>> video = load_video_frames(np.zeros((5, 32, 32, 3), np.uint8), num_frames=5, height=32, width=32)
    >>> tuple(video.shape), float(video.min())
    ((1, 3, 5, 32, 32), -1.0)
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch

__all__ = [
    "check_frame_count",
    "check_positive_ints",
    "encode_video",
    "load_image",
    "load_video_frames",
    "read_video_file",
    "vae_scale_factors",
    "video_to_tensor",
]

_RANGE_SLACK = 1e-3


# ----------------------------------------------------------------------------------------------------------- loading


def check_positive_ints(**values: Any) -> None:
    """Raise unless every keyword value is a positive integer (the message names the keyword)."""
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{key} must be a positive integer; got {v!r}")


def check_frame_count(num_frames: int, temporal_factor: int = 4) -> None:
    """Raise unless ``num_frames`` is ``temporal_factor * n + 1`` (what the Wan VAE encodes); the message names the
    nearest valid counts."""
    check_positive_ints(num_frames=num_frames)
    if (num_frames - 1) % temporal_factor:
        lo = (num_frames - 1) // temporal_factor * temporal_factor + 1
        raise ValueError(
            f"num_frames={num_frames} is not {temporal_factor}n+1 (the Wan VAE encodes 1 + {temporal_factor}n "
            f"frames); pass {lo} or {lo + temporal_factor}"
        )


def _uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], exactly as the reference's ``preprocess_image`` (``x * (2/255) + (-1)``)."""
    return x.to(torch.float32) * (2 / 255) - 1


def _numpy_frames(arr: np.ndarray, name: str) -> torch.Tensor:
    """``[..., H, W, 3]`` numpy (uint8 or float in [0, 1]) -> float32 torch in [-1, 1], same leading dims."""
    if arr.dtype == np.uint8:
        return _uint8_to_unit(torch.from_numpy(np.ascontiguousarray(arr)))
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (arr.min() < -_RANGE_SLACK or arr.max() > 1 + _RANGE_SLACK):
            raise ValueError(
                f"{name}: float numpy pixels must be in [0, 1] (got {arr.min():.4g}..{arr.max():.4g}); pass uint8 "
                f"0..255 pixels as dtype uint8, or divide by 255"
            )
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)) * 2 - 1
    raise ValueError(f"{name}: numpy pixels must be uint8 (0..255) or float (0..1); got dtype {arr.dtype}")


def _check_unit_range(t: torch.Tensor, name: str) -> None:
    if t.numel() and (t.min() < -1 - _RANGE_SLACK or t.max() > 1 + _RANGE_SLACK):
        raise ValueError(
            f"{name}: torch tensors must hold pixels in [-1, 1] (got {t.min().item():.4g}..{t.max().item():.4g}); "
            f"map 0..255 pixels with x / 127.5 - 1, 0..1 pixels with x * 2 - 1, or pass a uint8 numpy array"
        )


def _frames_from_list(frames: Sequence[Any], name: str) -> torch.Tensor:
    if len(frames) == 0:
        raise ValueError(f"{name} is an empty list; pass a list of PIL images (one per frame)")
    arrays = []
    for i, fr in enumerate(frames):
        if isinstance(fr, PIL.Image.Image):
            arrays.append(np.asarray(fr.convert("RGB"), dtype=np.uint8))
        elif isinstance(fr, np.ndarray) and fr.ndim == 3 and fr.shape[-1] == 3:
            arrays.append(fr)
        else:
            raise ValueError(
                f"{name}[{i}] is a {type(fr).__name__}; a frame list must hold PIL images (or numpy [H, W, 3] arrays)"
            )
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{name}: frames have different sizes {sorted(sizes)}; all frames must be the same size")
    if len({a.dtype for a in arrays}) > 1:
        raise ValueError(f"{name}: frames have different dtypes; pass all uint8 or all float")
    return _numpy_frames(np.stack(arrays), name)  # [F, H, W, 3]


def read_video_file(path: str | os.PathLike, name: str) -> list[PIL.Image.Image]:
    """The frames of the video file at ``path`` (``diffusers.utils.load_video``); ``name`` is the argument's name in
    the error raised when there is no such file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no video file at {path!r}; pass an existing file, a list of PIL images or an array")
    from diffusers.utils import load_video

    return load_video(path)


def video_to_tensor(video: Any, name: str) -> torch.Tensor:
    """Any supported video input -> float32 ``[1, 3, F, H, W]`` in [-1, 1] (no size checks)."""
    if isinstance(video, (str, os.PathLike)):
        video = read_video_file(video, name)
    if isinstance(video, PIL.Image.Image):
        raise ValueError(f"{name} is a single PIL image; pass a list of PIL images (one per frame), e.g. [image]")
    if isinstance(video, (list, tuple)):
        frames = _frames_from_list(video, name)  # [F, H, W, 3]
        return frames.permute(3, 0, 1, 2).unsqueeze(0).contiguous()
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"{name}: numpy videos must be [F, H, W, 3] (RGB); got shape {tuple(video.shape)}")
        return _numpy_frames(video, name).permute(3, 0, 1, 2).unsqueeze(0).contiguous()
    if isinstance(video, torch.Tensor):
        if not video.is_floating_point():
            raise ValueError(
                f"{name}: torch videos must be float in [-1, 1] (got dtype {video.dtype}); pass uint8 pixels as a "
                f"numpy array [F, H, W, 3] instead"
            )
        t = video.detach()
        if t.ndim == 5 and t.shape[:2] == (1, 3):
            pass
        elif t.ndim == 4 and t.shape[1] == 3:  # [F, 3, H, W] (the Diffusers frame-batch convention)
            t = t.permute(1, 0, 2, 3).unsqueeze(0)
        elif t.ndim == 4 and t.shape[0] == 3:  # [3, F, H, W]
            t = t.unsqueeze(0)
        else:
            raise ValueError(
                f"{name}: torch videos must be [F, 3, H, W], [3, F, H, W] or [1, 3, F, H, W]; got {tuple(t.shape)}"
            )
        _check_unit_range(t, name)
        return t.to(device="cpu", dtype=torch.float32).contiguous()
    raise ValueError(
        f"{name}: unsupported type {type(video).__name__}; pass a list of PIL images, a numpy array [F, H, W, 3], "
        f"a torch tensor [F, 3, H, W] / [1, 3, F, H, W] in [-1, 1], or a path to a video file"
    )


def load_video_frames(
    video: Any, num_frames: int, height: int, width: int, name: str = "control_video"
) -> torch.Tensor:
    """Load a video as ``[1, 3, F, H, W]`` float32 in ``[-1, 1]``, checking its frame count and size.

    Args:
        video: a list of PIL images; a numpy array ``[F, H, W, 3]`` (uint8 0..255 or float 0..1); a torch tensor
            ``[F, 3, H, W]``, ``[3, F, H, W]`` or ``[1, 3, F, H, W]`` (float in [-1, 1]); or a path to a video file
            (read with ``diffusers.utils.load_video``).
        num_frames: the frame count the video must have (``4n + 1``).
        height, width: the frame size the video must have.  Videos are not resized: resize them beforehand.
        name: the argument's name in error messages.

    Example:
        >>> from PIL import Image
        >>> frames = [Image.new("RGB", (64, 32), (255, 0, 0))] * 5
        >>> load_video_frames(frames, num_frames=5, height=32, width=64)[0, :, 0, 0, 0].tolist()
        [1.0, -1.0, -1.0]
    """
    check_positive_ints(height=height, width=width)
    check_frame_count(num_frames)
    t = video_to_tensor(video, name)
    n, h, w = t.shape[2:]
    if n != num_frames:
        lo = (n - 1) // 4 * 4 + 1
        hint = "" if (n - 1) % 4 == 0 else f" ({n} is not 4n+1: trim the video to {lo} frames and pass num_frames={lo})"
        raise ValueError(
            f"{name} has {n} frames but num_frames={num_frames}: pass num_frames={n} to use the whole video{hint}, "
            f"or a video of {num_frames} frames (num_frames must be 4n+1)"
        )
    if (h, w) != (height, width):
        raise ValueError(
            f"{name} frames are {h}x{w} (height x width) but height={height}, width={width}: resize the video to "
            f"{height}x{width} or pass height={h}, width={w}"
        )
    return t


def load_image(image: Any, height: int, width: int, name: str = "image") -> torch.Tensor:
    """Load one image as ``[1, 3, H, W]`` float32 in ``[-1, 1]`` (``x * (2/255) - 1`` for 8-bit pixels).

    PIL images (and image file paths) are resized with ``image.convert("RGB").resize((width, height))`` like the
    reference; numpy ``[H, W, 3]`` (uint8 0..255 or float 0..1) and torch ``[3, H, W]`` / ``[1, 3, H, W]`` (float in
    [-1, 1]) inputs must already be ``height x width``.

    Example:
        >>> from PIL import Image
        >>> load_image(Image.new("RGB", (8, 8), (255, 255, 255)), 16, 32).shape
        torch.Size([1, 3, 16, 32])
    """
    check_positive_ints(height=height, width=width)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ValueError(f"{name}: no image file at {path!r}; pass an existing file, a PIL image or an array")
        with PIL.Image.open(path) as im:
            image = im.convert("RGB")
    if isinstance(image, PIL.Image.Image):
        arr = np.array(image.convert("RGB").resize((width, height)), dtype=np.uint8)
        return _uint8_to_unit(torch.from_numpy(arr)).permute(2, 0, 1).unsqueeze(0).contiguous()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{name}: numpy images must be [H, W, 3] (RGB); got shape {tuple(image.shape)}")
        t = _numpy_frames(image, name).permute(2, 0, 1).unsqueeze(0)
    elif isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            raise ValueError(f"{name}: torch images must be float in [-1, 1] (got dtype {image.dtype}); pass uint8 "
                             f"pixels as a numpy array [H, W, 3] or a PIL image")
        t = image.detach()
        if t.ndim == 3 and t.shape[0] == 3:
            t = t.unsqueeze(0)
        elif not (t.ndim == 4 and t.shape[:2] == (1, 3)):
            raise ValueError(f"{name}: torch images must be [3, H, W] or [1, 3, H, W]; got {tuple(t.shape)}")
        _check_unit_range(t, name)
        t = t.to(device="cpu", dtype=torch.float32)
    else:
        raise ValueError(
            f"{name}: unsupported type {type(image).__name__}; pass a PIL image, a numpy array [H, W, 3], a torch "
            f"tensor [1, 3, H, W] in [-1, 1] or an image file path"
        )
    h, w = t.shape[-2:]
    if (h, w) != (height, width):
        raise ValueError(
            f"{name} is {h}x{w} (height x width) but height={height}, width={width}: resize it to {height}x{width} "
            f"(or pass a PIL image, which is resized), or pass height={h}, width={w}"
        )
    return t.contiguous()


# ---------------------------------------------------------------------------------------------------------- encoding


def vae_scale_factors(vae) -> tuple[int, int]:
    """``(temporal, spatial)`` compression of the Wan VAE (from its config; 4 and 8 when not set)."""
    cfg = vae.config
    return int(getattr(cfg, "scale_factor_temporal", None) or 4), int(getattr(cfg, "scale_factor_spatial", None) or 8)


def _execution_device(vae) -> torch.device:
    try:
        from diffusers.utils.torch_utils import get_module_execution_device
    except ImportError:  # older Diffusers
        return next(vae.parameters()).device
    return get_module_execution_device(vae)


def encode_video(vae, video: torch.Tensor) -> torch.Tensor:
    """Normalized VAE latents of ``video`` ``[B, 3, F, H, W]`` in [-1, 1]: posterior mode, ``(z - mean) / std``.

    The video is moved to the VAE's (execution) device and dtype; the latents ``[B, z_dim, T_lat, H/8, W/8]`` stay
    there.  No tiling is forced: the VAE's own ``enable_tiling()`` setting applies.

    Example:
        >>> latents = encode_video(vae, load_video_frames(frames, 9, 480, 832))  # doctest: +SKIP
    """
    if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != 3:
        shape = tuple(video.shape) if hasattr(video, "shape") else type(video).__name__
        raise ValueError(f"video must be a tensor [B, 3, F, H, W] in [-1, 1] (see load_video_frames); got {shape}")
    z = vae.encode(video.to(device=_execution_device(vae), dtype=vae.dtype)).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1, 1)
    return (z - mean) / std
