"""Training checkpoints without pickle: what ``checkpoint-N/`` holds, how it is found, checked and written.

A checkpoint folder holds only JSON and safetensors, so resuming never runs code from a file (accelerate's
``save_state`` pickles the optimizer, the scheduler, the RNG states and registered objects, and ``load_state``
unpickles them with ``weights_only=False``; the trainer does not use them):

* ``training_state.json`` -- written last: format, progress, world size, the LR-scheduler and grad-scaler states,
  the optimizer's non-tensor state and the run fingerprint (:func:`run_fingerprint`);
* ``trainable_weights.safetensors`` -- the trained tensors by module name (``pytorch_lora_weights.safetensors`` too
  for LoRA runs);
* ``optimizer.safetensors`` -- the optimizer's tensors (``state.<param index>.<name>``);
* ``rng_state_<rank>.safetensors`` -- each process's torch / CUDA / numpy / Python RNG states.

A checkpoint is written into ``.checkpoint-N.partial/`` and renamed into place when complete, so a run killed while
writing leaves no ``checkpoint-N`` that ``--resume_from_checkpoint latest`` could pick.  A folder holding a file that
loads through pickle (``*.pkl``, ``*.bin``, ``*.pt`` ...) is refused, as is a checkpoint of a run with other
arguments (the error names what changed).  Written files and folders get the permissions the umask gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "TRAINABLE_WEIGHTS",
    "apply_umask",
    "check_checkpoint",
    "find_checkpoints",
    "load_optimizer_state",
    "load_rng_state",
    "read_state",
    "replace_folder",
    "rng_state_file",
    "run_fingerprint",
    "save_optimizer_state",
    "save_rng_state",
]

CHECKPOINT_FORMAT = "diffusers_wan_ext.training-checkpoint.v2"
STATE_FILE = "training_state.json"
TRAINABLE_WEIGHTS = "trainable_weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
#: Suffixes of files that load through pickle (accelerate's optimizer.bin / scheduler.bin / random_states_N.pkl /
#: custom_checkpoint_N.pkl / scaler.pt, torch.save files); a checkpoint folder holding one is refused.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".joblib")

#: The arguments that make a run what it is: resuming with other values is an error naming them.  (The number of
#: epochs / steps, the learning rate and the output folder may change between resumes.)
FINGERPRINT_ARGS = (
    "task", "model_path", "transformer_path", "dataset_base_path", "dataset_metadata_path", "dataset_repeat",
    "data_file_keys", "num_frames", "min_num_frames", "height", "width", "max_pixels", "extra_inputs",
    "prompt_column", "video_column", "skip_bad_rows", "seed", "expert", "lora_base_model", "lora_scope",
    "lora_rank", "lora_alpha", "lora_target_modules", "trainable_models", "trainable_modules", "trainable_scope",
    "trainable_dtype", "gradient_accumulation_steps", "timestep_shift", "min_timestep_boundary",
    "max_timestep_boundary", "preset_lora_path", "preset_lora_model", "distill_inputs", "quant_options", "frame_rate",
)
PATH_ARGS = ("model_path", "transformer_path", "dataset_base_path", "dataset_metadata_path", "preset_lora_path")


# ------------------------------------------------------------------------------------------------------ files


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything under it) the mode a plain ``open`` / ``mkdir`` would:
    ``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders (temporary files are created ``0o600``)."""
    mask = current_umask()
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def replace_folder(tmp: Path, dst: Path) -> None:
    """Move the complete folder ``tmp`` to ``dst`` (replacing an existing ``dst``)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def _json_safe(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot store {what} in a checkpoint as JSON ({e})") from e


# -------------------------------------------------------------------------------------------------- optimizer


def save_optimizer_state(state_dict: dict[str, Any], path: Path) -> dict[str, Any]:
    """Write the optimizer's tensors to ``path`` (safetensors); return the rest (JSON) for the state file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(index), {})[name] = value
    groups = []
    for group in state_dict["param_groups"]:
        tuples = sorted(k for k, v in group.items() if isinstance(v, tuple))
        groups.append({"values": group, "tuples": tuples})
    save_file(tensors, str(path))
    return _json_safe({"param_groups": groups, "values": values}, "the optimizer state")


def load_optimizer_state(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The optimizer ``state_dict`` from ``path`` and the state file's record (:func:`save_optimizer_state`)."""
    from safetensors.torch import load_file

    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(path)).items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in record.get("values", {}).items():
        state.setdefault(int(index), {}).update(entries)
    groups = []
    for group in record["param_groups"]:
        values = dict(group["values"])
        for name in group["tuples"]:
            values[name] = tuple(values[name])
        groups.append(values)
    return {"state": state, "param_groups": groups}


# -------------------------------------------------------------------------------------------------------- RNG


