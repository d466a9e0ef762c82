"""LoRA interop for Wan: convert between Diffusers PEFT, original / ComfyUI, Kohya / musubi-tuner and
DiffSynth-Studio keys, export a trained LoRA in all of them, and load any of them into our pipelines.

See ``docs/lora.md``.  CLI: ``diffusers-wan lora convert IN OUT --to {diffusers,original,kohya,diffsynth}``,
``diffusers-wan lora info FILE``, ``diffusers-wan lora export IN OUT_DIR``.

Example:
    >>> from diffusers_wan_ext.lora import convert_lora_state_dict, load_lora_file, save_lora_file  # doctest: +SKIP
    >>> sd = load_lora_file("comfyui_lora.safetensors")  # doctest: +SKIP
    >>> save_lora_file(convert_lora_state_dict(sd, "diffusers"), "pytorch_lora_weights.safetensors")  # doctest: +SKIP
"""

from .convert import (
    alpha_scale_split,
    convert_lora_state_dict,
    detect_lora_format,
    export_lora,
    load_lora_file,
    lora_info,
    map_block_target_modules,
    map_lora_target_modules,
    peft_lora_state_dict,
    save_lora_file,
    split_lora_components,
)
from .formats import DIFFUSERS_WEIGHT_NAME, EXPORT_FILE_NAMES, FORMATS, LORA_FORMATS
from .loader import WanLoraInteropMixin, check_lora_state_dict

__all__ = [
    "DIFFUSERS_WEIGHT_NAME",
    "EXPORT_FILE_NAMES",
    "FORMATS",
    "LORA_FORMATS",
    "WanLoraInteropMixin",
    "alpha_scale_split",
    "check_lora_state_dict",
    "convert_lora_state_dict",
    "detect_lora_format",
    "export_lora",
    "load_lora_file",
    "lora_info",
    "map_block_target_modules",
    "map_lora_target_modules",
    "peft_lora_state_dict",
    "save_lora_file",
    "split_lora_components",
]
