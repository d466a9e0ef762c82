"""Video and image inputs of the pipelines: loading into ``[-1, 1]`` tensors, and VAE encoding to normalized latents.

Used by the Wan-Fun, Video-As-Prompt, S2V, Animate and LongCat pipelines and by training:

* :func:`load_video_frames` / :func:`load_image` -- a list of PIL images, a numpy array (uint8 0..255 or float
  0..1), a torch tensor in ``[-1, 1]`` or a file path -> float32 ``[1, 3, F, H, W]`` / ``[1, 3, H, W]`` in
  ``[-1, 1]`` with the reference's mapping ``x * (2/255) - 1``.  Videos are never resized silently: their frame
  count and size must match the request (PIL images are resized, as the references do);
* :func:`video_to_tensor` -- the same conversion without the size checks;
* :func:`read_image_file`, :func:`read_video_file`, :func:`read_audio_file` -- the file readers: a FIFO, device or
  folder is refused before it is opened, and an unreadable, truncated, empty or wrong-format file is one
  ``ValueError`` naming the file; :func:`pil_to_rgb` turns any PIL image (16-bit grayscale scaled to 8 bits,
  palette, alpha, CMYK) into 8-bit RGB;
* :func:`encode_video` -- normalized VAE latents: posterior mode, then ``(z - latents_mean) / latents_std``;
* :func:`write_video` -- frames to an H.264 file, written atomically and read back (:func:`check_video_file`);
* :func:`check_positive_ints`, :func:`check_frame_count`, :func:`vae_scale_factors` -- the shared checks.

Example:
    >>> import numpy as np
    >>> video = load_video_frames(np.zeros((5, 32, 32, 3), np.uint8), num_frames=5, height=32, width=32)
    >>> tuple(video.shape), float(video.min())
    ((1, 3, 5, 32, 32), -1.0)
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import wave
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import PIL.ImageSequence
import torch

from .atomic import atomic_write_file
from .io import ConversionError, check_regular_file, one_line

__all__ = [
    "check_frame_count",
    "check_video_file",
    "check_positive_ints",
    "encode_video",
    "load_image",
    "load_video_frames",
    "pil_to_rgb",
    "add_audio_track",
    "read_audio_file",
    "read_image_file",
    "read_video_file",
    "vae_scale_factors",
    "video_to_tensor",
    "write_video",
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
            arrays.append(np.asarray(pil_to_rgb(fr, f"{name}[{i}]"), dtype=np.uint8))
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


def existing_file(path: str | os.PathLike, name: str, kind: str, hint: str) -> str:
    """``path`` as a string if it is a regular file; else a ``ValueError`` starting with ``name`` (``stat`` only: a
    FIFO or device is refused before anything opens it)."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise ValueError(f"{name}: no {kind} file at {path!r}; {hint}")
    try:
        check_regular_file(path, f"{kind} file")
    except ConversionError as e:
        raise ValueError(f"{name}: {e}") from None
    if os.path.getsize(path) == 0:
        raise ValueError(f"{name}: {path} is an empty file (0 bytes), not {kind} data")
    return path


