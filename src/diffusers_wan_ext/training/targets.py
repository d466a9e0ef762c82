"""What a run trains on its transformer, by the transformer's own module names: the LoRA targets of
``--lora_target_modules`` and the modules of a module-level ``--trainable_models dit.blocks.0.self_attn.q,...``
(DiffSynth-Studio's names of its DiT's modules).

The names are the Wan DiT's unless the family that claims the transformer's config
(:func:`~diffusers_wan_ext.families.claiming_family`) names its modules otherwise (Wan2.2-Animate-2:
``self_attn.q`` -> ``self_attn.to_q``, not the Wan DiT's ``attn1.to_q``).
"""

from __future__ import annotations

from argparse import Namespace

from torch import nn

from ..families import ModelFamily, claiming_family

__all__ = ["lora_target_modules", "trainable_module_parameters"]


def lora_target_modules(transformer: nn.Module, args: Namespace) -> list[str]:
    """PEFT ``target_modules`` of ``args.lora_target_names`` on ``transformer``: its family's mapping when it has
    one, else ``args.lora_target_modules`` (the Wan DiT mapping made by the argument parser)."""
    family = claiming_family(transformer.config)
    names = getattr(args, "lora_target_names", None)
    mapped = family.lora_target_modules(names) if family is not None and names else None
    return args.lora_target_modules if mapped is None else mapped


def trainable_module_parameters(transformer: nn.Module, paths: list[str]) -> list[str]:
    """Names of the parameters of the modules ``paths`` name (DiffSynth-Studio's module paths on its DiT, e.g.
    ``blocks.0.block.self_attn.q``, or ours, ``blocks.0.self_attn.to_q``); a path that names no module is a
    ``ValueError`` naming it."""
    family = claiming_family(transformer.config) or ModelFamily()
    modules = dict(transformer.named_modules())
    prefixes, unknown = [], []
    for path in paths:
        ours = path if path in modules else family.training_module_path(path)
        if ours is None or ours not in modules:
            unknown.append(path)
        elif ours not in prefixes:
            prefixes.append(ours)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise ValueError(f"--trainable_models: {shown}: no such module in {type(transformer).__name__} (module "
                         "paths in DiffSynth-Studio's layout of the model, e.g. dit.blocks.0.self_attn.q, or ours)")
    return [name for name, _ in transformer.named_parameters()
            if any(name.startswith(prefix + ".") for prefix in prefixes)]
