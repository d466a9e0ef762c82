"""Diffusers hooks for Wan transformers (sliding windows, step caching, VRAM management, block-causal KV cache for streaming)."""

from .block_causal import (
    WanBlockCausalAttnProcessor,
    WanCachedCrossAttnProcessor,
    WanKVCache,
    block_causal_mask,
    disable_block_causal_cache,
    enable_block_causal_cache,
)

from .sliding_window import (
    SlidingWindowSchedule,
    WindowSchedule,
    apply_sliding_window,
    register_sliding_window_inputs,
    remove_sliding_window,
    sliding_windows,
)
from .teacache import TEACACHE_COEFFICIENTS, TeaCacheConfig, apply_teacache, enable_teacache, remove_teacache, teacache_log
from .vram import (
    STRATEGIES,
    VRAM_PRESETS,
    ComponentPlan,
    VramPlan,
    disable_vram_management,
    enable_vram_management,
    plan_vram,
    resolve_vram_limit,
)

__all__ = ["SlidingWindowSchedule", "WindowSchedule", "apply_sliding_window", "register_sliding_window_inputs",
           "remove_sliding_window", "sliding_windows",
           "TEACACHE_COEFFICIENTS", "TeaCacheConfig", "apply_teacache", "enable_teacache", "remove_teacache", "teacache_log",
           "STRATEGIES", "VRAM_PRESETS", "ComponentPlan", "VramPlan", "disable_vram_management",
           "enable_vram_management", "plan_vram", "resolve_vram_limit",
           "WanBlockCausalAttnProcessor", "WanCachedCrossAttnProcessor", "WanKVCache", "block_causal_mask",
           "disable_block_causal_cache", "enable_block_causal_cache"]
