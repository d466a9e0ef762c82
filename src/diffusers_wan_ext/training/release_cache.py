"""Keep the converted folder of a family release between training runs (``--conversion_cache_dir DIR``).

A release its family converts itself (MOVA, Wan2.2-Animate-2, Wan-Dancer, LongCat-Video, Video-As-Prompt) is
converted in full before training.  With a cache folder the result is kept in ``DIR/<key>/``, ``key`` naming the
release folder and a digest of its :func:`release_fingerprint` (the resolved release path, every file's relative
path, size and ``mtime_ns``, the conversion options that change the result, the package versions): a later run with
the same fingerprint loads that folder without converting; any change gives a new entry.

An entry is written to ``DIR/<key>.tmp-<pid>/`` and renamed to ``DIR/<key>/`` once complete, with
``cache_info.json`` (the fingerprint and the date) inside: an interrupted conversion never leaves a folder that looks
complete.  A file lock (``DIR/.<key>.lock``) lets one process convert while the other ranks of a run (accelerate,
torchrun) wait for it and then load the finished entry.

Example:
    >>> folder = cached_conversion("cache", Path("MOVA-360p"), family, ReleaseOptions(dtype="bf16"))  # doctest: +SKIP
    >>> folder  # doctest: +SKIP
    PosixPath('cache/MOVA-360p-3f2a9c0d5e7b1a44/model')
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import diffusers
from filelock import FileLock, Timeout

from ..conversion.release_io import progress_message
from ..families import ModelFamily, ReleaseOptions
from ..utils.io import ConversionError, read_json

__all__ = ["CACHE_INFO", "CACHE_OPTION", "cache_key", "cached_conversion", "check_cache_dir", "release_fingerprint"]

#: the file inside a complete cache entry: the fingerprint it was converted from and the date
CACHE_INFO = "cache_info.json"
#: bumped when the entry layout changes (older entries are then simply not found)
CACHE_FORMAT = 1
CACHE_OPTION = "--conversion_cache_dir"


def check_cache_dir(path: str | os.PathLike) -> Path:
    """``path`` as a cache folder: an existing writable folder, or one that can be created (its nearest existing
    parent is a writable folder).  Anything else is one :class:`ValueError` line naming it."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{CACHE_OPTION} {path}: is a file, not a folder; pass a folder for the converted releases")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{CACHE_OPTION} {path}: {existing} is a file, not a folder; pass a folder for the converted "
                         f"releases")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (its parent {existing} is not writable)"
        raise ValueError(f"{CACHE_OPTION} {path}: not writable{where}; pass a folder you can write to")
    return path


