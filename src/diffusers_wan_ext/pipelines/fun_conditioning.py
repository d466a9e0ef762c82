"""Conditioning tensors of the Wan-Fun pipelines (Control, Control-Camera) and of I2V-style ``y``.

The Wan DiT's input is ``x = cat([noisy_latents (z), y], dim=1)`` with ``in_dim = z + y_channels`` channels
(``z = 16`` for the Wan2.1 VAE).  ``y`` is built per model family, all at latent resolution
``[B, C, T_lat, H/8, W/8]`` with ``T_lat = (num_frames - 1) // 4 + 1``:

==========  ==============================  ======================================================================
``in_dim``  model                           ``y`` (channels)
==========  ==============================  ======================================================================
36          Wan2.1 I2V / Fun-InP / FLF2V    ``mask (4) + VAE([image, 0, ..., 0 (, end_image)]) (16)`` -
                                            :func:`i2v_condition`
48          Wan2.1 Fun-Control              ``control latents (16) + image latents (16)`` (the I2V ``y`` without its
                                            mask, or zeros without an image) - :func:`fun_control_condition`
52          Wan2.2 Fun-A14B-Control         ``control latents (16) + mask (4) + image latents (16)`` -
                                            :func:`fun_control_condition` with ``y_channels=20``
32          Wan2.1 Fun-Control-Camera       ``image latents (16)`` in latent frame 0, zeros elsewhere -
                                            :func:`fun_camera_condition` with ``y_channels=16``; the camera itself
                                            enters through the DiT's ``control_adapter``
                                            (:func:`diffusers_wan_ext.utils.camera.camera_control_latents`)
36          Wan2.2 Fun-A14B-Control-Camera  the I2V ``y`` (mask + image latents) - ``y_channels=20``
==========  ==============================  ======================================================================

"Control latents" are the VAE latents of the control video (depth / pose / canny ...), "image latents" the VAE
latents of the start image followed by black frames.  All latents are *normalized*: posterior mode, then
``(z - latents_mean) / latents_std`` (:func:`encode_video`).  The reference is DiffSynth-Studio 2.1.12
(``WanVideoUnit_ImageEmbedderVAE``, ``WanVideoUnit_FunControl``, ``WanVideoUnit_FunCameraControl``).

Pixel inputs are loaded with :func:`load_video_frames` / :func:`load_image` into ``[-1, 1]`` with the reference's
mapping ``x * (2/255) - 1``.  Videos are never resized silently: their frame count and size must match the request.

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
    "encode_video",
    "fun_camera_condition",
    "fun_control_condition",
    "i2v_condition",
    "i2v_mask",
    "load_image",
    "load_video_frames",
]

_RANGE_SLACK = 1e-3


# ----------------------------------------------------------------------------------------------------------- loading


def _check_positive(**values: Any) -> None:
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{key} must be a positive integer; got {v!r}")


def _check_4n1(num_frames: int, temporal_factor: int = 4) -> None:
    _check_positive(num_frames=num_frames)
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


def _read_video_file(path: str | os.PathLike, name: str) -> list[PIL.Image.Image]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no video file at {path!r}; pass an existing file, a list of PIL images or an array")
    from diffusers.utils import load_video

    return load_video(path)


def _video_to_tensor(video: Any, name: str) -> torch.Tensor:
    """Any supported video input -> float32 ``[1, 3, F, H, W]`` in [-1, 1] (no size checks)."""
    if isinstance(video, (str, os.PathLike)):
        video = _read_video_file(video, name)
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
    _check_positive(height=height, width=width)
    _check_4n1(num_frames)
    t = _video_to_tensor(video, name)
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
    _check_positive(height=height, width=width)
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


def _vae_factors(vae) -> tuple[int, int]:
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


def i2v_mask(
    num_frames: int,
    latent_height: int,
    latent_width: int,
    last_frame: bool = False,
    temporal_factor: int = 4,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The I2V / FLF2V mask ``[1, temporal_factor, T_lat, h, w]``: 1 on the given frames, 0 elsewhere.

    Per *pixel frame*: 1 for frame 0 (and the last frame when ``last_frame``), 0 otherwise; frame 0 is repeated
    ``temporal_factor`` times and groups of ``temporal_factor`` frames become the channels of one latent frame.

    Example:
        >>> i2v_mask(9, 2, 2)[0, :, :, 0, 0].tolist()
        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    """
    _check_positive(latent_height=latent_height, latent_width=latent_width, temporal_factor=temporal_factor)
    _check_4n1(num_frames, temporal_factor)
    per_frame = torch.zeros(num_frames, device=device, dtype=dtype or torch.float32)
    per_frame[0] = 1
    if last_frame:
        per_frame[-1] = 1
    per_frame = torch.cat([per_frame[:1].repeat(temporal_factor), per_frame[1:]])  # [T_lat * tf]
    mask = per_frame.view(-1, temporal_factor).transpose(0, 1)  # [tf, T_lat]
    return mask[None, :, :, None, None].expand(1, temporal_factor, mask.shape[1], latent_height,
                                               latent_width).contiguous()


