"""Training data: DiffSynth-Studio's metadata layout, read row by row with errors that name the row.

A dataset is a folder (``--dataset_base_path``) and a metadata file (``--dataset_metadata_path``: ``.csv``,
``.json`` -- a list of objects -- or ``.jsonl``) with one row per clip: a ``video`` column (a video file, or an image
file, which is a one-frame video), a ``prompt`` column and the columns of the extra inputs
(:data:`EXTRA_INPUTS`: ``input_image``, ``end_image`` and the columns the families declare, e.g. ``control_video``).  File
columns (``--data_file_keys``) are paths relative to the base path.

Frames are read from the start of the video (``--num_frames``, ``4n + 1``) and resized as the reference does
(``ImageCropAndResize``): scaled to cover the target size (bilinear), then center-cropped.  The size is fixed
(``--height`` / ``--width``) or, without them, per clip: the first frame scaled down to at most ``--max_pixels``
pixels and floored to a multiple of the model's spatial factor (16 for the Wan2.1 VAE, 32 for the Wan2.2 VAE).

A family may declare a training frame rate (MOVA: 24 fps, DiffSynth-Studio's ``fix_frame_rate``): its clips are then
resampled in time when read -- frame ``i`` is the source frame nearest to ``i / rate`` seconds, and a clip has
``floor(duration * rate)`` frames -- and its own column declarations (MOVA's ``input_audio`` at 48 kHz) replace the
shared ones.

A clip shorter than ``--num_frames`` is an error unless ``--min_num_frames`` allows it; it is then cut to the
largest ``4n + 1`` frame count it has (DiffSynth-Studio always does this: ``--min_num_frames 1``).  Control videos
must have at least as many frames as the clip and are cut to its length.

Bad rows (missing column, missing file, unreadable file, too few frames) raise :class:`DatasetRowError` naming the
metadata file, the row and the column.  With ``skip_bad_rows`` they are skipped and counted instead: rows whose
columns or files are missing are dropped up front; a row that fails while loading is replaced by the next good row
(deterministically, so resumed runs and all ranks of a multi-GPU run stay in step) and reported.

Example:
    >>> ds = VideoDataset("data", "data/metadata.csv", num_frames=9, height=32, width=32)  # doctest: +SKIP
    >>> sample = ds[0]  # doctest: +SKIP
    >>> sample["video"].shape, sample["prompt"]  # doctest: +SKIP
    (torch.Size([9, 32, 32, 3]), 'a red ball')
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import PIL.Image
import torch

from ..families import FAMILIES, ExtraInput
from ..utils.media import read_audio_file

__all__ = [
    "AUDIO_SAMPLE_RATE",
    "EXTRA_INPUTS",
    "DatasetRowError",
    "ExtraInput",
    "ResumableSampler",
    "VideoDataset",
    "crop_and_resize",
    "dynamic_size",
    "read_metadata",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: Default rate of ``"audio"`` columns (the Wav2Vec2 feature extractor's, as DiffSynth-Studio's
#: ``LoadAudio(sr=16000)``); a family declares its own (:attr:`ExtraInput.sample_rate`).
AUDIO_SAMPLE_RATE = ExtraInput("audio").sample_rate
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".wmv", ".mkv", ".flv", ".webm", ".gif")




def _declared_columns() -> dict[str, ExtraInput]:
    """The columns the families declare; a name several declare (``input_audio``: Wan2.2-S2V, MOVA) is read as the
    first in the registry declares it, unless the trained model's family reads it otherwise (``column_specs``)."""
    out: dict[str, ExtraInput] = {}
    for family in FAMILIES:
        for name, spec in family.dataset_inputs.items():
            out.setdefault(name, spec)
    return out


#: The extra inputs the trainer knows (DiffSynth-Studio names), and where they come from: the shared ones, then
#: the columns each family declares (:attr:`~diffusers_wan_ext.families.ModelFamily.dataset_inputs`).
EXTRA_INPUTS: dict[str, ExtraInput] = {
    "input_image": ExtraInput("frame", 0),
    "end_image": ExtraInput("frame", -1),
    **_declared_columns(),
}


class DatasetRowError(ValueError):
    """A metadata row that cannot be used; the message names the file, the row and the column."""


# ---------------------------------------------------------------------------------------------------------- metadata


