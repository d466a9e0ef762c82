"""Wan LoRA file formats as data: key grammar per format, module-name tables per pipeline component.

A LoRA key is ``<prefix><module path><joiner-joined>.<suffix>``; a format fixes the prefix, the layout of the module
path (Diffusers names or the original Wan / DiffSynth names), how path components are joined, and which suffix holds
which *role* of a module's delta:

=============  ==================================  ===================================  ================================
role           meaning                             Diffusers PEFT                       original / ComfyUI, Kohya
=============  ==================================  ===================================  ================================
``down``       ``A`` ``[rank, in, *kernel]``        ``lora_A.weight``                    ``lora_down.weight``
``up``         ``B`` ``[out, rank, 1...]``          ``lora_B.weight``                    ``lora_up.weight``
``alpha``      scale ``alpha / rank`` of ``B @ A``  (none: always 1, folded in)          ``alpha``
``bias``       bias delta ``[out]``                 ``lora_B.bias`` (PEFT ``lora_bias``) ``diff_b``
``diff``       full weight delta                    (none: an exact full-rank LoRA)      ``diff``
=============  ==================================  ===================================  ================================

Module names are never tabulated here: the original <-> Diffusers names of the DiT are the full-weight converter's
tables (:data:`~diffusers_wan_ext.conversion.dit.TOP_LEVEL_KEY_MAP`, ``BLOCK_KEY_MAP`` and the tables each family
registers, via :func:`~diffusers_wan_ext.conversion.dit.rename_dit_key`).  A module the full-weight converter knows
(VACE blocks, Fun ``ref_conv`` / ``control_adapter``, ``img_emb``, ...) is therefore known here too.  Pipeline
components other than the transformers that a family adds are registered by the family with
:func:`register_lora_component` (their renamer and module names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from ..conversion.dit import dit_key_tables, rename_dit_key

__all__ = [
    "LORA_FORMATS",
    "LoraFormat",
    "FORMATS",
    "COMPONENT_RENAMERS",
    "NON_LORA_MODULE_RE",
    "kohya_compound_words",
    "register_lora_component",
    "DIFFSYNTH_TARGET_MODULES",
    "DIFFUSERS_WEIGHT_NAME",
    "EXPORT_FILE_NAMES",
]

LORA_FORMATS = ("diffusers", "original", "kohya", "diffsynth")

DOWN, UP, ALPHA, BIAS, DIFF = "down", "up", "alpha", "bias", "diff"
ROLES = (DOWN, UP, ALPHA, BIAS, DIFF)

# Suffixes every non-Diffusers reader accepts (the union of what ComfyUI, musubi-tuner, DiffSynth-Studio,
# diffusion-pipe / ai-toolkit and LightX2V write).
FOREIGN_READ_SUFFIXES: Mapping[str, str] = {
    "lora_down.weight": DOWN,
    "lora_A.weight": DOWN,
    "lora_A.default.weight": DOWN,
    "lora_up.weight": UP,
    "lora_B.weight": UP,
    "lora_B.default.weight": UP,
    "alpha": ALPHA,
    "diff_b": BIAS,
    "lora_B.bias": BIAS,
    "diff": DIFF,
}


# What original / ComfyUI and Kohya files write (ComfyUI reads diff / diff_b in both).
KOHYA_STYLE_SUFFIXES: Mapping[str, str] = {
    DOWN: "lora_down.weight", UP: "lora_up.weight", ALPHA: "alpha", BIAS: "diff_b", DIFF: "diff",
}


@dataclass(frozen=True)
class LoraFormat:
    """Key grammar of one LoRA file format.

    Args:
        name: one of :data:`LORA_FORMATS`.
        description: who writes / reads it.
        prefixes: key prefixes, the first one written; ``"{component}."`` stands for the pipeline component
            (``transformer.``, ``transformer_2.``); ``""`` accepts bare keys on reading.
        layout: module names in ``"diffusers"`` or ``"original"`` (Wan release / DiffSynth / ComfyUI) layout.
        joiner: between module path components (``"_"`` for Kohya: ``blocks_0_self_attn_q``).
        write_suffixes: role -> suffix written.
        read_suffixes: suffix -> role accepted on reading.
    """

    name: str
    description: str
    prefixes: tuple[str, ...]
    layout: str
    joiner: str
    write_suffixes: Mapping[str, str]
    read_suffixes: Mapping[str, str] = field(default_factory=lambda: FOREIGN_READ_SUFFIXES)

    @property
    def has_alpha(self) -> bool:
        """Stores ``alpha``; otherwise ``alpha / rank`` is folded into the factors on writing."""
        return ALPHA in self.write_suffixes

    @property
    def has_bias(self) -> bool:
        return BIAS in self.write_suffixes

    @property
    def has_diff(self) -> bool:
        """Stores full-weight deltas as such; otherwise they become an exact full-rank LoRA."""
        return DIFF in self.write_suffixes


FORMATS: dict[str, LoraFormat] = {
    "diffusers": LoraFormat(
        name="diffusers",
        description="Diffusers PEFT (pytorch_lora_weights.safetensors; WanPipeline.load_lora_weights, "
                    "save_lora_weights)",
        prefixes=("{component}.", ""),
        layout="diffusers",
        joiner=".",
        write_suffixes={DOWN: "lora_A.weight", UP: "lora_B.weight", BIAS: "lora_B.bias"},
        read_suffixes={"lora_A.weight": DOWN, "lora_B.weight": UP, "lora_B.bias": BIAS},
    ),
    "original": LoraFormat(
        name="original",
        description="original Wan names under diffusion_model. (ComfyUI, kijai's WanVideoWrapper, LightX2V, "
                    "diffusion-pipe)",
        prefixes=("diffusion_model.", ""),
        layout="original",
        joiner=".",
        write_suffixes=KOHYA_STYLE_SUFFIXES,
    ),
    "kohya": LoraFormat(
        name="kohya",
        description="Kohya / musubi-tuner (lora_unet_blocks_0_self_attn_q.lora_down.weight + alpha)",
        prefixes=("lora_unet_",),
        layout="original",
        joiner="_",
        write_suffixes=KOHYA_STYLE_SUFFIXES,
    ),
    "diffsynth": LoraFormat(
        name="diffsynth",
        description="DiffSynth-Studio (blocks.0.self_attn.q.lora_A.default.weight, no prefix, no alpha)",
        prefixes=("",),
        layout="original",
        joiner=".",
        write_suffixes={DOWN: "lora_A.default.weight", UP: "lora_B.default.weight"},
    ),
}

# ------------------------------------------------------------------------------------------------ module names
#: Pipeline components a LoRA can target -> ``rename(module_path, reverse)`` between the original layout and
#: Diffusers' (``reverse=True``: Diffusers -> original); ``None`` for an unknown module.  The transformers here;
#: components a family adds are registered with :func:`register_lora_component`.
COMPONENT_RENAMERS: dict[str, Callable[[str, bool], str | None]] = {
    "transformer": rename_dit_key,
    "transformer_2": rename_dit_key,
}
#: Original-layout module names of the registered components (for reading Kohya's ``_``-joined names back).
COMPONENT_MODULE_NAMES: dict[str, frozenset[str]] = {}


def register_lora_component(name: str, rename: Callable[[str, bool], str | None],
                            module_names: Iterable[str] = ()) -> None:
    """Let LoRA files target the pipeline component ``name`` (a family calls this when the registry imports it).

    Args:
        name: the pipeline component (key prefix ``<name>.`` in Diffusers LoRA files).
        rename: ``rename(module_path, reverse)`` between the original layout and Diffusers'; ``None`` for a module
            the component does not have.
        module_names: the component's original-layout module paths (Kohya names are read back with them).
    """
    COMPONENT_RENAMERS[name] = rename
    COMPONENT_MODULE_NAMES[name] = frozenset(module_names)

#: Diffusers module paths that PEFT cannot wrap (norms, bare parameters such as ``scale_shift_table``): only
#: original-layout ``diff`` / ``diff_b`` keys reach them.
NON_LORA_MODULE_RE = re.compile(r"(^|\.)(norm\w*|scale_shift_table|pos_embed)$")

def kohya_compound_words() -> tuple[str, ...]:
    """Module-name parts that contain ``_`` themselves, longest first.

    Kohya joins module path components with "_"; reading back needs these.  They are the components of the
    original-layout DiT table entries of every registered family, plus the sub-module names inside table entries that
    cover a whole module (``control_adapter`` -> ``residual_blocks.N.conv1``).
    """
    top, groups = dit_key_tables()
    names = ([src for src, _ in top] + [src for table in groups.values() for src, _ in table] + list(groups)
             + sorted(n for names in COMPONENT_MODULE_NAMES.values() for n in names) + ["residual_blocks"])
    return tuple(sorted({part for name in names for part in name.split(".") if "_" in part},
                        key=lambda w: (-w.count("_"), w)))


# ----------------------------------------------------------------------------------------------- target modules
#: DiffSynth-Studio's ``--lora_target_modules`` names (PEFT suffixes on its DiT) -> the equivalent PEFT suffixes on
#: Diffusers' Wan transformer.  DiffSynth's ``q`` matches ``self_attn.q`` and ``cross_attn.q``; ``to_q`` matches
#: ``attn1.to_q`` and ``attn2.to_q``; neither matches the image-branch ``k_img`` / ``add_k_proj``.
DIFFSYNTH_TARGET_MODULES: dict[str, str] = {
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "o": "to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "k_img": "add_k_proj",
    "v_img": "add_v_proj",
}

# ------------------------------------------------------------------------------------------------- file names
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # Diffusers' LORA_WEIGHT_NAME_SAFE
#: File written by :func:`~diffusers_wan_ext.lora.export_lora` per format (component ``transformer``; other
#: components add ``_<component>`` before the extension).
EXPORT_FILE_NAMES: dict[str, str] = {
    "diffusers": DIFFUSERS_WEIGHT_NAME,
    "original": "lora_original.safetensors",
    "kohya": "lora_kohya.safetensors",
    "diffsynth": "lora_diffsynth.safetensors",
}
