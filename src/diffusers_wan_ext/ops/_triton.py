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

__all__ = ["interpreting", "pow2_groups", "tl", "triton", "triton_available", "uses_triton"]


def triton_available() -> bool:
    """True when Triton is importable (the kernels then run on CUDA tensors, or on CPU under ``TRITON_INTERPRET=1``)."""
    return triton is not None


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def uses_triton(x: torch.Tensor) -> bool:
    """True when our Triton kernels run for tensors on ``x``'s device."""
    return triton is not None and (x.is_cuda or (x.device.type == "cpu" and interpreting()))


def pow2_groups(n: int, most: int = 3) -> tuple[int, ...] | None:
    """``n`` as at most ``most`` power-of-two parts, largest first, padded with zeros (40 -> (32, 8, 0)); None when
    it needs more. Our kernels cover a row with such groups so that no lanes are masked."""
    groups = [1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1]
    return tuple(groups + [0] * (most - len(groups))) if len(groups) <= most else None
