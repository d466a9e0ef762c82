"""Camera utilities of the Wan-Fun Control-Camera models: CameraCtrl pose rows, Plücker embeddings and their packing.

A camera trajectory is a list of *CameraCtrl rows*, one per frame, of 19 numbers::

    [frame, fx, fy, cx, cy, 0, 0, w2c[0][0..3], w2c[1][0..3], w2c[2][0..3]]

``fx, fy, cx, cy`` are normalized intrinsics (fractions of the image width / height of a 1280x720 pose video) and the
last 12 numbers are the world-to-camera matrix ``[R | t]`` row-major.  The Fun-Camera models condition on a per-pixel
Plücker embedding ``(o x d, d)`` of the rays of every frame (relative to the first camera), packed four frames to a
latent frame (24 channels = 6 Plücker channels x 4 sub-frames) and fed to the DiT's ``control_adapter``.

Behaviour (including the quirks) follows DiffSynth-Studio 2.1.12 ``wan_video_camera_controller.py`` /
``WanVideoUnit_FunCameraControl``, which in turn copies CameraCtrl's ``inference.py``:

* :func:`generate_camera_coordinates` moves the camera by adding ``speed`` to row index 9 (``w2c[0][2]``, a rotation
  entry, not the x translation) for Left/Right, index 13 (``w2c[1][2]``) for Up/Down and index 18 (``w2c[2][3]``, the z
  translation) for In/Out - exactly as coded there.
* :func:`camera_plucker_embedding` does the intrinsics and relative poses in numpy (float64, cast to float32) and the
  rays in float32 torch, like the reference, so results agree to float32 rounding.

Example:
    >>> lat = camera_control_latents(num_frames=9, height=32, width=32, direction="Left")
    >>> tuple(lat.shape)
    (1, 24, 3, 32, 32)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = [
    "CAMERA_DIRECTIONS",
    "DEFAULT_CAMERA_ORIGIN",
    "DEFAULT_CAMERA_SPEED",
    "camera_control_latents",
    "camera_plucker_embedding",
    "generate_camera_coordinates",
    "pack_camera_latents",
]

CAMERA_DIRECTIONS: tuple[str, ...] = ("Left", "Right", "Up", "Down", "LeftUp", "LeftDown", "RightUp", "RightDown",
                                      "In", "Out")
"""Directions accepted by :func:`generate_camera_coordinates` (the reference's ``camera_control_direction``)."""

DEFAULT_CAMERA_ORIGIN: tuple[float, ...] = (
    0.0, 0.532139961, 0.946026558, 0.5, 0.5, 0.0, 0.0,
    1.0, 0.0, 0.0, 0.0,
    0.0, 1.0, 0.0, 0.0,
    0.0, 0.0, 1.0, 0.0,
)
"""The CameraCtrl row the reference starts every generated trajectory from (identity pose, 1280x720 intrinsics)."""

DEFAULT_CAMERA_SPEED: float = 1 / 54
"""Per-frame step of :func:`generate_camera_coordinates` (the reference's ``camera_control_speed`` default)."""

_ROW_LEN = 19
# (substring of the direction, row index, sign) in the reference's order of application.
_MOVES = (("Left", 9, 1.0), ("Right", 9, -1.0), ("Up", 13, 1.0), ("Down", 13, -1.0), ("In", 18, -1.0),
          ("Out", 18, 1.0))


def _check_origin(origin: Sequence[float] | None) -> list[float]:
    if origin is None:
        return [float(v) for v in DEFAULT_CAMERA_ORIGIN]
    try:
        row = [float(v) for v in origin]
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"origin must be a sequence of {_ROW_LEN} numbers (a CameraCtrl row: frame, fx, fy, cx, cy, 0, 0, "
            f"w2c 3x4 row-major); got {origin!r}"
        ) from e
    if len(row) != _ROW_LEN:
        raise ValueError(
            f"origin must have {_ROW_LEN} numbers (a CameraCtrl row: frame, fx, fy, cx, cy, 0, 0, w2c 3x4 row-major) "
            f"but has {len(row)}; e.g. pass DEFAULT_CAMERA_ORIGIN or leave origin=None"
        )
    return row


def _check_frames(num_frames: int, name: str = "num_frames") -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"{name} must be a positive integer; got {num_frames!r}")
    return int(num_frames)


