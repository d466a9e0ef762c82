"""Load a pipeline folder ``convert --keep-quantized`` wrote: its kept-quantized component folders (a transformer
read by stock Diffusers or by this package, a umT5 text encoder only this package reads) loaded first and passed
in, everything else by ``DiffusionPipeline.from_pretrained``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..utils.io import ConversionError
from .quantized_dit import QUANTIZED_FOLDER_NOTE, load_quantized_folder

__all__ = ["load_quantized_pipeline", "quantized_components"]


def quantized_components(folder: str | os.PathLike) -> list[str]:
    """The components of a pipeline folder that hold a :data:`QUANTIZED_FOLDER_NOTE` (kept quantized)."""
    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except FileNotFoundError:
        raise ConversionError(f"{folder}: no model_index.json (not a pipeline folder)") from None
    return sorted(name for name in index
                  if not name.startswith("_") and (folder / name / QUANTIZED_FOLDER_NOTE).is_file())


def load_quantized_pipeline(folder: str | os.PathLike, torch_dtype: torch.dtype | None = None, **kwargs: Any):
    """``DiffusionPipeline.from_pretrained(folder, **kwargs)`` with each kept-quantized component
    (:func:`quantized_components`) loaded by :func:`load_quantized_folder` in ``torch_dtype`` (default: the compute
    dtype of the conversion) and passed in; components given in ``kwargs`` are used as they are.

    Example:
        >>> pipe = load_quantized_pipeline("wan-t2v-14b-Q4_K_M-diffusers", torch_dtype=torch.bfloat16)  # doctest: +SKIP
        >>> pipe.enable_model_cpu_offload()  # doctest: +SKIP
    """
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    passed = {name: load_quantized_folder(folder / name, torch_dtype=torch_dtype)
              for name in quantized_components(folder) if name not in kwargs}
    if torch_dtype is not None:
        kwargs.setdefault("torch_dtype", torch_dtype)
    return DiffusionPipeline.from_pretrained(str(folder), **passed, **kwargs)