def _check_image(image: torch.Tensor, name: str) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"{name} must be a tensor [1, 3, H, W] in [-1, 1] (see load_image); got {shape}")


def i2v_condition(vae, image: torch.Tensor, num_frames: int, end_image: torch.Tensor | None = None) -> torch.Tensor:
    """The I2V / FLF2V ``y``: ``cat(mask (4), VAE([image, 0, ..., 0 (, end_image)]))`` -> ``[1, 4 + z_dim, T, h, w]``.

    ``image`` / ``end_image`` are ``[1, 3, H, W]`` in [-1, 1] (:func:`load_image`).  The mask is built at the latent
    size the VAE produced (the reference hard-codes ``H/8``, which is the same for the Wan2.1 VAE).

    Example:
        >>> y = i2v_condition(vae, load_image(img, 480, 832), 81)  # doctest: +SKIP
        >>> y.shape  # doctest: +SKIP
        torch.Size([1, 20, 21, 60, 104])
    """
    _check_image(image, "image")
    tf, _ = _vae_factors(vae)
    _check_4n1(num_frames, tf)
    b, _, h, w = image.shape
    parts = [image.unsqueeze(2)]
    if end_image is not None:
        _check_image(end_image, "end_image")
        if end_image.shape != image.shape:
            raise ValueError(f"end_image has shape {tuple(end_image.shape)} but image has {tuple(image.shape)}; "
                             f"load both at the same height / width")
        if num_frames < 2:
            raise ValueError("end_image needs num_frames >= 5 (first and last frame differ); pass num_frames=5 or more")
        parts += [image.new_zeros(b, 3, num_frames - 2, h, w), end_image.to(image).unsqueeze(2)]
    else:
        parts.append(image.new_zeros(b, 3, num_frames - 1, h, w))
    latents = encode_video(vae, torch.cat(parts, dim=2))
    mask = i2v_mask(num_frames, latents.shape[-2], latents.shape[-1], last_frame=end_image is not None,
                    temporal_factor=tf, device=latents.device, dtype=latents.dtype)
    if mask.shape[2] != latents.shape[2]:
        raise ValueError(f"the VAE produced {latents.shape[2]} latent frames for {num_frames} frames, the mask has "
                         f"{mask.shape[2]}; is this a Wan VAE (temporal factor {tf})?")
    return torch.cat([mask.expand(b, -1, -1, -1, -1), latents], dim=1)