def generate_camera_coordinates(
    direction: str,
    num_frames: int,
    speed: float = DEFAULT_CAMERA_SPEED,
    origin: Sequence[float] | None = None,
) -> list[list[float]]:
    """CameraCtrl rows of a camera moving in ``direction`` by ``speed`` per frame, starting at ``origin``.

    Row ``i`` is row ``i-1`` with ``speed`` added to (Left / Up / Out) or subtracted from (Right / Down / In) entry 9
    (Left/Right), 13 (Up/Down) or 18 (In/Out); diagonal directions move both.  This is the reference's accumulation
    (repeated additions), so the values equal the reference's bit for bit.

    Args:
        direction: one of :data:`CAMERA_DIRECTIONS` (case-sensitive).
        num_frames: number of rows to return (the video's frame count).
        speed: step per frame (:data:`DEFAULT_CAMERA_SPEED` = 1/54).
        origin: first row, 19 numbers (:data:`DEFAULT_CAMERA_ORIGIN` when ``None``).

    Returns:
        ``num_frames`` lists of 19 floats.

    Example:
        >>> rows = generate_camera_coordinates("Left", 3, speed=0.5)
        >>> [r[9] for r in rows]
        [0.0, 0.5, 1.0]
    """
    if not isinstance(direction, str) or direction not in CAMERA_DIRECTIONS:
        raise ValueError(f"unknown camera direction {direction!r}; pass one of {', '.join(CAMERA_DIRECTIONS)}")
    num_frames = _check_frames(num_frames)
    try:
        speed = float(speed)
    except (TypeError, ValueError) as e:
        raise ValueError(f"speed must be a number (default 1/54); got {speed!r}") from e
    rows = [_check_origin(origin)]
    while len(rows) < num_frames:
        row = list(rows[-1])
        for key, index, sign in _MOVES:
            if key in direction:
                if sign > 0:
                    row[index] += speed
                else:
                    row[index] -= speed
        rows.append(row)
    return rows


def _as_pose_array(poses) -> np.ndarray:
    if isinstance(poses, torch.Tensor):
        poses = poses.detach().cpu().double().numpy()
    try:
        arr = np.asarray(poses, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"poses must be a list of {_ROW_LEN}-number CameraCtrl rows or an array [F, {_ROW_LEN}]; "
                         f"could not read {type(poses).__name__} as numbers") from e
    if arr.ndim != 2 or arr.shape[1] != _ROW_LEN or arr.shape[0] < 1:
        raise ValueError(
            f"poses must be [F, {_ROW_LEN}] (one CameraCtrl row per frame: frame, fx, fy, cx, cy, 0, 0, w2c 3x4 "
            f"row-major); got shape {tuple(arr.shape)}"
        )
    return arr


