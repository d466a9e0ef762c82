"""Removing VRAM management: :func:`disable_vram_management` takes Diffusers' group-offloading and layerwise-casting
hooks off every module, reads disk-offloaded weights back, and puts every tensor back on its previous device and
dtype (as recorded by :func:`~.apply.enable_vram_management`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import safetensors.torch
import torch
from torch import nn

from diffusers.hooks import HookRegistry, ModelHook

from .memory import named_tensors
from .planner import VramPlan
from .strategies import CASTING_HOOKS, GROUP_OFFLOAD_HOOKS

__all__ = ["TensorRecord", "clear_disk_groups", "component_disk_dir", "disable_vram_management", "hook_registries",
           "undo_components"]

#: Where the tensors were before: ``{tensor name: (device, dtype)}`` per component.
TensorRecord = Mapping[str, tuple[torch.device, torch.dtype]]


def hook_registries(module: nn.Module) -> Iterator[tuple[nn.Module, HookRegistry]]:
    """Every submodule of ``module`` (itself included) that carries a Diffusers hook registry, with the registry."""
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None:
            yield m, registry


def component_disk_dir(root: str, name: str) -> Path:
    """The folder of component ``name``'s disk-offloaded groups under ``offload_to_disk_path``."""
    return Path(root) / name


def clear_disk_groups(folder: Path) -> None:
    """Delete our group files only: Diffusers reuses an existing file of the same name, which would be stale
    weights."""
    for f in folder.glob("group_*.safetensors"):
        f.unlink()


def _reload_disk_groups(module: nn.Module) -> None:
    """Read disk-offloaded weights back into CPU tensors (after offload they are empty placeholders)."""
    groups = {}
    for _, registry in hook_registries(module):
        hook = registry.get_hook("group_offloading")
        if hook is not None and getattr(hook.group, "offload_to_disk_path", None):
            groups[id(hook.group)] = hook.group
    for group in groups.values():
        if getattr(group, "_is_offloaded_to_disk", False) and os.path.exists(group.safetensors_file_path):
            loaded = safetensors.torch.load_file(group.safetensors_file_path, device="cpu")
            for key, tensor in group.key_to_tensor.items():
                tensor.data = loaded[key]


def _drop_empty_registry(module: nn.Module) -> None:
    registry = module._diffusers_hook
    if registry.hooks:
        return
    del module._diffusers_hook
    forward = module.__dict__.get("forward")
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.forward  # the bound class method the registry left behind


def _remove_hooks(module: nn.Module) -> None:
    for m, registry in list(hook_registries(module)):
        for name in (*GROUP_OFFLOAD_HOOKS, *CASTING_HOOKS):
            hook = registry.get_hook(name)
            if hook is None:
                continue
            if name == "layerwise_casting":
                # LayerwiseCastingHook refuses to deinitialize (its cast is lossy); dtypes are restored below
                hook.deinitalize_hook = ModelHook.deinitalize_hook.__get__(hook)
            registry.remove_hook(name, recurse=False)
        _drop_empty_registry(m)
    top = getattr(module, "_diffusers_hook", None)
    if top is not None:
        top.invalidate_child_registries_cache()


def _is_pinned(t: torch.Tensor) -> bool:
    try:
        return t.is_pinned()
    except RuntimeError:
        return False


def _undo_component(module: nn.Module, record: TensorRecord, disk_folder: Path | None) -> None:
    _reload_disk_groups(module)
    _remove_hooks(module)
    for name, t in named_tensors(module):
        if name not in record:
            continue
        device, dtype = record[name]
        data = t.data
        if data.device != device or data.dtype != dtype:
            data = data.to(device=device, dtype=dtype)
        if device.type == "cpu" and _is_pinned(data):
            data = data.clone()  # drop the page-locked staging copy of streamed offloading
        t.data = data
    if disk_folder is not None and disk_folder.exists():
        clear_disk_groups(disk_folder)
        if not any(disk_folder.iterdir()):
            disk_folder.rmdir()


def undo_components(pipe: Any, plan: VramPlan, undo: Mapping[str, TensorRecord]) -> None:
    """Undo ``plan`` on the components of ``pipe`` named in ``undo`` (``{component: tensor record}``)."""
    for name, record in undo.items():
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            c = plan.components[name]
            folder = component_disk_dir(plan.offload_to_disk_path, name) if c.disk else None
            _undo_component(module, record, folder)


def disable_vram_management(pipe: Any) -> None:
    """Undo :func:`enable_vram_management`: remove its group-offloading and layerwise-casting hooks, read
    disk-offloaded weights back (and delete their files), and put every tensor back on its previous device and dtype.

    fp8 storage is lossy: after ``resident_fp8`` / ``group_offload_fp8`` the weights are back in their dtype but keep
    the fp8 rounding (reload the component for the original values).  A no-op if VRAM management is not enabled.
    """
    plan = getattr(pipe, "_wan_vram_plan", None)
    if plan is None:
        return
    undo_components(pipe, plan, getattr(pipe, "_wan_vram_undo", None) or {})
    for attr in ("_wan_vram_plan", "_wan_vram_undo"):
        if attr in vars(pipe):
            delattr(pipe, attr)
