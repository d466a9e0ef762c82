"""The model-family registry: every family of the package, declared once (one module each), iterated here.

The converter, ``diffusers-wan variants``, the Diffusers registration, the parallel plans, the demo and the training
inputs read this registry; no code outside a family's module names a family.  Importing this package registers each
family's DiT modules with the DiT converter (:func:`~diffusers_wan_ext.conversion.dit.register_dit_extension`) and
its context-parallel plans for stock classes.

Adding a family: write ``families/<name>.py`` (a :class:`~.base.ModelFamily` subclass) next to its model / pipeline
files, add it to :data:`FAMILIES`, add its goldens and tests.  See ``docs/architecture.md``.

Example:
    >>> from diffusers_wan_ext.families import get_variant, family
    >>> get_variant("wan2.1-t2v-1.3b").release
    'Wan-AI/Wan2.1-T2V-1.3B'
    >>> family("vace").title
    'VACE (stock WanVACEPipeline)'
"""

from __future__ import annotations

from typing import Any, Iterator

from ..conversion.dit import register_dit_extension
from .animate import AnimateFamily
from .animate2 import Animate2Family
from .base import (
    CommandArgument,
    Conditioning,
    ConvertInput,
    ExtraInput,
    FamilyCommand,
    GenerateInput,
    ModelFamily,
    ReleaseOptions,
    TinyArch,
    TrainingComponent,
    TrainingScope,
    WanVariant,
)
from .dancer import DancerFamily
from .fun import FunFamily
from .longcat import LongCatFamily
from .mova import MovaFamily
from .s2v import SpeechToVideoFamily
from .speed_control import SpeedControlFamily
from .vace import VaceFamily
from .video_as_prompt import VideoAsPromptFamily
from .wan_core import WanCoreFamily

__all__ = [
    "FAMILIES",
    "VARIANTS",
    "Conditioning",
    "ExtraInput",
    "CommandArgument",
    "ConvertInput",
    "FamilyCommand",
    "GenerateInput",
    "ModelFamily",
    "ReleaseOptions",
    "TinyArch",
    "TrainingComponent",
    "TrainingScope",
    "WanVariant",
    "claiming_family",
    "family",
    "family_of_arch",
    "get_variant",
    "hook_metadata",
    "registered_classes",
    "training_conditioning",
    "training_declarations",
    "variants_for_arch",
]

#: Every family, in detection / listing order (the core first: its rows are the defaults of shared layouts).
FAMILIES: tuple[ModelFamily, ...] = (
    WanCoreFamily(), FunFamily(), VaceFamily(), AnimateFamily(), SpeechToVideoFamily(), SpeedControlFamily(),
    VideoAsPromptFamily(), LongCatFamily(), Animate2Family(), DancerFamily(),
    MovaFamily(),
)
#: Every release row of every family.
VARIANTS: tuple[WanVariant, ...] = tuple(v for f in FAMILIES for v in f.variants)

for _family in FAMILIES:
    if _family.dit is not None:
        register_dit_extension(_family.dit)
    _family.register_parallel_plans()
    _family.register_runtime_hooks()
    _family.register_lora_components()


def family(name: str) -> ModelFamily:
    """The family registered as ``name``."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"unknown model family {name!r}; choose one of: {', '.join(f.name for f in FAMILIES)}")


def family_of_arch(arch: str) -> ModelFamily:
    """The family whose DiT (or tiny DiT) has architecture ``arch``."""
    for f in FAMILIES:
        if arch in f.tiny_arches or (f.dit is not None and arch in f.dit.arches):
            return f
    known = sorted({a for f in FAMILIES for a in f.tiny_arches})
    raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(known)}")


def get_variant(name: str) -> WanVariant:
    """The release row named ``name`` (or one of its aliases)."""
    key = name.lower()
    for v in VARIANTS:
        if key == v.name or key in v.aliases:
            return v
    raise ValueError(f"unknown variant {name!r}; choose one of: {', '.join(v.name for v in VARIANTS)}")


def variants_for_arch(arch: str, experts: int) -> list[WanVariant]:
    """The release rows with DiT architecture ``arch`` and ``experts`` experts, in registry order."""
    return [v for v in VARIANTS if v.arch == arch and v.experts == experts]


def registered_classes() -> Iterator[type]:
    """Every model and pipeline class the families ship."""
    for f in FAMILIES:
        yield from f.model_classes
        yield from f.pipeline_classes


def hook_metadata() -> dict[str, Any]:
    """What the families declare for Diffusers' hook registries (arguments of
    :func:`~diffusers_wan_ext.hooks.diffusers_registry.register_hook_metadata`)."""
    return dict(
        blocks=tuple(b for f in FAMILIES for b in f.hook_blocks),
        block_metadata={b: m for f in FAMILIES for b, m in f.hook_block_metadata.items()},
        processors=tuple(p for f in FAMILIES for p in f.hook_processors),
    )


def training_conditioning(config: Any, expand_timesteps: bool) -> Conditioning:
    """How training conditions a transformer with this ``config``: the family that claims the config specifically
    (:meth:`ModelFamily.claims_config`), else the first family whose conditioning matches its channels."""
    claiming = [f for f in FAMILIES if f.claims_config(config)]
    for f in claiming or FAMILIES:
        found = f.training_conditioning(config, expand_timesteps)
        if found is not None:
            return found
    raise ValueError(
        f"the transformer takes {config.in_channels} input channels and {config.out_channels} output channels, a "
        "layout no family's training conditions"
    )


def claiming_family(config: Any) -> ModelFamily | None:
    """The family that claims a transformer ``config`` specifically (:meth:`ModelFamily.claims_config`), else
    ``None`` (a Wan DiT)."""
    return next((f for f in FAMILIES if f.claims_config(config)), None)


def training_declarations() -> tuple[tuple[TrainingScope, ...], tuple[TrainingComponent, ...], dict[str, ExtraInput]]:
    """What the families declare for training: the transformer scopes (``--trainable_models vace``), the extra
    trainable components (``motion_controller``) and the dataset columns (``--extra_inputs``) they add."""
    return (tuple(s for f in FAMILIES for s in f.training_scopes),
            tuple(c for f in FAMILIES for c in f.training_components),
            {name: spec for f in FAMILIES for name, spec in f.dataset_inputs.items()})
