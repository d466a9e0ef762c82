"""Reading original checkpoints and writing output folders safely.

Original Wan releases ship DiT weights as (sharded) safetensors and the VAE / umT5 / CLIP weights as raw
``torch.save`` state dicts (``.pth``).  Everything here reads both, validates what it reads and reports problems with
the file and key names involved, so that a half-downloaded shard or a wrong file gives a readable error instead of a
stack trace from deep inside ``torch``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .fp8_files import comfy_fp8_tensors, is_fp8_file
from .quantized_tensor import QuantizedFileError
from .single_file import dequantize_state_dict, load_single_file

__all__ = [
    "ConversionError",
    "check_regular_file",
    "check_weights_file",
    "load_state_dict",
    "load_state_dict_files",
    "naming",
    "raise_for_key_problems",
    "raise_for_non_finite",
    "read_json",
    "safetensors_keys",
    "safetensors_shapes",
    "strip_known_prefixes",
    "with_path",
]


class ConversionError(ValueError):
    """Raised for any checkpoint that cannot be converted; the message names the file and keys involved."""


def format_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return shown + more


def raise_for_key_problems(
    what: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (), wrong_shapes: Iterable[str] = ()
) -> None:
    """Raise one :class:`ConversionError` naming every missing / unexpected / mis-shaped key (none: no error)."""
    missing, unexpected, wrong_shapes = list(missing), list(unexpected), list(wrong_shapes)
    problems = []
    if missing:
        problems.append(f"missing keys {format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {format_keys(unexpected)}")
    if wrong_shapes:
        problems.append(f"shape mismatch: {format_keys(wrong_shapes)}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (readers such as ``torch.load`` and ffmpeg raise pages of
    text), shortened to ``limit`` characters -- for error messages that must stay one line."""
    text = str(error)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") or type(error).__name__
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # terminal colours
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """A ``ValueError`` raised in the block about the content of ``path`` (keys, format) becomes a
    :class:`ConversionError` that names ``path`` (once), so the user knows which file is wrong."""
    try:
        yield
    except ValueError as e:
        msg = str(e)
        if str(path) in msg:
            raise
        raise ConversionError(f"{path}: {msg}") from e


def with_path(path: str | os.PathLike | None, fn: Callable[[], Any]) -> Any:
    """``fn()`` under :func:`naming`: the call form, for one expression (``vae = with_path(p, lambda: load(p))``)."""
    with naming(path):
        return fn()


_NOT_REGULAR = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device file"),
    (stat.S_ISBLK, "a device file"),
)


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Raise :class:`ConversionError` unless ``path`` is an existing regular file (symlinks followed).

    Only ``stat`` is called: a FIFO, a socket or a device such as ``/dev/zero`` is refused before anything opens it,
    so a reader never blocks on ``open`` or reads forever.  ``what`` names the expected file in the message.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        broken = " (a broken symbolic link)" if path.is_symlink() else ""
        raise ConversionError(f"{path}: file not found{broken}") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot be read ({e.strerror or one_line(e)})") from None
    if stat.S_ISREG(mode):
        return path
    kind = next((k for test, k in _NOT_REGULAR if test(mode)), "not a regular file")
    article = "an" if what[:1] in "aeiou" else "a"
    raise ConversionError(f"{path}: is {kind}, not {article} {what}; pass the {what} itself")


_SAFETENSORS_MAX_HEADER = 100_000_000  # the limit of the safetensors reader


