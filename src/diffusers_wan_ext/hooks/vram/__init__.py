"""VRAM management for Wan pipelines: a budget planner on top of Diffusers hooks.

:func:`plan_vram` decides, for every module of a pipeline (``text_encoder``, ``image_encoder``, ``transformer``,
``transformer_2``, ``vae``, ...), how it is placed so that the whole generation stays within a VRAM budget;
:func:`enable_vram_management` applies that plan with Diffusers' own hooks and :func:`disable_vram_management`
removes them again.  Nothing here offloads by itself: the strategies (:data:`STRATEGIES`) are Diffusers' group
offloading (``diffusers.hooks.apply_group_offloading``, CUDA-stream prefetching, optional disk offload) and
layerwise casting (``apply_layerwise_casting``: weights stored in float8, computed in bf16).

A pipeline runs in phases (:data:`PHASES`): encode the prompt (text / image encoder), denoise (``transformer``, then
``transformer_2`` for Wan2.2 two-expert models), decode (VAE).  The package is split by job:

* :mod:`.strategies` -- the placements, roles, phases and the Diffusers hook names;
* :mod:`.memory` -- the memory model: sizes as stored, activation estimates, phase peaks of a placement;
* :mod:`.planner` -- the plan search (:func:`plan_vram`) and its result (:class:`VramPlan`);
* :mod:`.apply` -- :func:`enable_vram_management`;
* :mod:`.undo` -- :func:`disable_vram_management`.

Example:
    >>> from diffusers_wan_ext.hooks import enable_vram_management, disable_vram_management
    >>> plan = enable_vram_management(pipe, "8gb", height=480, width=832, num_frames=81)  # doctest: +SKIP
    >>> print(plan)  # doctest: +SKIP
    >>> video = pipe(prompt="...", height=480, width=832, num_frames=81).frames[0]  # doctest: +SKIP
    >>> disable_vram_management(pipe)  # doctest: +SKIP
"""

from .apply import enable_vram_management
from .memory import fp8_skip_patterns
from .planner import ComponentPlan, VramPlan, pipeline_cfg_batching, plan_vram, resolve_vram_limit
from .strategies import (
    CASTING_HOOKS,
    GROUP_OFFLOAD_HOOKS,
    PHASES,
    ROLE_PRIORITY,
    ROLE_STRATEGIES,
    STRATEGIES,
    VRAM_PRESETS,
    Strategy,
)
from .undo import disable_vram_management

__all__ = [
    "CASTING_HOOKS",
    "GROUP_OFFLOAD_HOOKS",
    "PHASES",
    "ROLE_PRIORITY",
    "ROLE_STRATEGIES",
    "STRATEGIES",
    "VRAM_PRESETS",
    "ComponentPlan",
    "Strategy",
    "VramPlan",
    "disable_vram_management",
    "enable_vram_management",
    "fp8_skip_patterns",
    "pipeline_cfg_batching",
    "plan_vram",
    "resolve_vram_limit",
]