@dataclass
class MetadataRow:
    index: int  # 0-based position in the metadata
    label: str  # "metadata.csv row 3 (line 5)"
    values: dict[str, Any]


def _metadata_text(path: Path) -> str:
    """The metadata file as text; bytes that are not UTF-8 are an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:start].count(b"\n") + 1
        where = f"{path.name} row {line - 2} (line {line})" if path.suffix.lower() == ".csv" and line > 1 else \
            f"{path.name} line {line}"
        raise DatasetRowError(f"{where}: not UTF-8 text (byte 0x{data[start]:02x}); save {path} as UTF-8") from e


def _jsonl_rows(name: str, text: str) -> list[MetadataRow]:
    rows: list[MetadataRow] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetRowError(f"{name} row {len(rows)} (line {line_no}): not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise DatasetRowError(f"{name} row {len(rows)} (line {line_no}): expected a JSON object, got "
                                  f"{type(obj).__name__}")
        rows.append(MetadataRow(len(rows), f"{name} row {len(rows)} (line {line_no})", obj))
    return rows


def _json_rows(name: str, text: str) -> list[MetadataRow]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetRowError(f"{name} line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from e
    if not isinstance(data, list):
        raise DatasetRowError(f"{name}: expected a JSON list of objects (one per clip), got {type(data).__name__}")
    rows = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DatasetRowError(f"{name} row {i}: expected a JSON object, got {type(obj).__name__}")
        rows.append(MetadataRow(i, f"{name} row {i}", obj))
    return rows


def _csv_rows(name: str, text: str) -> list[MetadataRow]:
    rows: list[MetadataRow] = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for i, rec in enumerate(reader):
            label = f"{name} row {i} (line {reader.line_num})"
            if None in rec:  # more fields than the header names
                raise DatasetRowError(f"{label}: {len(reader.fieldnames or ()) + len(rec[None])} fields, but the "
                                      f"header has {len(reader.fieldnames or ())} ({','.join(reader.fieldnames or ())})")
            rows.append(MetadataRow(i, label, {k: (v if v != "" else None) for k, v in rec.items()}))
    except csv.Error as e:
        raise DatasetRowError(f"{name} row {len(rows)} (line {reader.line_num}): malformed CSV ({e})") from e
    return rows


def read_metadata(path: str | os.PathLike) -> list[MetadataRow]:
    """Rows of a ``.csv`` / ``.json`` (list of objects) / ``.jsonl`` metadata file; empty CSV cells become ``None``.

    A file that is not UTF-8, a malformed row (bad JSON, more CSV fields than the header) or no rows is a
    :class:`DatasetRowError` naming the file and the row / line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file {path} not found; pass --dataset_metadata_path FILE (.csv/.json/.jsonl)")
    name = path.name
    text = _metadata_text(path)
    if name.endswith(".jsonl"):
        rows = _jsonl_rows(name, text)
    elif name.endswith(".json"):
        rows = _json_rows(name, text)
    else:
        rows = _csv_rows(name, text)
    if not rows:
        raise DatasetRowError(f"{name}: no rows; the metadata must list at least one clip (columns video,prompt)")
    return rows


# ------------------------------------------------------------------------------------------------------------ frames


def crop_and_resize(image: PIL.Image.Image, height: int, width: int) -> PIL.Image.Image:
    """Scale ``image`` to cover ``height x width`` (bilinear, sizes rounded) and center-crop it (the reference's
    ``ImageCropAndResize``)."""
    w, h = image.size
    scale = max(width / w, height / h)
    new_w, new_h = round(w * scale), round(h * scale)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), PIL.Image.BILINEAR)
    top, left = int(round((new_h - height) / 2.0)), int(round((new_w - width) / 2.0))
    if (new_w, new_h) != (width, height):
        image = image.crop((left, top, left + width, top + height))
    return image


def dynamic_size(width: int, height: int, max_pixels: int, multiple: int) -> tuple[int, int]:
    """``(height, width)`` for a ``width x height`` frame: scaled down to at most ``max_pixels`` pixels, then floored
    to multiples of ``multiple`` (the reference's dynamic resolution).

    Example:
        >>> dynamic_size(1920, 1080, 832 * 480, 16)
        (464, 832)
    """
    if width * height > max_pixels:
        scale = (width * height / max_pixels) ** 0.5
        height, width = int(height / scale), int(width / scale)
    return height // multiple * multiple, width // multiple * multiple


