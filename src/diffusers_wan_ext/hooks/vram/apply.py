"""Applying a VRAM plan: :func:`enable_vram_management` plans (:func:`~.planner.plan_vram`) and installs the plan
with Diffusers' own hooks -- group offloading (``diffusers.hooks.apply_group_offloading``, CUDA-stream prefetching,
optional disk offload) and layerwise casting (``apply_layerwise_casting``: weights stored in float8, computed in
bf16).  Nothing here offloads by itself."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch
from torch import nn

from diffusers.hooks import apply_group_offloading, apply_layerwise_casting
from diffusers.utils import logging

from .memory import fp8_skip_patterns, module_tensors, named_tensors, quantized_layer_names
from .planner import ComponentPlan, VramPlan, pipeline_components, plan_vram, resolve_vram_limit
from .strategies import CASTING_HOOKS, FP8_DTYPE, GROUP_OFFLOAD_HOOKS
from .undo import (
    TensorRecord,
    clear_disk_groups,
    component_disk_dir,
    disable_vram_management,
    hook_registries,
    undo_components,
)

__all__ = ["enable_vram_management"]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name


def _check_unmanaged(name: str, module: nn.Module) -> None:
    if any(getattr(m, "_hf_hook", None) is not None for m in module.modules()):
        raise ValueError(
            f"{name} has Accelerate offloading hooks (enable_model_cpu_offload / enable_sequential_cpu_offload): call "
            "pipe.remove_all_hooks() first -- enable_vram_management replaces them"
        )
    for _, registry in hook_registries(module):
        present = [h for h in (*GROUP_OFFLOAD_HOOKS, *CASTING_HOOKS) if registry.get_hook(h) is not None]
        if present:
            raise ValueError(
                f"{name} already has Diffusers {present[0]} hooks (enable_group_offload / enable_layerwise_casting): "
                "reload the component or leave its placement to enable_vram_management, not both"
            )
    if any(t.device.type == "meta" for t in module_tensors(module).values()):
        raise ValueError(f"{name} has weights on the meta device: load them first (plan_vram works on meta modules)")


def _apply_fp8_storage(module: nn.Module, compute_dtype: torch.dtype) -> None:
    """fp8 layerwise casting of ``module``; layers already quantized (GGUF / fp8) are skipped: casting their packed
    weights would corrupt them, and they are already small."""
    quantized = quantized_layer_names(module)
    if quantized:
        logger.info(f"fp8 storage: skipping {len(quantized)} layer(s) already quantized (GGUF / fp8), e.g. "
                    f"{quantized[0]!r}: their weights stay as loaded")
        patterns = fp8_skip_patterns(module) + tuple(f"^{re.escape(n)}$" for n in quantized)
        apply_layerwise_casting(module, FP8_DTYPE, compute_dtype, skip_modules_pattern=patterns)
    elif hasattr(module, "enable_layerwise_casting"):
        module.enable_layerwise_casting(storage_dtype=FP8_DTYPE, compute_dtype=compute_dtype)
    else:
        apply_layerwise_casting(module, FP8_DTYPE, compute_dtype, skip_modules_pattern=fp8_skip_patterns(module))


def _apply_group_offload(module: nn.Module, c: ComponentPlan, device: torch.device, use_stream: bool,
                         disk_path: str | None, low_cpu_mem_usage: bool) -> None:
    """Group offloading on ``c.block_root``; the component's tensors outside it move to ``device``."""
    root = module.get_submodule(c.block_root)
    in_root = module_tensors(root)
    for t in module_tensors(module).values():
        if id(t) not in in_root:
            t.data = t.data.to(device)
    folder = None
    if c.disk:
        folder = component_disk_dir(disk_path, c.name)
        folder.mkdir(parents=True, exist_ok=True)
        clear_disk_groups(folder)
    kwargs = dict(
        onload_device=device, offload_device=torch.device("cpu"), offload_type=c.offload_type,
        num_blocks_per_group=c.num_blocks_per_group, use_stream=use_stream, low_cpu_mem_usage=low_cpu_mem_usage,
        offload_to_disk_path=os.fspath(folder) if folder is not None else None,
    )
    if hasattr(root, "enable_group_offload"):
        root.enable_group_offload(**kwargs)
    else:
        apply_group_offloading(root, **kwargs)


