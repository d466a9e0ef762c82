"""Diffusers hooks for Wan transformers (step caching)."""

from .teacache import TEACACHE_COEFFICIENTS, TeaCacheConfig, apply_teacache, enable_teacache, remove_teacache, teacache_log

__all__ = ["TEACACHE_COEFFICIENTS", "TeaCacheConfig", "apply_teacache", "enable_teacache", "remove_teacache", "teacache_log"]