def _stats(root: Path, skip: Path | None) -> list[list[Any]]:
    """``[relative path, size, mtime_ns]`` of every file under ``root`` (symbolic links followed, as the hub cache's
    snapshots are; hidden names and ``skip`` left out), sorted."""
    out: list[list[Any]] = []
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or (skip is not None and real == str(skip)):
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            file = Path(folder, name)
            try:
                st = file.stat()
            except OSError:  # a broken link: recorded as missing (the converter names it if it reads it)
                out.append([file.relative_to(root).as_posix(), -1, 0])
                continue
            out.append([file.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return sorted(out)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def release_fingerprint(release: str | os.PathLike, family: ModelFamily, options: ReleaseOptions,
                        cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What determines the converted folder: the resolved release path and its files (relative path, size,
    ``mtime_ns``; a ``cache_dir`` inside the release is left out), the family, the options that change the result
    (dtype, tokenizer folder and its files, CLIP heads, release row, transformer only) and the versions of this
    package and Diffusers."""
    release = Path(release).resolve()
    skip = Path(os.path.realpath(cache_dir)) if cache_dir is not None else None
    tokenizer = Path(options.tokenizer).resolve() if options.tokenizer is not None else None
    return {
        "format": CACHE_FORMAT,
        "family": family.name,
        "release": str(release),
        "files": _stats(release, skip),
        "options": {"dtype": options.dtype, "tokenizer": None if tokenizer is None else str(tokenizer),
                    "tokenizer_files": _stats(tokenizer, None) if tokenizer is not None else [],
                    "image_encoder_heads": options.image_encoder_heads, "variant": options.variant,
                    "transformer_only": options.transformer_only},
        "versions": {"diffusers_wan_ext": _package_version("diffusers_wan_ext"), "diffusers": diffusers.__version__},
    }


def cache_key(fingerprint: dict[str, Any]) -> str:
    """The entry's folder name: the release folder's name and 16 hex digits of the fingerprint's SHA-256."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(fingerprint["release"]).name).strip("._") or "release"
    return f"{name[:80]}-{digest}"


def _entry_info(entry: Path) -> dict[str, Any] | None:
    """A complete entry's ``cache_info.json`` (``None``: not an entry, or a damaged one)."""
    try:
        info = read_json(entry / CACHE_INFO, "conversion cache record")
    except (ConversionError, OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("model"), str) else None


def _older_entries(cache_dir: Path, fingerprint: dict[str, Any], key: str) -> list[Path]:
    """Complete entries of the same release (another fingerprint: files or options changed since)."""
    found = []
    for entry in sorted(cache_dir.iterdir()):
        if entry.name == key or not entry.is_dir() or ".tmp-" in entry.name:
            continue
        info = _entry_info(entry)
        if info is not None and info.get("fingerprint", {}).get("release") == fingerprint["release"]:
            found.append(entry)
    return found


def _remove_leftovers(cache_dir: Path, key: str) -> None:
    """What interrupted conversions of ``key`` left (``<key>.tmp-<pid>``); call it only while holding the lock."""
    for tmp in cache_dir.glob(f"{key}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_entry(cache_dir: Path, key: str, release: Path, family: ModelFamily, options: ReleaseOptions,
                   fingerprint: dict[str, Any]) -> Path:
    """Convert into ``<key>.tmp-<pid>`` and rename it to ``<key>`` once complete (removed on any failure)."""
    tmp = cache_dir / f"{key}.tmp-{os.getpid()}"
    entry = cache_dir / key
    tmp.mkdir()
    try:
        converted = Path(family.convert_release(release, tmp / "model", options))
        info = {"fingerprint": fingerprint, "model": converted.relative_to(tmp).as_posix(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / CACHE_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        if entry.exists():  # an entry without a record (damaged by hand): replaced
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry / info["model"]


def cached_conversion(cache_dir: str | os.PathLike, release: str | os.PathLike, family: ModelFamily,
                      options: ReleaseOptions, progress: bool = True) -> Path:
    """The converted folder of ``release`` in ``cache_dir``: loaded from a complete entry of the same fingerprint,
    else converted into a new one (one process at a time per entry; the others wait and use its result).  Returns
    the converted Diffusers folder."""
    cache_dir = check_cache_dir(cache_dir)
    release = Path(release)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{CACHE_OPTION} {cache_dir}: cannot create it ({e.strerror})") from None
    fingerprint = release_fingerprint(release, family, options, cache_dir)
    key = cache_key(fingerprint)
    entry = cache_dir / key
    title = family.short_title
    lock = FileLock(str(cache_dir / f".{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress_message(f"{release}: another process is converting it into {entry}; waiting for it", progress)
        lock.acquire()
    try:
        info = _entry_info(entry)
        if info is not None:
            progress_message(f"{release}: loading the {title} conversion cached in {entry} (converted "
                             f"{info.get('created', '?')}; no conversion)", progress)
            return entry / info["model"]
        _remove_leftovers(cache_dir, key)
        older = _older_entries(cache_dir, fingerprint, key)
        if older:
            progress_message(f"{release}: its files or the conversion options changed since the cached "
                             f"{', '.join(str(p) for p in older)} (delete it to free its space); converting into a "
                             f"new entry {entry}", progress)
        else:
            progress_message(f"{release}: a {title} release; converting it for training into {entry} (kept for "
                             f"later runs)", progress)
        return _convert_entry(cache_dir, key, release, family, options, fingerprint)
    finally:
        lock.release()