def _apply_component(module: nn.Module, c: ComponentPlan, device: torch.device, use_stream: bool,
                     disk_path: str | None, low_cpu_mem_usage: bool) -> dict[str, tuple[torch.device, torch.dtype]]:
    """Apply ``c`` to ``module``; returns where its tensors were (for the undo)."""
    record = {n: (t.device, t.dtype) for n, t in named_tensors(module)}
    if c.fp8:
        _apply_fp8_storage(module, c.compute_dtype)
    if c.offload_type is None:
        module.to(device)
    else:
        _apply_group_offload(module, c, device, use_stream, disk_path, low_cpu_mem_usage)
    return record


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _apply_plan(pipe: Any, plan: VramPlan, modules: Mapping[str, nn.Module], device: torch.device, use_stream: bool,
                low_cpu_mem_usage: bool) -> dict[str, TensorRecord]:
    """Apply every component of ``plan``; on a failure, undo what was applied and re-raise."""
    undo: dict[str, TensorRecord] = {}
    # offloaded components first: they leave the device before resident ones arrive
    for name in sorted(plan.components, key=lambda n: plan.components[n].offload_type is None):
        try:
            undo[name] = _apply_component(modules[name], plan.components[name], device, use_stream,
                                          plan.offload_to_disk_path, low_cpu_mem_usage=low_cpu_mem_usage)
        except Exception:
            undo[name] = {}
            undo_components(pipe, plan, undo)
            raise
    return undo


def enable_vram_management(
    pipe: Any,
    vram_limit: float | str = "auto",
    *,
    device: torch.device | str | None = None,
    height: int = 480,
    width: int = 832,
    num_frames: int = 81,
    batch_size: int = 1,
    cfg_batched: bool | None = None,
    dtype: torch.dtype | None = None,
    allow_fp8: bool = True,
    offload_to_disk_path: str | os.PathLike | None = None,
    cpu_ram_limit: float | None = None,
    overrides: Mapping[str, str] | None = None,
    sliding_window_size: int | None = None,
    verbose: bool = True,
) -> VramPlan:
    """Plan (:func:`plan_vram`) and apply VRAM management to a Wan pipeline; returns the plan.

    Resident components are moved to ``device``; the others get Diffusers group offloading (block level on their
    block list, leaf level for the VAE; CUDA-stream prefetching on CUDA, none elsewhere) and/or fp8 layerwise
    casting.  ``pipe._execution_device`` stays ``device``.  Calling it again re-plans (the previous plan is undone
    first); :func:`disable_vram_management` undoes it.  The plan is kept as ``pipe._wan_vram_plan``.

    Args:
        pipe: a Wan pipeline (stock ``WanPipeline`` / ``WanImageToVideoPipeline`` / ``WanVACEPipeline`` or ours).
        vram_limit: GiB, ``"8gb"`` / ``"24gb"`` / ``"80gb"`` (:data:`VRAM_PRESETS`) or ``"auto"`` (free CUDA memory).
        device: where to compute (default: the current CUDA device, else CPU).
        height, width, num_frames, batch_size, cfg_batched, dtype, allow_fp8, offload_to_disk_path, cpu_ram_limit,
            overrides, sliding_window_size: see :func:`plan_vram`; plan for the largest generation you will run
            (``sliding_window_size``: the window of the calls, in latent frames -- activations follow the window).
        verbose: log the plan table as a warning (else at debug level).

    Example:
        >>> plan = enable_vram_management(pipe, "8gb")  # doctest: +SKIP
        >>> plan.strategies  # doctest: +SKIP
        {'transformer': 'resident_fp8', 'vae': 'resident', 'text_encoder': 'group_offload'}
        >>> plan = enable_vram_management(pipe, 24, overrides={"transformer": "group_offload"})  # doctest: +SKIP
    """
    if not hasattr(pipe, "components"):
        raise TypeError(f"enable_vram_management takes a Diffusers pipeline, got {type(pipe).__name__}")
    if getattr(pipe, "_wan_vram_plan", None) is not None:
        disable_vram_management(pipe)
    device = _default_device(device)
    use_stream = device.type == "cuda"
    modules = pipeline_components(pipe)
    for name, module in modules.items():
        _check_unmanaged(name, module)
    limit = resolve_vram_limit(vram_limit, device, modules)
    plan = plan_vram(
        pipe, limit, height=height, width=width, num_frames=num_frames, batch_size=batch_size,
        cfg_batched=cfg_batched, dtype=dtype, allow_fp8=allow_fp8, offload_to_disk_path=offload_to_disk_path,
        cpu_ram_limit=cpu_ram_limit, overrides=overrides, use_stream=use_stream,
        sliding_window_size=sliding_window_size,
    )
    undo = _apply_plan(pipe, plan, modules, device, use_stream, low_cpu_mem_usage=cpu_ram_limit is not None)
    pipe._wan_vram_plan = plan
    pipe._wan_vram_undo = undo
    (logger.warning if verbose else logger.debug)(f"diffusers_wan_ext: VRAM management\n{plan}")
    return plan
