"""The one place that imports Triton for our kernels and decides where they run.

Triton ships with CUDA builds of PyTorch; CPU builds usually lack it, and then every kernel module falls back to its
PyTorch reference. With ``TRITON_INTERPRET=1`` (set before Triton is imported) the kernels also run on CPU tensors,
which is how the test suite checks them without a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = ["interpreting", "tl", "triton", "triton_available", "uses_triton"]


def triton_available() -> bool:
    """True when Triton is importable (the kernels then run on CUDA tensors, or on CPU under ``TRITON_INTERPRET=1``)."""
    return triton is not None


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def uses_triton(x: torch.Tensor) -> bool:
    """True when our Triton kernels run for tensors on ``x``'s device."""
    return triton is not None and (x.is_cuda or (x.device.type == "cpu" and interpreting()))