def fun_control_condition(control_latents: torch.Tensor, y_channels: int, i2v_y: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """Fun-Control ``y``: ``cat(control_latents, i2v_y[:, -y_channels:] or zeros)``, ``[1, 16 + y_channels, T, h, w]``.

    ``y_channels = in_dim - 2 * z_dim``: 16 for Wan2.1 Fun-Control (``in_dim`` 48: the image latents of
    :func:`i2v_condition` without its mask), 20 for Wan2.2 Fun-A14B-Control (``in_dim`` 52: mask + image latents).
    Without a start image (``i2v_y=None``) the image part is zeros.

    Wan2.2 quirk: DiffSynth-Studio's ``WanVideoUnit_FunControl`` keeps ``y`` only when a CLIP feature exists too, and
    the Wan2.2 A14B Fun models have no CLIP, so DiffSynth zeroes the image part even when a start image is given.
    We follow VideoX-Fun (the checkpoints' upstream) instead and keep mask + image latents whenever ``i2v_y`` is
    given; pass ``i2v_y=None`` to get DiffSynth's Wan2.2 result.

    Example:
        >>> fun_control_condition(torch.zeros(1, 16, 3, 4, 4), 20).shape
        torch.Size([1, 36, 3, 4, 4])
    """
    if not isinstance(control_latents, torch.Tensor) or control_latents.ndim != 5:
        shape = tuple(control_latents.shape) if hasattr(control_latents, "shape") else type(control_latents).__name__
        raise ValueError(f"control_latents must be a tensor [B, C, T, h, w] (see encode_video); got {shape}")
    _check_positive(y_channels=y_channels)
    b, _, t, h, w = control_latents.shape
    if i2v_y is None:
        y = control_latents.new_zeros(b, y_channels, t, h, w)
    else:
        if not isinstance(i2v_y, torch.Tensor) or i2v_y.ndim != 5 or tuple(i2v_y.shape[2:]) != (t, h, w):
            shape = tuple(i2v_y.shape) if hasattr(i2v_y, "shape") else type(i2v_y).__name__
            raise ValueError(f"i2v_y must be [B, C, {t}, {h}, {w}] like control_latents (same frames and size); "
                             f"got {shape}")
        if i2v_y.shape[1] < y_channels:
            raise ValueError(f"i2v_y has {i2v_y.shape[1]} channels, fewer than y_channels={y_channels}")
        if i2v_y.shape[0] not in (1, b):
            raise ValueError(f"i2v_y has batch {i2v_y.shape[0]} but control_latents has {b}")
        y = i2v_y[:, -y_channels:].to(control_latents).expand(b, -1, -1, -1, -1)
    return torch.cat([control_latents, y], dim=1)


def fun_camera_condition(vae, image: torch.Tensor, num_frames: int, y_channels: int) -> torch.Tensor:
    """Fun-Control-Camera ``y`` from the start image ``[1, 3, H, W]`` in [-1, 1].

    * ``y_channels == z_dim`` (16, Wan2.1 Fun-Camera, ``in_dim`` 32): zeros ``[1, 16, T, h, w]`` with latent frame 0 =
      VAE latents of the image encoded as a 1-frame video (no mask);
    * ``y_channels == z_dim + 4`` (20, Wan2.2 Fun-Camera, ``in_dim`` 36): the I2V ``y`` of :func:`i2v_condition`.

    Example:
        >>> fun_camera_condition(vae, load_image(img, 480, 832), 81, y_channels=16).shape  # doctest: +SKIP
        torch.Size([1, 16, 21, 60, 104])
    """
    _check_image(image, "image")
    z_dim = int(vae.config.z_dim)
    tf, _ = _vae_factors(vae)
    _check_4n1(num_frames, tf)
    if y_channels == z_dim + 4:
        return i2v_condition(vae, image, num_frames)
    if y_channels != z_dim:
        raise ValueError(
            f"y_channels={y_channels} is not a Fun-Camera layout: pass {z_dim} (Wan2.1 Fun-Camera, in_dim "
            f"{2 * z_dim}: image latents in frame 0) or {z_dim + 4} (Wan2.2 Fun-Camera, in_dim {2 * z_dim + 4}: "
            f"mask + image latents)"
        )
    first = encode_video(vae, image.unsqueeze(2))  # [B, z, 1, h, w]
    y = first.new_zeros(first.shape[0], z_dim, (num_frames - 1) // tf + 1, *first.shape[-2:])
    y[:, :, :1] = first
    return y
