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

Pixel inputs are loaded and encoded with :mod:`diffusers_wan_ext.utils.media` (:func:`load_video_frames`,
:func:`load_image`, :func:`encode_video`).

Example:
    >>> from diffusers_wan_ext.utils.media import load_image
    >>> y = i2v_condition(vae, load_image(img, 480, 832), 81)  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from ..utils.media import check_frame_count, check_positive_ints, encode_video, vae_scale_factors

__all__ = [
    "fun_camera_condition",
    "fun_control_condition",
    "i2v_condition",
    "i2v_mask",
]


# ------------------------------------------------------------------------------------------------------- conditions


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
    check_positive_ints(latent_height=latent_height, latent_width=latent_width, temporal_factor=temporal_factor)
    check_frame_count(num_frames, temporal_factor)
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
    tf, _ = vae_scale_factors(vae)
    check_frame_count(num_frames, tf)
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
    check_positive_ints(y_channels=y_channels)
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
    tf, _ = vae_scale_factors(vae)
    check_frame_count(num_frames, tf)
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
