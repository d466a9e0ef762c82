"""VRAM management for Wan pipelines (package; being split by job)."""

from .planner import *  # noqa: F401,F403  (transitional: the split follows in the next commit)
from .planner import __all__, _CASTING_HOOKS, _GROUP_OFFLOAD_HOOKS, _fp8_skip_patterns  # noqa: F401