_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def pil_to_rgb(image: PIL.Image.Image, name: str = "image") -> PIL.Image.Image:
    """Any PIL image as 8-bit RGB: ``convert("RGB")`` as the references do (alpha is dropped, palette and CMYK
    images mapped), except that 16-bit grayscale (modes ``I;16*``, and ``I`` read as 16-bit, e.g. a 16-bit PNG) is
    scaled to 8 bits (``round(v * 255 / 65535)``) instead of clipped at 255, and a palette image with transparency
    goes through RGBA.  Float images (mode ``F``) have no standard range and are refused."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _16BIT_MODES:
        arr = np.asarray(image).astype(np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"{name}: a 32-bit integer image with values {arr.min():.0f}..{arr.max():.0f}, outside "
                             "the 16-bit range 0..65535; convert it to 8-bit RGB first")
        return PIL.Image.fromarray(np.round(arr * (255 / 65535)).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        raise ValueError(f"{name}: a 32-bit float image (mode F) has no standard pixel range; convert it to 8-bit RGB "
                         "first (e.g. scale to 0..255 and Image.fromarray(array.astype(np.uint8)))")
    if mode == "PA" or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"{name}: cannot convert a mode-{mode} image to RGB ({one_line(e)})") from None


def read_image_file(path: str | os.PathLike, name: str = "image") -> PIL.Image.Image:
    """The image file at ``path`` as an 8-bit RGB PIL image, turned upright by its EXIF orientation (as
    ``diffusers.utils.load_image``) and converted by :func:`pil_to_rgb`.

    Raises ``ValueError`` naming the file for a missing, empty, non-regular (FIFO, device, folder), unreadable,
    truncated or oversized (decompression bomb) file.
    """
    path = existing_file(path, name, "image", "pass an existing file, a PIL image or an array")
    try:
        with PIL.Image.open(path) as im:
            im.load()
            image = PIL.ImageOps.exif_transpose(im)
    except PIL.Image.DecompressionBombError as e:
        raise ValueError(f"{name}: {path} is too large to decode safely ({one_line(e)})") from None
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{name}: {path} is not an image file (PIL cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ValueError(f"{name}: {path} cannot be decoded ({one_line(e)}); the file may be truncated or "
                         "corrupt") from None
    return pil_to_rgb(image, f"{name} ({path})")


def read_video_file(
    path: str | os.PathLike, name: str, fps: float | None = None, max_frames: int | None = None
) -> list[PIL.Image.Image]:
    """The frames of the video file at ``path`` as RGB PIL images (read with imageio / ffmpeg, as
    ``diffusers.utils.load_video``; ``.gif`` with PIL); ``name`` is the argument's name in errors.

    With ``fps``, a file at another rate is subsampled every ``round(file_fps / fps)``-th frame (the S2V
    original's pose-video reading); at most ``max_frames`` frames are read.  Raises ``ValueError`` naming the file
    for a missing, empty, non-regular (FIFO, device, folder), unreadable or wrong-format file and for a file
    without frames.
    """
    path = existing_file(path, name, "video", "pass an existing file, a list of PIL images or an array")
    with open(path, "rb") as f:
        magic = f.read(8)
    still = next((kind for kind, sig in _STILL_IMAGE_MAGIC if magic.startswith(sig)), None)
    if still is not None:
        raise ValueError(f"{name}: {path} is a {still} image, not a video; pass a video file, or the image as a "
                         "one-frame list [PIL.Image.open(path)]")
    try:
        frames = _decode_video(path, fps, max_frames)
    except Exception as e:  # noqa: BLE001 - imageio / ffmpeg / PIL raise many kinds for bad files
        raise ValueError(f"{name}: cannot read {path} as a video ({ffmpeg_reason(e, 'video')})") from None
    if not frames:
        raise ValueError(f"{name}: {path} has no video frames")
    return frames


_FFMPEG_LOG_LINE = re.compile(r"^\[[^\]]*@[^\]]*\]\s*(.+?)\s*$", re.M)


def ffmpeg_reason(error: BaseException | str, stream: str) -> str:
    """What ffmpeg said about a file, in one line: its last two ``[demuxer @ 0x...] message`` log lines (imageio
    puts them after a generic first line such as "Could not load meta information"), else the first line of
    ``error``."""
    found = list(dict.fromkeys(m.group(1) for m in _FFMPEG_LOG_LINE.finditer(str(error))))
    if any("does not contain any stream" in line for line in found):
        return f"the file has no {stream} stream"
    return "; ".join(found[-2:]) if found else one_line(error)


_STILL_IMAGE_MAGIC = (("PNG", b"\x89PNG\r\n\x1a\n"), ("JPEG", b"\xff\xd8\xff"), ("BMP", b"BM"))


def _decode_video(path: str, fps: float | None, max_frames: int | None) -> list[PIL.Image.Image]:
    """RGB frames of a video file (GIFs with PIL, everything else with imageio's ffmpeg reader)."""
    if path.lower().endswith(".gif"):
        with PIL.Image.open(path) as gif:
            src_fps = 1000 / gif.info["duration"] if gif.info.get("duration") else fps
            frames = [im.convert("RGB") for im in PIL.ImageSequence.Iterator(gif)]
        return _pick_frames(frames, src_fps, fps, max_frames)
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, format="ffmpeg")
    try:
        src_fps = reader.get_meta_data().get("fps") or fps
        return _pick_frames(reader, src_fps, fps, max_frames)
    finally:
        reader.close()


def _pick_frames(frames: Any, src_fps: float | None, fps: float | None, max_frames: int | None) -> list:
    """Every ``round(src_fps / fps)``-th frame (all without ``fps``), at most ``max_frames``, as RGB PIL images."""
    step = max(1, round(float(src_fps) / fps)) if fps and src_fps else 1
    out = []
    for i, frame in enumerate(frames):
        if i % step:
            continue
        out.append(frame if isinstance(frame, PIL.Image.Image) else PIL.Image.fromarray(frame).convert("RGB"))
        if max_frames is not None and len(out) >= max_frames:
            break
    return out


_WAV_EXTS = (".wav", ".wave")


def _read_wav_stdlib(path: str) -> tuple[np.ndarray, int] | None:
    """PCM WAV via the standard library -> (mono float32 in [-1, 1], rate); ``None`` if ``wave`` cannot read it."""
    try:
        with wave.open(path, "rb") as w:
            rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, struct.error):
        return None
    if channels < 1 or len(raw) % (channels * width):
        return None
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / (1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    else:
        return None
    x = x.reshape(-1, channels).mean(axis=1) if channels > 1 else x
    return x.astype(np.float32), rate


def _decode_audio_with_ffmpeg(path: str, rate: int, name: str) -> np.ndarray:
    """Any audio (or video with sound) file -> mono float32 at ``rate`` via the ffmpeg of imageio-ffmpeg, as
    ``librosa.load(path, sr=rate)`` (the references' loader): channels averaged, SoX resampler at 20 bits."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ValueError(
            f"{name}: reading {path} needs ffmpeg (pip install imageio-ffmpeg), or pass a 16-bit PCM .wav at {rate} "
            "Hz or a numpy array of samples"
        ) from None
    # every channel, resampled by SoX's resampler at 20 bits (librosa.load's default soxr_hq; ffmpeg's own swr where
    # this ffmpeg lacks libsoxr), as a float WAV whose header gives the channel count; the channels are averaged
    # here, as librosa.load(mono=True) does (ffmpeg's -ac 1 downmix has another gain)
    proc = None
    for resampler in (f"aresample={rate}:resampler=soxr:precision=20", f"aresample={rate}"):
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", path, "-vn", "-map_metadata", "-1",
               "-af", resampler, "-f", "wav", "-acodec", "pcm_f32le", "-"]
        proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL)
        if proc.returncode == 0:
            break
    if proc.returncode != 0:
        detail = ffmpeg_reason(proc.stderr.decode(errors="replace"), "audio") if proc.stderr.strip() else "no output"
        raise ValueError(f"{name}: cannot decode audio from {path} (ffmpeg: {detail})")
    channels, data = _float_wav_stream(proc.stdout)
    if channels is None:
        raise ValueError(f"{name}: cannot decode audio from {path} (ffmpeg wrote no WAV stream)")
    x = np.frombuffer(data[: len(data) // (4 * channels) * 4 * channels], "<f4").astype(np.float32)
    return x.reshape(-1, channels).mean(axis=1) if channels > 1 else x


def _float_wav_stream(raw: bytes) -> tuple[int | None, bytes]:
    """(channel count, sample bytes) of a streamed RIFF WAV (chunk sizes may be unset); ``(None, b"")`` if not one."""
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        return None, b""
    pos, channels = 12, None
    while pos + 8 <= len(raw):
        chunk, size = raw[pos:pos + 4], struct.unpack("<I", raw[pos + 4:pos + 8])[0]
        if chunk == b"fmt ":
            channels = struct.unpack("<H", raw[pos + 10:pos + 12])[0]
        elif chunk == b"data":
            return (channels or None), raw[pos + 8:]
        pos += 8 + size + (size & 1)
    return None, b""


def read_audio_file(path: str | os.PathLike, rate: int, name: str = "audio") -> np.ndarray:
    """The audio file at ``path`` as mono float32 samples in [-1, 1] at ``rate`` Hz.

    PCM ``.wav`` at ``rate`` is read with the standard library; other formats and rates are decoded and resampled
    with ffmpeg (imageio-ffmpeg).  Raises ``ValueError`` naming the file for a missing, empty, non-regular (FIFO,
    device, folder) or undecodable file and for a file without audio samples.
    """
    path = existing_file(path, name, "audio", "pass an existing file or a numpy array of samples")
    read = _read_wav_stdlib(path) if path.lower().endswith(_WAV_EXTS) else None
    x = read[0] if read is not None and read[1] == rate else _decode_audio_with_ffmpeg(path, rate, name)
    if x.size == 0:
        raise ValueError(f"{name}: {path} contains no audio samples")
    return x


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
    if isinstance(video, (str, os.PathLike)):
        name = f"{name} ({os.fspath(video)})"  # the size errors name the file
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

    PIL images (and image file paths, read by :func:`read_image_file`: EXIF orientation applied) are resized with
    ``image.convert("RGB").resize((width, height))`` like the reference (:func:`pil_to_rgb`: 16-bit grayscale is
    scaled to 8 bits, not clipped); numpy ``[H, W, 3]`` (uint8 0..255 or float 0..1) and torch ``[3, H, W]`` / ``[1, 3, H, W]`` (float in
    [-1, 1]) inputs must already be ``height x width``.

    Example:
        >>> from PIL import Image
        >>> load_image(Image.new("RGB", (8, 8), (255, 255, 255)), 16, 32).shape
        torch.Size([1, 3, 16, 32])
    """
    check_positive_ints(height=height, width=width)
    if isinstance(image, (str, os.PathLike)):
        image = read_image_file(image, name)
    if isinstance(image, PIL.Image.Image):
        arr = np.array(pil_to_rgb(image, name).resize((width, height)), dtype=np.uint8)
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


# ----------------------------------------------------------------------------------------------------------- writing
#: ffmpeg's muxer of a video file suffix where the two names differ (other suffixes name their muxer)
_MUXERS = {"": "mp4", ".mkv": "matroska"}


def _uint8_frames(frames: Any, path: Path) -> list[np.ndarray]:
    """The frames to write as uint8 arrays (floats in [0, 1] scaled); ``ValueError`` for NaN / inf, no frames or an
    odd size."""
    arrs = []
    for i, f in enumerate(frames):
        a = np.asarray(f)
        if a.dtype != np.uint8:
            if not np.isfinite(a).all():
                raise ValueError(f"frame {i} of the video for {path} has NaN / inf values (numerical overflow, e.g. "
                                 "in fp16); nothing was written")
            a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
        arrs.append(a)
    if not arrs:
        raise ValueError(f"no frames to write to {path}")
    if arrs[0].shape[0] % 2 or arrs[0].shape[1] % 2:
        raise ValueError(f"frames of {arrs[0].shape[1]}x{arrs[0].shape[0]} cannot be written to {path}: H.264 needs an "
                         "even width and height")
    return arrs


def write_video(frames: Any, path: str | os.PathLike, fps: int = 16) -> Path:
    """Write frames (list of PIL images, or a float array [F, H, W, 3] in [0, 1]) to an H.264 mp4 via imageio-ffmpeg.

    The file is written through :func:`~diffusers_wan_ext.utils.atomic.atomic_write_file` (a temporary file next to
    ``path``, read back -- it must decode to as many frames as were given -- and only then moved onto ``path``), so a
    full disk or a failing encoder never leaves a truncated video -- or replaces a good one.  An existing file at
    ``path`` is replaced.  Raises :class:`~diffusers_wan_ext.utils.io.ConversionError` naming the file when writing or
    the check fails, and ``ValueError`` for frames with NaN / inf values (a black video would hide them).
    """
    import imageio.v2 as imageio

    path = Path(path)
    arrs = _uint8_frames(frames, path)
    if path.is_dir():
        raise ConversionError(f"could not write the video {path}: it is a folder; pass a file name")
    suffix = path.suffix.lower()

    def encode(tmp: Path) -> None:
        # the temporary name has no video suffix: the container is named to imageio and ffmpeg
        with imageio.get_writer(str(tmp), format=suffix or ".mp4", fps=fps, codec="libx264", quality=8,
                                macro_block_size=1, ffmpeg_log_level="error",
                                output_params=["-f", _MUXERS.get(suffix, suffix[1:])]) as w:
            for a in arrs:
                w.append_data(a)
        check_video_file(tmp, len(arrs), name=path)

    try:
        atomic_write_file(path, encode, overwrite=True)
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 -- ffmpeg / OS errors of many kinds; the message names the file
        raise ConversionError(f"could not write the video {path}: {type(e).__name__}: {e}") from e
    return path


def check_video_file(path: str | os.PathLike, num_frames: int, name: str | os.PathLike | None = None) -> None:
    """``ConversionError`` unless ``path`` exists, is not empty and decodes (imageio-ffmpeg) to ``num_frames``
    frames; messages name ``name`` (default: ``path``)."""
    import imageio_ffmpeg

    path, name = Path(path), name or path
    if not path.is_file() or path.stat().st_size == 0:
        raise ConversionError(f"writing the video {name} failed: the file is missing or empty (disk full?)")
    try:
        found, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except Exception as e:  # noqa: BLE001 -- ffmpeg reports unreadable files in several ways
        raise ConversionError(f"writing the video {name} failed: it cannot be read back ({e})") from None
    if found != num_frames:
        raise ConversionError(f"writing the video {name} failed: it has {found} frames, {num_frames} were written "
                              "(disk full?)")


def add_audio_track(video_path: str | os.PathLike, audio: Any, sample_rate: int) -> Path:
    """Mux a mono waveform (float samples in [-1, 1], e.g. MOVA's generated sound track) into the video file at
    ``video_path`` as AAC, the video stream copied, replacing the file atomically.  Raises ``ValueError`` for empty
    or non-finite samples and :class:`~diffusers_wan_ext.utils.io.ConversionError` naming the file when ffmpeg fails.
    """
    import imageio_ffmpeg

    path = Path(video_path)
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    if samples.size == 0 or not np.isfinite(samples).all():
        raise ValueError(f"audio for {path}: the waveform is empty or has NaN / inf samples")
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")

    def mux(tmp: Path) -> None:
        wav_path = tmp.with_name(tmp.name + ".wav")
        try:
            with wave.open(str(wav_path), "wb") as f:
                f.setnchannels(1)
                f.setsampwidth(2)
                f.setframerate(int(sample_rate))
                f.writeframes(pcm.tobytes())
            cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-v", "error", "-i", str(path), "-i",
                   str(wav_path), "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-f",
                   _MUXERS.get(path.suffix.lower(), path.suffix.lower()[1:]), str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise ConversionError(f"could not add the audio track to {path}: "
                                      f"{ffmpeg_reason(proc.stderr.decode(errors='replace'), 'audio')}")
        finally:
            wav_path.unlink(missing_ok=True)

    return atomic_write_file(path, mux, overwrite=True)
