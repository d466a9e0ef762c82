"""Input validation with messages that say what to pass."""

from __future__ import annotations

__all__ = ["validate_video_size"]


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
