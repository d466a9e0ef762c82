"""Re-export shims: a converted folder that names one of our classes loads in a fresh interpreter.

Every component folder holding one of our classes carries a shim file ``diffusers_wan_ext.py`` (:data:`SHIM_SOURCE`,
a star re-export of the installed package), and ``model_index.json`` names the library ``diffusers_wan_ext``;
Diffusers then loads the shim as custom code when the caller passes ``trust_remote_code=True``.  After
``import diffusers_wan_ext`` the shim is recognised byte for byte and never executed
(:mod:`diffusers_wan_ext.registration`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .io import read_json

__all__ = [
    "PACKAGE",
    "SHIM_FILENAME",
    "SHIM_SOURCE",
    "ShimPipelineMixin",
    "ShimSaveMixin",
    "is_our_shim",
    "rewrite_model_index_for_shims",
    "write_shim",
]

PACKAGE = "diffusers_wan_ext"
SHIM_FILENAME = f"{PACKAGE}.py"
SHIM_SOURCE = (
    "# Written by diffusers_wan_ext: lets `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` load this\n"
    "# folder without importing diffusers_wan_ext first. It only re-exports the installed package\n"
    "# (pip install diffusers_wan_ext); no model code lives here.\n"
    "from diffusers_wan_ext import *  # noqa: F401,F403\n"
)


def is_our_shim(path: str | os.PathLike) -> bool:
    """Whether ``path`` is byte for byte our shim (nothing else is ever resolved without ``trust_remote_code``)."""
    try:
        return Path(path).read_text() == SHIM_SOURCE
    except OSError:
        return False


def write_shim(folder: str | os.PathLike) -> None:
    """Write the re-export shim into ``folder`` (a component folder or a pipeline root)."""
    Path(folder, SHIM_FILENAME).write_text(SHIM_SOURCE)


def is_our_class_name(name: object) -> bool:
    """Whether ``name`` is a class this package defines (registered on the ``diffusers`` namespace on import)."""
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    return isinstance(cls, type) and cls.__module__.split(".")[0] == PACKAGE


def rewrite_model_index_for_shims(folder: str | os.PathLike) -> None:
    """After ``save_pretrained``: make ``model_index.json`` load in a fresh interpreter with ``trust_remote_code``.

    The pipeline class itself, if it is ours, becomes ``["diffusers_wan_ext", Name]`` with a root shim; component
    entries already read ``["diffusers_wan_ext", Name]`` and their folders get a shim each.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = read_json(index_path, "model index")
    name = index.get("_class_name")
    if is_our_class_name(name):
        index["_class_name"] = [PACKAGE, name]
        write_shim(folder)
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, cls = value
        if is_our_class_name(cls) and (library in (PACKAGE, None) or str(library).startswith(PACKAGE + ".")):
            index[key] = [PACKAGE, cls]
            if (folder / key).is_dir():
                write_shim(folder / key)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class ShimSaveMixin:
    """Mixin for our models and schedulers: ``save_pretrained`` also writes the re-export shim next to the config,
    so a folder saved by any pipeline (ours or stock) keeps loading with ``trust_remote_code=True``."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if os.path.isdir(save_directory):
            write_shim(save_directory)
        return result


class ShimPipelineMixin:
    """Mixin for our pipelines: ``save_pretrained`` rewrites ``model_index.json`` for the shim route."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if os.path.isfile(os.path.join(save_directory, "model_index.json")):
            rewrite_model_index_for_shims(save_directory)
        return result
