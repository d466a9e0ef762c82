"""The speed-control family: ``DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1`` on a Wan2.1 text-to-video folder.

A small MLP (:class:`~diffusers_wan_ext.WanMotionControllerModel`) turns ``motion_bucket_id`` into an offset of the
block modulation; the converted folder gets a ``motion_controller`` component and loads as
:class:`~diffusers_wan_ext.WanSpeedControlPipeline`.  It is added at conversion (``--motion-controller``) or to a
converted folder (:func:`add_motion_controller`, ``diffusers-wan add-motion-controller``).

Training: ``--extra_inputs motion_bucket_id`` runs the module with the transformer, ``--trainable_models
motion_controller`` fine-tunes it (:data:`MOTION_CONTROLLER_TRAINING`); LoRA files may target it
(``motion_controller.*`` keys, :func:`rename_motion_controller_module`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple as fetch_class_library_tuple
from safetensors import safe_open
from safetensors.torch import save_file

from ..conversion.dit import DitInfo
from ..conversion.motion_controller import MOTION_CONTROLLER_KEY_MAP, load_motion_controller_from_original
from ..conversion.release_io import DTYPES
from ..lora.formats import register_lora_component
from ..models import WanMotionControllerModel
from ..models.motion_controller import apply_motion_control
from ..pipelines import WanSpeedControlPipeline
from ..utils.atomic import atomic_output_dir, atomic_write_text, claim_destination
from ..utils.io import ConversionError, read_json, with_path
from ..utils.shims import rewrite_model_index_for_shims
from .base import (
    CommandArgument,
    ConvertInput,
    ExtraInput,
    FamilyCommand,
    ModelFamily,
    TrainingComponent,
    WanVariant,
)

__all__ = [
    "MOTION_CONTROLLER_MODULES",
    "MOTION_CONTROLLER_TRAINING",
    "SpeedControlFamily",
    "add_motion_controller",
    "make_tiny_motion_controller",
    "rename_motion_controller_module",
]

#: The motion controller's module names (the release's, in both LoRA layouts: ``linear.0``, ``linear.2``, ...).
MOTION_CONTROLLER_MODULES = frozenset(k.rsplit(".", 1)[0] for k, _ in MOTION_CONTROLLER_KEY_MAP)


def rename_motion_controller_module(path: str, reverse: bool = False) -> str | None:
    """Motion-controller module names are the release's in both layouts (``linear.0``, ``linear.2``, ``linear.4``)."""
    return path if path in MOTION_CONTROLLER_MODULES else None


def apply_motion_controller(controller: torch.nn.Module, transformer: torch.nn.Module,
                            motion_bucket_id: torch.Tensor):
    """Training forward: the transformer runs inside this context with the offset of ``motion_bucket_id``."""
    offset = controller(motion_bucket_id, return_dict=False)[0]
    return apply_motion_control(transformer, offset)


#: How training runs / fine-tunes the speed-control module.
MOTION_CONTROLLER_TRAINING = TrainingComponent(
    name="motion_controller", input_name="motion_bucket_id", apply=apply_motion_controller,
    help="motion_controller (the speed-control module)",
    missing="--extra_inputs motion_bucket_id needs the speed-control motion_controller component (a "
            "WanSpeedControlPipeline folder: diffusers-wan add-motion-controller)",
)


def load_motion_controller_for(path: str | os.PathLike, info: DitInfo, torch_dtype: torch.dtype):
    """The speed-control module, checked against the DiT it is added to (a Wan2.1 T2V DiT of the same width)."""
    if info.arch != "t2v":
        raise ConversionError(
            f"{path}: the speed-control motion controller belongs on a Wan2.1 text-to-video DiT, not a {info.arch} DiT"
        )
    model = with_path(path, lambda: load_motion_controller_from_original(path, torch_dtype=torch_dtype))
    width = info.config["num_attention_heads"] * info.config["attention_head_dim"]
    if model.config.dim != width or model.config.freq_dim != info.config["freq_dim"]:
        raise ConversionError(
            f"{path}: motion controller for dim {model.config.dim} / freq_dim {model.config.freq_dim}, but the DiT has "
            f"dim {width} / freq_dim {info.config['freq_dim']} (the speed-control model fits Wan2.1-T2V-1.3B)"
        )
    return model


