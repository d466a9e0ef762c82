"""DiffSynth-Studio's ``--model_id_with_origin_paths`` resolved to local files (never downloaded).

An entry is ``<model_id>:<origin file pattern>`` (split at the last colon; an existing path is taken as it is),
comma-separated, e.g. ``Wan-AI/Wan2.1-T2V-1.3B:diffusion_pytorch_model*.safetensors,Wan-AI/Wan2.1-T2V-1.3B:
models_t5_umt5-xxl-enc-bf16.pth,Wan-AI/Wan2.1-T2V-1.3B:Wan2.1_VAE.pth``.  A model id is looked up where
DiffSynth-Studio downloads it, ``$DIFFSYNTH_MODEL_BASE_PATH/<model_id>`` or ``./models/<model_id>``, then in the
Hugging Face hub cache (a snapshot already there); every pattern must match files of that folder.

Our loader reads a whole release folder, so the entries become ``--model_path`` (the folder of the model id that
holds the VAE / text encoder files -- with one model id, that folder) and, when the DiT files come from another
model id, ``--transformer_path`` (the matched file, or the folder of several shards).

Example:
    >>> resolve_model_ids("Wan-AI/Wan2.1-T2V-1.3B:Wan2.1_VAE.pth")  # doctest: +SKIP
    ResolvedModels(model_path=PosixPath('models/Wan-AI/Wan2.1-T2V-1.3B'), transformer_path=None)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ResolvedModels", "model_id_folder", "resolve_model_ids"]

#: file names of a release's DiT weights (one expert or the two of an A14B release)
DIT_FILE = re.compile(r"(^|/)(diffusion_pytorch_model[^/]*|[^/]*\.gguf)$|(^|/)(high|low)_noise_model/")


@dataclass(frozen=True)
class ResolvedModels:
    """Where the entries are: the release folder (``--model_path``) and a DiT of another model id, if any."""

    model_path: Path
    transformer_path: Path | None = None


def _hub_snapshot(model_id: str) -> Path | None:
    """The newest cached snapshot of ``model_id`` in the Hugging Face hub cache (no network), or ``None``."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def model_id_folder(model_id: str) -> tuple[Path | None, list[str]]:
    """The local folder of ``model_id`` and the places looked at (for the error)."""
    bases = [os.environ.get("DIFFSYNTH_MODEL_BASE_PATH"), "./models"]
    looked = []
    for base in (b for b in bases if b):
        folder = Path(base) / model_id
        looked.append(str(folder))
        if folder.is_dir():
            return folder, looked
    looked.append("the Hugging Face hub cache")
    return _hub_snapshot(model_id), looked


def _matches(entry: str) -> tuple[str | None, list[Path]]:
    """``(model_id, files)`` of one entry (``model_id`` ``None`` for a plain path)."""
    if os.path.exists(entry):
        return None, [Path(entry)]
    model_id, sep, pattern = entry.rpartition(":")
    if not sep or not model_id or not pattern:
        raise ValueError(f"--model_id_with_origin_paths {entry!r}: neither an existing path nor "
                         f"<model_id>:<origin file pattern>")
    folder, looked = model_id_folder(model_id)
    if folder is None:
        raise ValueError(f"--model_id_with_origin_paths {entry!r}: {model_id} is not downloaded (looked in "
                         f"{', '.join(looked)}); nothing is downloaded here: download it, or pass --model_path")
    files = sorted(folder.glob(pattern.rstrip("/")))
    if not files:
        raise ValueError(f"--model_id_with_origin_paths {entry!r}: no file in {folder} matches {pattern!r}")
    return model_id, files


def _common_folder(files: list[Path]) -> Path:
    return files[0] if len(files) == 1 else Path(os.path.commonpath([str(f) for f in files]))


def resolve_model_ids(value: str) -> ResolvedModels:
    """Resolve ``--model_id_with_origin_paths`` (see the module docstring); an entry that names nothing local is a
    ``ValueError`` naming it."""
    dits: list[tuple[str | None, list[Path]]] = []
    others: list[tuple[str | None, list[Path]]] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        model_id, files = _matches(entry)
        is_dit = any(DIT_FILE.search(str(f.as_posix())) for f in files)
        (dits if is_dit else others).append((model_id, files))
    if not others and not dits:
        raise ValueError("--model_id_with_origin_paths: no entries")
    main = others or dits  # the release (VAE / T5); DiT-only entries: the DiT's folder is the release
    folders = {_release_folder(mid, files) for mid, files in main}
    if len(folders) > 1:
        raise ValueError(f"--model_id_with_origin_paths: the VAE / text encoder files come from several folders "
                         f"({', '.join(sorted(map(str, folders)))}); our loader reads one release folder")
    model_path = folders.pop()
    dit_files = [f for mid, files in dits for f in files if _release_folder(mid, files) != model_path]
    transformer = _common_folder(dit_files) if dit_files else None
    return ResolvedModels(model_path=model_path, transformer_path=transformer)


def _release_folder(model_id: str | None, files: list[Path]) -> Path:
    """The folder an entry's files belong to: the model id's folder, or a plain path's parent."""
    if model_id is not None:
        folder, _ = model_id_folder(model_id)
        return folder
    path = files[0]
    return path if path.is_dir() else path.parent