def rng_state_file(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


def save_rng_state(path: Path) -> None:
    """This process's torch (CPU + CUDA), numpy and Python RNG states as safetensors (Python's in the header)."""
    from safetensors.torch import save_file

    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {"numpy": json.dumps([np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]),
            "python": json.dumps(random.getstate())}
    save_file(tensors, str(path), metadata=meta)


def load_rng_state(path: Path) -> None:
    """Restore what :func:`save_rng_state` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as h:
        meta = h.metadata() or {}
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    torch.set_rng_state(tensors["torch"])
    name, pos, has_gauss, gauss = json.loads(meta["numpy"])
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = json.loads(meta["python"])
    random.setstate((version, tuple(state), gauss_next))
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ------------------------------------------------------------------------------------------------ fingerprint


def _dataset_digest(args) -> str | None:
    """sha256 of the metadata file (or, training from a cache, of its ``cache_info.json`` and entry names)."""
    h = hashlib.sha256()
    if args.dataset_metadata_path is not None:
        path = Path(args.dataset_metadata_path)
        if not path.is_file():
            return None
        h.update(path.read_bytes())
    else:
        base = Path(args.dataset_base_path)
        info = base / "cache_info.json"
        if info.is_file():
            h.update(info.read_bytes())
        for entry in sorted(base.rglob("*.safetensors")):
            h.update(str(entry.relative_to(base)).encode())
    return h.hexdigest()


def run_fingerprint(args) -> dict[str, Any]:
    """The arguments a resumed run must share with the run that wrote the checkpoint (:data:`FINGERPRINT_ARGS`,
    paths resolved) and the digest of the dataset's metadata."""
    out: dict[str, Any] = {}
    for name in FINGERPRINT_ARGS:
        value = getattr(args, name, None)
        if name in PATH_ARGS and value is not None:
            value = str(Path(value).resolve())
        out[name] = value
    out["dataset_digest"] = _dataset_digest(args)
    return _json_safe(out, "the run arguments")


def fingerprint_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``--name stored -> current`` for every fingerprint entry that differs."""
    changes = []
    for name in sorted(set(stored) | set(current)):
        if stored.get(name) != current.get(name):
            if name == "dataset_digest":
                changes.append("the dataset metadata content changed")
            else:
                changes.append(f"--{name} {stored.get(name)!r} -> {current.get(name)!r}")
    return changes


# ------------------------------------------------------------------------------------------- finding, checking


def read_state(folder: Path) -> dict[str, Any] | None:
    """The state file of a checkpoint folder, or ``None`` when it is absent or not a JSON object (never written
    completely)."""
    try:
        record = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def find_checkpoints(output_path: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_path`` with a state file, oldest first (partial writes -- temporary
    folders, folders without a readable state file -- are left out)."""
    found = []
    root = Path(output_path)
    if not root.is_dir():
        return []
    for p in root.iterdir():
        m = CHECKPOINT_NAME.match(p.name)
        if m and p.is_dir() and read_state(p) is not None:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def check_checkpoint(folder: Path, args, world_size: int, deepspeed: bool) -> dict[str, Any]:
    """Check a checkpoint folder before anything is loaded; returns its state record.

    Refused (``ValueError``, one line naming the folder): a file that would load through pickle, no / unreadable
    state file, another format (an older version's pickled accelerate state), another number of processes, other
    run arguments (named), and a safetensors file that is not one.
    """
    where = f"--resume_from_checkpoint {folder}"
    pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{where}: refusing to resume from a folder with pickle files ({', '.join(pickles[:5])}): "
                         f"loading them could run code; checkpoints of this trainer hold only JSON and safetensors "
                         f"(to resume only the weights, pass the folder's {TRAINABLE_WEIGHTS} if it has one)")
    record = read_state(folder)
    if record is None:
        raise ValueError(f"{where}: not a complete checkpoint folder ({STATE_FILE} is missing or not a JSON object)")
    if record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where}: written by another version of the trainer (format {record.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r}); pass its weights file to resume the weights only")
    if record.get("world_size") != world_size:
        raise ValueError(f"{where}: written by {record.get('world_size')} process(es), this run has {world_size}: "
                         f"resume with the same number of processes for an exact resume")
    if deepspeed or record.get("deepspeed"):
        raise ValueError(f"{where}: exact resume under DeepSpeed is not supported (DeepSpeed's optimizer states are "
                         f"pickles); pass {folder / TRAINABLE_WEIGHTS} to resume the weights only")
    changes = fingerprint_changes(record.get("fingerprint") or {}, run_fingerprint(args))
    if changes:
        raise ValueError(f"{where}: the checkpoint belongs to a run with other arguments ({'; '.join(changes)}); "
                         f"resume with the same arguments, or train into another --output_path")
    _check_safetensors(folder, where, [TRAINABLE_WEIGHTS, OPTIMIZER_FILE] + [rng_state_file(r) for r in range(world_size)])
    return record


def _check_safetensors(folder: Path, where: str, names: list[str]) -> None:
    from safetensors import safe_open

    for name in names:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{where}: {name} is missing; the checkpoint is incomplete")
        try:
            with safe_open(str(path), "pt") as h:
                h.keys()
        except Exception as e:  # noqa: BLE001 - any header error: not a safetensors file
            raise ValueError(f"{where}: {name} is not a safetensors file ({type(e).__name__})") from e