def _stored_dtype(model_folder: Path) -> torch.dtype:
    for f in sorted(model_folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                name = str(h.get_slice(k).get_dtype()).lower()
                return {"bf16": torch.bfloat16, "f16": torch.float16}.get(name, torch.float32)
    return torch.float32


def add_motion_controller(folder: str | os.PathLike, motion_controller: str | os.PathLike, dtype: str | None = None) -> Path:
    """Add the speed-control module to an already converted Wan2.1 T2V folder (it becomes a
    :class:`~diffusers_wan_ext.WanSpeedControlPipeline`).  The folder is only changed once everything is written.

    Example:
        >>> add_motion_controller("Wan2.1-T2V-1.3B-diffusers", "Wan2.1-1.3b-speedcontrol-v1/model.safetensors")  # doctest: +SKIP
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ConversionError(f"{folder}: not a converted pipeline folder (no model_index.json)")
    tcfg_path = folder / "transformer" / "config.json"
    if not tcfg_path.is_file():
        raise ConversionError(f"{folder}: no transformer/config.json")
    tcfg = read_json(tcfg_path, "transformer config")
    is_t2v = (tcfg.get("_class_name", "WanTransformer3DModel") == "WanTransformer3DModel"
              and tcfg.get("in_channels") == tcfg.get("out_channels", 16) and not tcfg.get("image_dim"))
    if not is_t2v:
        raise ConversionError(
            f"{folder}: a {read_json(index_path, 'model index').get('_class_name')} folder; the speed-control motion "
            f"controller ({motion_controller}) belongs on a Wan2.1 text-to-video folder"
        )
    info = DitInfo(arch="t2v", config=tcfg, text_len=512)
    torch_dtype = DTYPES[dtype] if dtype else _stored_dtype(folder / "transformer")
    model = load_motion_controller_for(motion_controller, info, torch_dtype)
    index = read_json(index_path, "model index")
    with claim_destination(folder, overwrite=True):  # no conversion writes the folder meanwhile
        with atomic_output_dir(folder / "motion_controller", overwrite=True) as tmp:  # old one kept until replaced
            model.save_pretrained(tmp)
        index["_class_name"] = "WanSpeedControlPipeline"
        index["motion_controller"] = list(fetch_class_library_tuple(model))
        atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
        rewrite_model_index_for_shims(folder)
    return folder


def make_tiny_motion_controller(path: str | os.PathLike, seed: int = 0, freq_dim: int = 32, dim: int = 48) -> Path:
    """Write a tiny speed-control ``model.safetensors`` (release layout ``linear.{0,2,4}.*``), by default for the
    tiny T2V DiT of the demo."""
    torch.manual_seed(seed)
    mc = WanMotionControllerModel(freq_dim=freq_dim, dim=dim)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mc.state_dict().items()}, str(path))
    return path


def run_add_motion_controller(args: Any) -> int:
    """``diffusers-wan add-motion-controller FOLDER FILE [--dtype]``."""
    out = add_motion_controller(args.folder, args.motion_controller, dtype=args.dtype)
    print(f"added motion_controller -> {out} (now a WanSpeedControlPipeline)")
    return 0


ADD_MOTION_CONTROLLER = FamilyCommand(
    "add-motion-controller",
    "add the speed-control module to a converted Wan2.1-T2V-1.3B folder",
    (
        CommandArgument(("folder",), {"help": "converted Diffusers folder (Wan2.1 T2V)"}),
        CommandArgument(("motion_controller",), {"help": "speed-control model.safetensors"}),
        CommandArgument(("--dtype",), {"choices": ["bf16", "fp16", "fp32"],
                                       "help": "default: the transformer's storage dtype"}),
    ),
    run_add_motion_controller,
)


class SpeedControlFamily(ModelFamily):
    name = "speed-control"
    title = "Wan2.1 speed control (motion_bucket_id)"
    variants: tuple[WanVariant, ...] = ()  # added to a Wan2.1-T2V folder, not a release of its own
    model_classes = (WanMotionControllerModel,)
    pipeline_classes = (WanSpeedControlPipeline,)
    training_components = (MOTION_CONTROLLER_TRAINING,)
    dataset_inputs = {"motion_bucket_id": ExtraInput("float")}
    cli_commands = (ADD_MOTION_CONTROLLER,)
    convert_inputs = (
        ConvertInput("--motion-controller", "motion_controller", "speed-control model.safetensors (DiffSynth-Studio/"
                     "Wan2.1-1.3b-speedcontrol-v1) to add as a component of a Wan2.1 T2V folder (-> "
                     "WanSpeedControlPipeline)"),
    )

    def find_files(self, root: Path, given: dict[str, Any]) -> dict[str, Path | None]:
        path = given.get("motion_controller")
        return {"motion_controller": Path(path) if path else None}

    def load_components(self, files: dict[str, Any], info: DitInfo, variant: WanVariant,
                        torch_dtype: torch.dtype) -> dict[str, Any]:
        path = files.get("motion_controller")
        return {} if path is None else {"motion_controller": load_motion_controller_for(path, info, torch_dtype)}

    def pipeline_override(self, components: dict[str, Any]) -> str | None:
        return "WanSpeedControlPipeline" if "motion_controller" in components else None

    def register_lora_components(self) -> None:
        register_lora_component("motion_controller", rename_motion_controller_module, MOTION_CONTROLLER_MODULES)
