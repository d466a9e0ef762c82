"""Runtime options for Wan pipelines: attention backend selection (:mod:`.attention`)."""

from .attention import (
    ATTENTION_PREFERENCE,
    AttentionChoice,
    attention_backend_report,
    available_attention_backends,
    reset_attention_backend,
    select_attention_backend,
    set_attention_backend,
)

__all__ = [
    "ATTENTION_PREFERENCE",
    "AttentionChoice",
    "attention_backend_report",
    "available_attention_backends",
    "reset_attention_backend",
    "select_attention_backend",
    "set_attention_backend",
]