def _check_safetensors_layout(path: Path, size: int) -> None:
    """Header length, header JSON and tensor extents against the file size (reads only the header)."""
    truncated = "the download may be incomplete: re-download it and compare its size with the release's"
    if size < 8:
        raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, shorter than the 8-byte header "
                              f"length); {truncated}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _SAFETENSORS_MAX_HEADER:
            raise ConversionError(f"{path}: not a safetensors file (its first 8 bytes are not a header length)")
        if 8 + n > size:
            raise ConversionError(f"{path}: truncated safetensors file: its header needs {8 + n} bytes but the file "
                                  f"has {size}; {truncated}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConversionError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (its header is not a JSON object)")
    ends = {k: v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets") or ()) == 2}
    need = 8 + n + max(ends.values(), default=0)
    if need > size:
        cut = min((k for k, e in ends.items() if 8 + n + e > size), key=ends.get)  # the first tensor cut off
        raise ConversionError(f"{path}: truncated safetensors file: tensor {cut} runs past the end; its header "
                              f"describes {need} bytes but the file has {size} ({need - size} missing); {truncated}")


def _check_torch_layout(path: Path) -> None:
    """A ``torch.save`` file is a zip archive (new format) or a pickle (legacy format, starts with ``0x80``)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise ConversionError(f"{path}: truncated PyTorch file (a zip archive without its end record); the download "
                              "may be incomplete: re-download it")
    if not magic.startswith((b"PK", b"\x80")):
        raise ConversionError(f"{path}: not a PyTorch weights file (neither the zip archive nor the legacy pickle "
                              f"that torch.save writes; it starts with {magic!r})")


def check_weights_file(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a complete weights file without loading its tensors: a regular file (``stat`` only, so
    FIFOs and devices never block), not empty, and for ``.safetensors`` a header whose tensors fit in the file; for
    ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` a zip archive with its end record or a legacy pickle.  Raises
    :class:`ConversionError` saying what is wrong with the file; other extensions are only checked to be files."""
    path = check_regular_file(path, "weights file")
    size = path.stat().st_size
    if size == 0:
        raise ConversionError(f"{path}: empty file (0 bytes); the download may have failed: re-download it")
    if path.name.endswith(".safetensors"):
        _check_safetensors_layout(path, size)
    elif path.name.endswith((".pth", ".pt", ".bin", ".ckpt")):
        _check_torch_layout(path)
    return path


def _non_finite_counts(t: torch.Tensor, chunk: int = 1 << 24) -> tuple[int, int]:
    """``(NaN count, inf count)`` of a floating-point tensor, in chunks (float8 has no ``isnan`` on CPU: cast)."""
    flat = t.detach().reshape(-1)
    nan = inf = 0
    for i in range(0, flat.numel(), chunk):
        part = flat[i: i + chunk]
        if part.dtype.itemsize == 1:
            part = part.float()
        finite = torch.isfinite(part)
        if bool(finite.all()):
            continue
        n = int(torch.isnan(part).sum())
        nan, inf = nan + n, inf + int((~finite).sum()) - n
    return nan, inf


def raise_for_non_finite(state_dict: Mapping[str, Any], source: str) -> None:
    """Raise :class:`ConversionError` naming ``source`` and every floating-point tensor holding NaN or inf.

    A NaN or inf in any weight turns every output into NaN (a black video), so such a file is refused at load time.
    """
    bad = []
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            nan, inf = _non_finite_counts(value)
            if nan or inf:
                bad.append(f"{key} ({nan} NaN, {inf} inf of {value.numel()})")
    if bad:
        raise ConversionError(f"{source}: {len(bad)} tensor(s) hold NaN or inf values: {format_keys(bad, 6)}; the "
                              "file is corrupt or comes from a diverged training run")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed content of a JSON file (``model_index.json``, ``config.json``, ``wan_variant.json``, an index).

    Raises :class:`ConversionError` naming the file when it is not a regular file, not UTF-8 (the byte and its
    offset) or not valid JSON (line and column).
    """
    path = check_regular_file(path, what)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); a {what} "
                              "must be UTF-8: re-save it with UTF-8 encoding") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


_FORBIDDEN_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` (memory-mapped for zip archives), errors as one :class:`ConversionError`."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for corrupt pickles
        msg = str(e)
        if "Weights only load failed" in msg:
            found = _FORBIDDEN_GLOBAL.search(msg)
            what = f" (e.g. {found.group(1)})" if found else ""
            raise ConversionError(
                f"{path}: holds pickled Python objects besides tensors{what}, which torch.load(weights_only=True) "
                "refuses to run; if you trust the file, load it with weights_only=False and torch.save only its "
                "tensors (the state dict) to a new file"
            ) from None
        raise ConversionError(f"{path}: cannot be read as a PyTorch state dict ({type(e).__name__}: {one_line(e)}); "
                              "the file may be truncated or not a weights file") from None


def load_state_dict(path: str | os.PathLike, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.safetensors`` file, a sharded ``*.safetensors.index.json`` or a ``.pth``/``.pt``/``.bin``.

    The file is checked first (:func:`check_weights_file`: a FIFO, device, socket or folder is refused without
    opening it; an empty or truncated file is named as such).  ``.pth`` files are read with
    ``torch.load(weights_only=True)``; a pickled module or anything that is not a flat mapping of names to tensors is
    rejected with :class:`ConversionError`.  With ``check_finite`` (the default), a tensor holding NaN or inf is an
    error naming the file and the key (:func:`raise_for_non_finite`).

    Example:
        >>> sd = load_state_dict("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise ConversionError(f"{path}: file not found")
    name = path.name
    if name.endswith(".index.json"):
        return _load_sharded(path, check_finite)
    if not name.endswith((".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".gguf")):
        raise ConversionError(f"{path}: unsupported file type (expected .safetensors, .safetensors.index.json, .gguf "
                              "or .pth)")
    check_weights_file(path)
    if name.endswith(".gguf"):
        sd = _single_file(path, None)
    elif name.endswith(".safetensors"):
        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as e:  # corrupt in a way the header check does not see
            raise ConversionError(f"{path}: not a readable safetensors file ({one_line(e)}); the file may be corrupt: "
                                  "re-download it") from None
        if is_fp8_file(sd, _safetensors_metadata(path)):  # ComfyUI / Kijai fp8 (plain or scaled)
            sd = _single_file(path, sd)
    else:
        obj = _torch_load(path)
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ConversionError(f"{path}: expected a flat mapping of parameter names to tensors")
        sd = dict(obj)
    if check_finite:
        raise_for_non_finite(sd, str(path))
    return sd


def safetensors_keys(path: str | os.PathLike) -> list[str] | None:
    """The tensor names of a safetensors file from its header (nothing read into memory); ``None`` when it cannot be
    read (a truncated or foreign file: the caller's real loader then says why)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception:  # noqa: BLE001 - safetensors raises several kinds for unreadable files
        return None


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape of a safetensors file from its header (nothing read into memory); ``None`` when it cannot
    be read (as :func:`safetensors_keys`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # noqa: BLE001 - safetensors raises several kinds for unreadable files
        return None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _single_file(path: Path, loaded: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """A GGUF file, or the already loaded tensors of an fp8 safetensors file, dequantized
    (:mod:`diffusers_wan_ext.utils.single_file`); errors as one line naming the file and the key."""
    try:
        if loaded is None:
            return load_single_file(path)[0]
        tensors = comfy_fp8_tensors(loaded, _safetensors_metadata(path), str(path))[0]
        loaded.clear()  # the fp8 tensors now live only in `tensors`, freed one by one as they are dequantized
        return dequantize_state_dict(tensors, consume=True)
    except QuantizedFileError as e:
        raise ConversionError(str(e)) from None


def _load_sharded(index_path: Path, check_finite: bool = True) -> dict[str, torch.Tensor]:
    index = read_json(index_path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index_path}: not a valid safetensors index (needs a 'weight_map')")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_path.parent / s).exists()]
    if missing:
        raise ConversionError(f"{index_path}: shard(s) listed in the index are missing: {', '.join(missing)}")
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        sd.update(load_state_dict(index_path.parent / shard, check_finite))
    absent = set(weight_map) - set(sd)
    if absent:
        raise ConversionError(f"{index_path}: keys listed in the index are not in any shard: {format_keys(absent)}")
    return sd


def load_state_dict_files(paths: Iterable[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Load several files whose keys are disjoint and return their union (duplicate keys are an error)."""
    sd: dict[str, torch.Tensor] = {}
    for p in paths:
        part = load_state_dict(p)
        dup = set(part) & set(sd)
        if dup:
            raise ConversionError(f"{p}: keys already loaded from another file: {format_keys(dup)}")
        sd.update(part)
    return sd


# Prefixes that wrap the original key layout in various distributions (ComfyUI, krea, training frameworks).
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "module.", "_orig_mod.")


def strip_known_prefixes(sd: dict[str, torch.Tensor], anchor: str) -> dict[str, torch.Tensor]:
    """Strip a wrapper prefix (e.g. krea's ``model.``) when *every* key carries it and ``anchor`` appears beneath it."""
    for prefix in KNOWN_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd) and any(k[len(prefix):].startswith(anchor) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd
