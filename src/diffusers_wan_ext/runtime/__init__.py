"""Runtime options for Wan pipelines: attention backend selection (:mod:`.attention`, :mod:`.flash4`), the opt-in
FlashAttention-3 fp8 self-attention (:mod:`.flash3_fp8`) and the fast defaults (:mod:`.speed`);
:func:`optimize_vae` / :func:`restore_vae` are re-exported from :mod:`diffusers_wan_ext.vae.fast_decode`."""

from .attention import (
    ATTENTION_PREFERENCE,
    AttentionChoice,
    attention_backend_report,
    available_attention_backends,
    reset_attention_backend,
    select_attention_backend,
    set_attention_backend,
)
from .flash3_fp8 import FLASH3_FP8_BACKEND, flash3_fp8_unavailable_reason
from .speed import optimize_transformer
from ..vae import optimize_vae, restore_vae

__all__ = [
    "optimize_transformer",
    "optimize_vae",
    "restore_vae",
    "ATTENTION_PREFERENCE",
    "AttentionChoice",
    "attention_backend_report",
    "available_attention_backends",
    "reset_attention_backend",
    "select_attention_backend",
    "set_attention_backend",
    "FLASH3_FP8_BACKEND",
    "flash3_fp8_unavailable_reason",
]
