"""Input validation with messages that say what to pass."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["VIDEO_SUFFIXES", "check_input_file", "check_output_file", "validate_video_size"]

#: containers the H.264 writer (:func:`diffusers_wan_ext.utils.media.write_video`) produces
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")


def validate_video_size(
    height: int, width: int, num_frames: int, spatial_factor: int = 8, temporal_factor: int = 4, patch: int = 2
) -> None:
    """Raise ``ValueError`` unless ``num_frames = temporal_factor*n + 1`` and the size is a multiple of
    ``spatial_factor * patch`` (16 for the Wan2.1 VAE, 32 for the Wan2.2 VAE).

    Stock Diffusers rounds a bad frame count with a warning; our entry points refuse it instead, because the video
    the user gets would silently have another length.

    Example:
        >>> validate_video_size(480, 832, 81)
        >>> validate_video_size(480, 832, 80)
        Traceback (most recent call last):
        ...
        ValueError: num_frames=80 is not 4n+1 (the Wan VAE encodes 1 + 4n frames); pass 77 or 81
    """
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        lo = max(1, (num_frames - 1) // temporal_factor * temporal_factor + 1)
        raise ValueError(
            f"num_frames={num_frames} is not {temporal_factor}n+1 (the Wan VAE encodes 1 + {temporal_factor}n frames);"
            f" pass {lo} or {lo + temporal_factor}"
        )
    mult = spatial_factor * patch
    bad = [f"{name}={v}" for name, v in (("height", height), ("width", width)) if v <= 0 or v % mult]
    if bad:
        fix = ", ".join(f"{n.split('=')[0]}={max(mult, round(int(n.split('=')[1]) / mult) * mult)}" for n in bad)
        raise ValueError(
            f"{' and '.join(bad)} must be a multiple of {mult} (VAE factor {spatial_factor} x patch {patch}); "
            f"pass e.g. {fix}"
        )


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path` if it is a readable file, else ``ValueError`` naming ``what`` (the
    option, e.g. ``"--image"``) and the path.

    Example:
        >>> check_input_file("/nonexistent.png", "--image")
        Traceback (most recent call last):
        ...
        ValueError: --image: /nonexistent.png does not exist
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what}: {p} does not exist")
    if not p.is_file():
        raise ValueError(f"{what}: {p} is not a file")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{what}: {p} is not readable (permissions)")
    return p


def check_output_file(
    path: str | os.PathLike, overwrite: bool = False, what: str = "--output", suffixes: tuple[str, ...] = VIDEO_SUFFIXES
) -> Path:
    """Make sure a file can be written at ``path`` before any work is done; returns the path.

    Refuses an existing file unless ``overwrite``, a folder at ``path`` and another suffix than ``suffixes``;
    creates the parent folder and test-writes a temporary file in it, so a read-only or missing-permission folder is
    a ``ValueError`` naming ``what`` now rather than a lost result after the work.
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what}: {p} is a folder; pass a file path")
    if suffixes and p.suffix.lower() not in suffixes:
        raise ValueError(f"{what}: {p} must end in {' / '.join(suffixes)}")
    if p.exists() and not overwrite:
        raise ValueError(f"{what}: {p} exists; pass --overwrite to replace it")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p.parent, prefix=f".{p.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise ValueError(f"{what}: cannot write to the folder {p.parent} ({e.strerror or e})") from None
    return p