def camera_plucker_embedding(
    poses,
    height: int,
    width: int,
    original_pose_width: int = 1280,
    original_pose_height: int = 720,
) -> torch.Tensor:
    """Per-pixel Plücker embedding ``(o x d, d)`` of every frame's camera rays, relative to the first camera.

    Steps (as the reference ``process_pose_file`` / ``get_relative_pose`` / ``ray_condition``):

    1. aspect correction: poses are for a ``original_pose_width x original_pose_height`` video; if that is wider than
       ``width / height`` then ``fx *= height * (W0/H0) / width`` else ``fy *= width / (W0/H0) / height``;
    2. ``K = [fx*width, fy*height, cx*width, cy*height]``;
    3. ``c2w_i`` relative to the first camera: ``w2c_0 @ inv(w2c_i)`` (first = identity);
    4. rays through pixel centres ``(u+0.5, v+0.5)``: ``d = normalize((u-cx)/fx, (v-cy)/fy, 1) @ R^T``, ``o = t``.

    Args:
        poses: ``F`` CameraCtrl rows of 19 numbers (list, numpy array or tensor ``[F, 19]``).
        height, width: size of the video in pixels.
        original_pose_width, original_pose_height: the size the intrinsics were recorded at.

    Returns:
        float32 tensor ``[F, height, width, 6]`` (channels ``o x d`` then ``d``).

    Example:
        >>> emb = camera_plucker_embedding(generate_camera_coordinates("In", 5), 16, 16)
        >>> tuple(emb.shape), emb.dtype
        ((5, 16, 16, 6), torch.float32)
    """
    arr = _as_pose_array(poses)
    for name, v in (("height", height), ("width", width), ("original_pose_width", original_pose_width),
                    ("original_pose_height", original_pose_height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    height, width = int(height), int(width)

    fx, fy, cx, cy = (arr[:, i].copy() for i in range(1, 5))
    sample_ratio = width / height
    pose_ratio = original_pose_width / original_pose_height
    if pose_ratio > sample_ratio:
        fx = (height * pose_ratio) * fx / width
    else:
        fy = (width / pose_ratio) * fy / height
    intrinsics = np.stack([fx * width, fy * height, cx * width, cy * height], axis=-1).astype(np.float32)

    w2c = np.tile(np.eye(4), (arr.shape[0], 1, 1))
    w2c[:, :3, :] = arr[:, 7:].reshape(-1, 3, 4)
    try:
        c2w = np.linalg.inv(w2c)
    except np.linalg.LinAlgError as e:
        raise ValueError("a camera pose has a singular world-to-camera matrix (entries 7..18 of its row)") from e
    relative = np.concatenate([np.eye(4)[None], w2c[0] @ c2w[1:]], axis=0).astype(np.float32)

    k = torch.from_numpy(intrinsics)  # [F, 4]
    rel = torch.from_numpy(relative)  # [F, 4, 4]
    v, u = torch.meshgrid(torch.linspace(0, height - 1, height, dtype=torch.float32),
                          torch.linspace(0, width - 1, width, dtype=torch.float32), indexing="ij")
    u = u.reshape(1, -1) + 0.5  # [1, HW]
    v = v.reshape(1, -1) + 0.5
    kfx, kfy, kcx, kcy = (k[:, i: i + 1] for i in range(4))  # [F, 1]
    ones = torch.ones_like(u)
    xs = (u - kcx) / kfx * ones
    ys = (v - kcy) / kfy * ones
    zs = ones.expand_as(ys)
    dirs = torch.stack((xs, ys, zs), dim=-1)  # [F, HW, 3]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    rays_d = dirs @ rel[:, :3, :3].transpose(-1, -2)  # [F, HW, 3]
    rays_o = rel[:, None, :3, 3].expand_as(rays_d)
    plucker = torch.cat([torch.linalg.cross(rays_o, rays_d, dim=-1), rays_d], dim=-1)
    return plucker.reshape(arr.shape[0], height, width, 6).contiguous()


def pack_camera_latents(plucker: torch.Tensor, temporal_factor: int = 4) -> torch.Tensor:
    """Pack a per-frame camera map ``[F, H, W, C]`` into latent frames: ``[1, C*temporal_factor, T_lat, H, W]``.

    Frame 0 is repeated ``temporal_factor`` times (the VAE's first latent frame covers one frame), then every group
    of ``temporal_factor`` frames becomes one latent frame with channel index ``c * temporal_factor + k``
    (``c`` = Plücker channel, ``k`` = sub-frame).  ``T_lat = (F - 1) // temporal_factor + 1``.

    Example:
        >>> pack_camera_latents(torch.zeros(9, 32, 32, 6)).shape
        torch.Size([1, 24, 3, 32, 32])
    """
    if not isinstance(plucker, torch.Tensor) or plucker.ndim != 4:
        shape = tuple(plucker.shape) if hasattr(plucker, "shape") else type(plucker).__name__
        raise ValueError(f"plucker must be a tensor [F, H, W, C] (e.g. from camera_plucker_embedding); got {shape}")
    tf = int(temporal_factor)
    if tf < 1:
        raise ValueError(f"temporal_factor must be a positive integer; got {temporal_factor!r}")
    f, h, w, c = plucker.shape
    if (f - 1) % tf:
        lo = max(1, (f - 1) // tf * tf + 1)
        raise ValueError(
            f"the camera map has {f} frames, which is not {tf}n+1 (the VAE packs 1 + {tf}n frames); "
            f"pass {lo} or {lo + tf} frames (num_frames must be {tf}n+1)"
        )
    video = plucker.permute(3, 0, 1, 2)  # [C, F, H, W]
    video = torch.cat([video[:, :1].expand(c, tf, h, w), video[:, 1:]], dim=1)  # [C, F + tf - 1, H, W]
    t_lat = video.shape[1] // tf
    # [C, T, k, H, W] -> [C, k, T, H, W] -> channel c*tf + k
    packed = video.reshape(c, t_lat, tf, h, w).transpose(1, 2).reshape(c * tf, t_lat, h, w)
    return packed.unsqueeze(0).contiguous()


def camera_control_latents(
    num_frames: int,
    height: int,
    width: int,
    direction: str | None = None,
    speed: float = DEFAULT_CAMERA_SPEED,
    origin: Sequence[float] | None = None,
    poses=None,
) -> torch.Tensor:
    """The packed camera input of the Fun-Camera DiT (``control_camera_latents_input``): ``[1, 24, T_lat, H, W]``.

    Give exactly one of ``direction`` (with optional ``speed`` / ``origin``, see :func:`generate_camera_coordinates`)
    or ``poses`` (explicit per-frame CameraCtrl rows, ``num_frames`` of them).

    Example:
        >>> a = camera_control_latents(5, 16, 16, direction="Right")
        >>> b = camera_control_latents(5, 16, 16, poses=generate_camera_coordinates("Right", 5))
        >>> torch.equal(a, b)
        True
    """
    num_frames = _check_frames(num_frames)
    if (num_frames - 1) % 4:
        lo = (num_frames - 1) // 4 * 4 + 1
        raise ValueError(
            f"num_frames={num_frames} is not 4n+1 (the Wan VAE encodes 1 + 4n frames); pass {lo} or {lo + 4}"
        )
    if (direction is None) == (poses is None):
        raise ValueError(
            "pass exactly one of direction= (one of " + ", ".join(CAMERA_DIRECTIONS) + ") or poses= (explicit "
            f"per-frame CameraCtrl rows); got {'both' if direction is not None else 'neither'}"
        )
    if poses is not None:
        if origin is not None:
            raise ValueError(
                "origin= only applies with direction=; with explicit poses= put the start pose in poses[0]"
            )
        arr = _as_pose_array(poses)
        if arr.shape[0] != num_frames:
            raise ValueError(
                f"poses has {arr.shape[0]} rows but num_frames={num_frames}: pass one CameraCtrl row per frame "
                f"(or num_frames={arr.shape[0]})"
            )
        rows = arr
    else:
        rows = generate_camera_coordinates(direction, num_frames, speed, origin)
    return pack_camera_latents(camera_plucker_embedding(rows, height, width))