def _read_frames(path: str, max_frames: int, frame_rate: float | None = None) -> list[PIL.Image.Image]:
    """Up to ``max_frames`` RGB frames from the start of a video or gif, or ``[image]`` for an image file; with
    ``frame_rate`` a video's frames are resampled to that rate (:func:`_read_frames_at_rate`)."""
    lower = path.lower()
    if lower.endswith(IMAGE_EXTENSIONS):
        with PIL.Image.open(path) as im:
            return [im.convert("RGB")]
    if not lower.endswith(VIDEO_EXTENSIONS):
        raise ValueError(
            f"unsupported file type {Path(path).suffix!r}; videos: {', '.join(VIDEO_EXTENSIONS)}, images: "
            f"{', '.join(IMAGE_EXTENSIONS)}"
        )
    import imageio.v2 as imageio

    if frame_rate is not None and not lower.endswith(".gif"):
        return _read_frames_at_rate(path, max_frames, frame_rate)
    frames = []
    reader = imageio.get_reader(path)
    try:
        for frame in reader:
            frames.append(PIL.Image.fromarray(np.asarray(frame)[..., :3]).convert("RGB"))
            if len(frames) >= max_frames:
                break
    finally:
        reader.close()
    return frames


def _read_frames_at_rate(path: str, max_frames: int, rate: float) -> list[PIL.Image.Image]:
    """DiffSynth-Studio's ``fix_frame_rate``: ``min(max_frames, floor(duration * rate))`` frames, frame ``i`` being
    source frame ``round(i / rate * fps)`` (the last source frame when that is past the end)."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(path)
    try:
        meta = reader.get_meta_data()
        fps = float(meta["fps"])
        duration = meta.get("duration")
        if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
            duration = reader.count_frames() / fps
        wanted = [int(round(i / rate * fps)) for i in range(min(max_frames, math.floor(duration * rate)))]
        kept: dict[int, PIL.Image.Image] = {}
        last = None
        for index, frame in enumerate(reader):
            if not wanted or index > wanted[-1]:
                break
            last = frame
            if index in wanted:
                kept[index] = PIL.Image.fromarray(np.asarray(frame)[..., :3]).convert("RGB")
    finally:
        reader.close()
    if last is None:
        return []
    tail = PIL.Image.fromarray(np.asarray(last)[..., :3]).convert("RGB")
    return [kept.get(i, tail) for i in wanted]


def _largest_4n1(n: int, temporal_factor: int = 4) -> int:
    return (n - 1) // temporal_factor * temporal_factor + 1 if n >= 1 else 0


def _to_uint8(frames: Sequence[PIL.Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(f, dtype=np.uint8) for f in frames]))


# ------------------------------------------------------------------------------------------------------------ dataset


@dataclass
class SkippedRow:
    row: str
    reason: str


class VideoDataset(torch.utils.data.Dataset):
    r"""
    Clips of a DiffSynth-Studio style metadata file, as uint8 frames resized for training.

    Each item is a dict: ``row`` (metadata index), ``prompt``, ``video`` (``uint8 [F, H, W, 3]``) and one entry per
    extra input -- images ``uint8 [H, W, 3]``, videos ``uint8 [F, H, W, 3]`` (same ``F``, ``H``, ``W`` as the clip;
    ``"video_native"``: the file's own frame size; ``"video_prefix"``: ``4n + 1 <= F`` frames), audio ``float32
    [samples]`` at the column's declared rate (16 kHz unless the family declares another), numbers and strings as
    read -- plus ``skipped``: the rows replaced to produce this item (with ``skip_bad_rows``).

    Args:
        base_path: folder the file columns are relative to.
        metadata_path: ``.csv`` / ``.json`` / ``.jsonl`` metadata.
        num_frames (`int`, defaults to 81): frames read from the start of each video (``4n + 1``).
        height, width (`int`, *optional*): fixed frame size; both ``None``: dynamic size (``max_pixels``).
        max_pixels (`int`, defaults to ``1024 * 1024``): pixel budget of the dynamic size.
        size_multiple (`int`, defaults to 16): the dynamic size is floored to multiples of this (VAE factor x patch).
        min_num_frames (`int`, *optional*): shortest acceptable video (cut to ``4n + 1``); defaults to ``num_frames``.
        extra_inputs (sequence of `str`): names from :data:`EXTRA_INPUTS`.
        data_file_keys (sequence of `str`, *optional*): the file columns; defaults to ``video`` plus the file-valued
            extra inputs.
        repeat (`int`, defaults to 1): the dataset is repeated this many times per epoch.
        skip_bad_rows (`bool`, defaults to `False`): skip and count bad rows instead of raising.
        prompt_column (`str`, defaults to ``"prompt"``), video_column (`str`, defaults to ``"video"``).
        column_specs (mapping of `str` to `ExtraInput`, *optional*): the trained model's family's own column
            declarations, replacing those of :data:`EXTRA_INPUTS` (MOVA's ``input_audio`` at 48 kHz).
        frame_rate (`float`, *optional*): resample the videos to this frame rate when reading them (the family's
            :attr:`~diffusers_wan_ext.families.ModelFamily.training_frame_rate`); ``None``: frames as they are.

    Example:
        >>> ds = VideoDataset("data", "data/metadata.csv", num_frames=9,
        ...                   extra_inputs=["control_video"])  # doctest: +SKIP
    """

    def __init__(
        self,
        base_path: str | os.PathLike,
        metadata_path: str | os.PathLike,
        num_frames: int = 81,
        height: int | None = None,
        width: int | None = None,
        max_pixels: int = 1024 * 1024,
        size_multiple: int = 16,
        min_num_frames: int | None = None,
        extra_inputs: Sequence[str] = (),
        data_file_keys: Sequence[str] | None = None,
        repeat: int = 1,
        skip_bad_rows: bool = False,
        prompt_column: str = "prompt",
        video_column: str = "video",
        column_specs: Mapping[str, ExtraInput] | None = None,
        frame_rate: float | None = None,
    ) -> None:
        if num_frames < 1 or (num_frames - 1) % 4:
            lo = _largest_4n1(max(num_frames, 1))
            raise ValueError(f"num_frames={num_frames} is not 4n+1 (the Wan VAE encodes 1 + 4n frames); pass {lo} "
                             f"or {lo + 4}")
        if (height is None) != (width is None):
            raise ValueError("pass both --height and --width (fixed size) or neither (dynamic size from --max_pixels)")
        if height is not None and (height % size_multiple or width % size_multiple or height <= 0 or width <= 0):
            raise ValueError(f"height={height}, width={width} must be positive multiples of {size_multiple} "
                             f"(VAE factor x patch size)")
        if repeat < 1:
            raise ValueError(f"dataset repeat must be >= 1, got {repeat}")
        if frame_rate is not None and not (math.isfinite(frame_rate) and frame_rate > 0):
            raise ValueError(f"frame_rate must be a finite number > 0, got {frame_rate}")
        self.specs = {**EXTRA_INPUTS, **(column_specs or {})}
        self.frame_rate = frame_rate
        unknown = [n for n in extra_inputs if n not in self.specs]
        if unknown:
            raise ValueError(f"unknown extra input(s) {unknown}; known: {', '.join(EXTRA_INPUTS)}")
        self.min_num_frames = num_frames if min_num_frames is None else int(min_num_frames)
        if not 1 <= self.min_num_frames <= num_frames:
            raise ValueError(f"min_num_frames={min_num_frames} must be between 1 and num_frames={num_frames}")
        self.base_path = Path(base_path)
        self.metadata_path = Path(metadata_path)
        self.num_frames, self.height, self.width = int(num_frames), height, width
        self.max_pixels, self.size_multiple = int(max_pixels), int(size_multiple)
        self.extra_inputs = list(extra_inputs)
        self.prompt_column, self.video_column = prompt_column, video_column
        file_extras = [n for n in self.extra_inputs if self.specs[n].is_file]
        if data_file_keys is None:
            data_file_keys = [video_column, *file_extras]
        missing_keys = [k for k in [video_column, *file_extras] if k not in data_file_keys]
        if missing_keys:
            raise ValueError(f"--data_file_keys must include {missing_keys} (file columns of the clip and of the "
                             f"extra inputs); got {list(data_file_keys)}")
        self.data_file_keys = list(data_file_keys)
        self.repeat = int(repeat)
        self.skip_bad_rows = bool(skip_bad_rows)
        self.skipped: list[SkippedRow] = []

        rows = read_metadata(self.metadata_path)
        good = []
        for row in rows:
            problem = self._static_problem(row)
            if problem is None:
                good.append(row)
            elif self.skip_bad_rows:
                self.skipped.append(SkippedRow(row.label, problem))
            else:
                raise DatasetRowError(f"{row.label}: {problem}" + self._skip_hint)
        if not good:
            raise DatasetRowError(f"{self.metadata_path}: every row is bad ({len(rows)} skipped); first: "
                                  f"{self.skipped[0].row}: {self.skipped[0].reason}")
        self.rows = good
        if self.skipped:
            warnings.warn(f"skipping {len(self.skipped)} bad row(s) of {self.metadata_path.name}: "
                          + "; ".join(f"{s.row}: {s.reason}" for s in self.skipped[:5])
                          + (" ..." if len(self.skipped) > 5 else ""))

    _skip_hint = " (fix the row, or pass --skip_bad_rows to skip bad rows and count them)"

    # ---------------------------------------------------------------------------------------------------- checks
    def _columns_needed(self) -> list[str]:
        return [self.video_column, self.prompt_column] + [n for n in self.extra_inputs if self.specs[n].from_column]

    def _static_problem(self, row: MetadataRow) -> str | None:
        """Missing column / empty value / missing file (cheap, checked for every row up front)."""
        for col in self._columns_needed():
            if col not in row.values:
                return f"column {col!r} is missing (the row has {sorted(row.values)})"
            value = row.values[col]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return f"column {col!r} is empty"
        for col in self.data_file_keys:
            value = row.values.get(col)
            if value is None:
                continue
            if not isinstance(value, str):
                return f"column {col!r} must be a file path, got {value!r}"
            if not (self.base_path / value).is_file():
                return f"column {col!r}: file not found: {self.base_path / value}"
        return None

    # ---------------------------------------------------------------------------------------------------- loading
    def _frames(self, row: MetadataRow, column: str, max_frames: int) -> list[PIL.Image.Image]:
        path = self.base_path / str(row.values[column])
        try:
            frames = _read_frames(str(path), max_frames, self.frame_rate)
        except Exception as e:  # noqa: BLE001 - any decoder error is a bad row
            raise DatasetRowError(f"{row.label}: column {column!r}: cannot read {path} ({type(e).__name__}: {e})") from e
        if not frames:
            raise DatasetRowError(f"{row.label}: column {column!r}: {path} has no frames")
        return frames

    def _size_for(self, frame: PIL.Image.Image, row: MetadataRow) -> tuple[int, int]:
        if self.height is not None:
            return self.height, self.width
        h, w = dynamic_size(frame.size[0], frame.size[1], self.max_pixels, self.size_multiple)
        if h <= 0 or w <= 0:
            raise DatasetRowError(f"{row.label}: frames of {frame.size[0]}x{frame.size[1]} are smaller than "
                                  f"{self.size_multiple} pixels after resizing; use larger clips")
        return h, w

    def _frame_count(self, row: MetadataRow, got: int, is_image: bool) -> int:
        if is_image or got >= self.num_frames:
            return 1 if is_image else self.num_frames
        if got < self.min_num_frames:
            raise DatasetRowError(
                f"{row.label}: column {self.video_column!r}: {row.values[self.video_column]} has {got} frame(s), "
                f"fewer than --num_frames {self.num_frames}; pass --min_num_frames {_largest_4n1(got) or 1} to "
                f"train on shorter clips (cut to 4n+1 frames)"
            )
        return _largest_4n1(got)

    def load_row(self, row: MetadataRow) -> dict[str, Any]:
        """Load one row (raises :class:`DatasetRowError`)."""
        value = str(row.values[self.video_column])
        is_image = value.lower().endswith(IMAGE_EXTENSIONS)
        frames = self._frames(row, self.video_column, self.num_frames)
        n = self._frame_count(row, len(frames), is_image)
        height, width = self._size_for(frames[0], row)
        frames = [crop_and_resize(f, height, width) for f in frames[:n]]
        prompt = row.values[self.prompt_column]
        if not isinstance(prompt, str):
            raise DatasetRowError(f"{row.label}: column {self.prompt_column!r} must be text, got {prompt!r}")
        sample: dict[str, Any] = {"row": row.index, "label": row.label, "prompt": prompt, "video": _to_uint8(frames)}
        if self.frame_rate is not None:  # the rate the clip was resampled to (a family cuts its audio to match)
            sample["frame_rate"] = self.frame_rate
        for name in self.extra_inputs:
            spec = self.specs[name]
            if spec.kind == "frame":
                sample[name] = _to_uint8([frames[spec.frame]])[0]
            elif spec.kind == "image":
                first = self._frames(row, name, 1)[0]
                sample[name] = _to_uint8([crop_and_resize(first, height, width)])[0]
            elif spec.kind in ("video", "video_native", "video_prefix"):
                sample[name] = self._extra_video(row, name, spec.kind, n, height, width)
            elif spec.kind == "audio":
                sample[name] = self._audio(row, name, spec.sample_rate)
            elif spec.kind == "file":
                sample[name] = str(self.base_path / str(row.values[name]))
            else:
                sample[name] = self._scalar(row, name, spec.kind)
        return sample

    def _extra_video(self, row: MetadataRow, name: str, kind: str, n: int, height: int, width: int) -> torch.Tensor:
        """A video column: ``n`` frames (``"video_prefix"``: its first ``4k + 1 <= n``) resized as the clip
        (``"video_native"``: at the file's own size)."""
        extra = self._frames(row, name, n)
        if kind == "video_prefix":
            extra = extra[:_largest_4n1(len(extra))]
        elif len(extra) < n:
            raise DatasetRowError(f"{row.label}: column {name!r}: {row.values[name]} has {len(extra)} "
                                  f"frame(s) but the clip has {n}; it needs at least as many")
        if kind == "video_native":
            return _to_uint8(extra[:n])
        return _to_uint8([crop_and_resize(f, height, width) for f in extra[:n]])

    def _audio(self, row: MetadataRow, name: str, rate: int) -> torch.Tensor:
        """An audio column as mono float32 samples at ``rate`` Hz (the column's declared rate)."""
        path = self.base_path / str(row.values[name])
        try:
            samples = read_audio_file(path, rate, name=name)
        except ValueError as e:
            raise DatasetRowError(f"{row.label}: column {name!r}: {e}") from e
        return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))

    @staticmethod
    def _scalar(row: MetadataRow, name: str, kind: str) -> Any:
        value = row.values[name]
        try:
            if kind == "float":
                return float(value)
            if kind == "floats":
                parsed = json.loads(value) if isinstance(value, str) else value
                return [float(v) for v in parsed]
            return str(value)
        except (TypeError, ValueError) as e:
            what = {"float": "a number", "floats": "a JSON list of numbers", "str": "text"}[kind]
            raise DatasetRowError(f"{row.label}: column {name!r} must be {what}, got {value!r}") from e

    # ---------------------------------------------------------------------------------------------------- Dataset
    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.rows)
        start = index % n
        skipped: list[dict[str, str]] = []
        for offset in range(n):
            row = self.rows[(start + offset) % n]
            try:
                sample = self.load_row(row)
            except DatasetRowError as e:
                if not self.skip_bad_rows:
                    if self._skip_hint in str(e):
                        raise
                    raise DatasetRowError(str(e) + self._skip_hint) from e
                skipped.append({"row": row.label, "reason": str(e)})
                continue
            sample["skipped"] = skipped
            return sample
        raise DatasetRowError(f"{self.metadata_path}: no row could be loaded; first error: {skipped[0]['reason']}")


def collate_single(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch size 1, as the reference: the item itself."""
    return batch[0]


# ------------------------------------------------------------------------------------------------------------ sampler


class ResumableSampler(torch.utils.data.Sampler[int]):
    r"""
    Per-epoch shuffled indices split across ranks, resumable at any position.

    Epoch ``e`` uses the permutation of ``torch.randperm(length, generator=seed + e)`` (or ``range(length)``
    without ``shuffle``), padded by wrapping to a multiple of ``num_replicas``; rank ``r`` takes every
    ``num_replicas``-th index from ``r``.  :meth:`set_position` starts the next iteration at ``(epoch, start)``.

    Example:
        >>> s = ResumableSampler(5, shuffle=False, seed=0)
        >>> s.set_position(0, 3); list(s)
        [3, 4]
    """

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.length, self.shuffle, self.seed = int(length), bool(shuffle), int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = math.ceil(self.length / self.num_replicas) * self.num_replicas
        order = (order * math.ceil(total / max(len(order), 1)))[:total]
        return order[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.start:])

    def __len__(self) -> int:
        return math.ceil(self.length / self.num_replicas) - self.start
