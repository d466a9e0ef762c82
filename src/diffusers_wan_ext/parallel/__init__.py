"""Multi-GPU inference for Wan pipelines: sequence parallel (Diffusers' Ulysses / Ring context parallelism) and CFG
parallel.  See :func:`enable_parallelism` and docs/parallel.md.

Example:
    >>> # torchrun --nproc_per_node=4 examples/parallel/generate.py --model converted/Wan2.1-T2V-1.3B
    >>> from diffusers_wan_ext.parallel import enable_parallelism, init_distributed  # doctest: +SKIP
"""

from .context import (
    ParallelState,
    choose_degrees,
    enable_parallelism,
    init_distributed,
    supports_cfg_parallel,
    supports_sequence_parallel,
)
from .padding import TokenPadState, apply_token_padding, remove_token_padding
from .plans import (
    DEFAULT_SELF_ATTENTION_MODULES,
    cp_plan_for,
    register_cp_plan,
    self_attention_patterns,
)

__all__ = [
    "DEFAULT_SELF_ATTENTION_MODULES",
    "ParallelState",
    "TokenPadState",
    "apply_token_padding",
    "choose_degrees",
    "cp_plan_for",
    "enable_parallelism",
    "init_distributed",
    "register_cp_plan",
    "remove_token_padding",
    "self_attention_patterns",
    "supports_cfg_parallel",
    "supports_sequence_parallel",
]
