"""Peak memory of a Wan VAE decode, counted on the meta device (no GPU, no weights read).

:func:`estimate_decode_peak` builds a meta copy of an ``AutoencoderKLWan`` from its config, runs ``decode`` -- the
fast one of :func:`~.fast_decode.optimize_vae` or stock -- under a ``TorchDispatchMode`` that tracks every storage
the ops allocate while it is alive, and reports the peak. The module docstring of :mod:`.fast_decode` explains what
is alive at the peak of each path (Wan2.1 at 480x832x81 in bf16: about 3.2 GiB fast, 4.2 GiB stock).

Example:
    >>> estimate_decode_peak(pipe.vae, (1, 16, 21, 60, 104), torch.bfloat16)  # doctest: +SKIP
    {'peak_gib': 3.18, 'activations_gib': 2.94, 'weights_gib': 0.24}
"""

from __future__ import annotations

import torch
import torch.utils._python_dispatch
import torch.utils._pytree
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from .fast_decode import optimize_vae

__all__ = ["estimate_decode_peak"]


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of the storages that ops allocate and that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[object, int]] = {}
        self.peak = 0

    def _sweep(self) -> int:
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        return sum(n for _, n in self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live or self.live[key][0].expired():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, self._sweep())
        return out


@torch.no_grad()
def estimate_decode_peak(vae: nn.Module, latent_shape: tuple[int, ...], dtype: torch.dtype | None = None,
                         fast: bool = True) -> dict:
    """Peak memory of ``vae.decode`` on a latent of ``latent_shape`` (B, z_dim, T, h, w), counted on the meta device.

    Builds a meta copy of the VAE from its config (no weights are read or copied), runs the decode (the fast one of
    :func:`optimize_vae` when ``fast``, else stock) and counts every storage the ops allocate while it is alive.
    Returns ``{"peak_gib", "activations_gib", "weights_gib"}``: ``peak = weights + input latent + the activations'
    peak``. Not counted: cuDNN / attention workspaces and the caching allocator's rounding, so a GPU's
    ``max_memory_allocated`` is somewhat higher. The Triton norm is counted as writing its output only (no
    temporaries), as on CUDA.
    """
    dtype = dtype or next(vae.parameters()).dtype
    with torch.device("meta"):
        meta = nn.Module.to(type(vae).from_config(vae.config), dtype).eval()  # (ModelMixin.to warns on casts)
        z = torch.empty(latent_shape, dtype=dtype)
    if fast:
        optimize_vae(meta, fuse_norm_act=False)
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    with _LiveBytes() as counter:
        out = meta.decode(z, return_dict=False)[0]
    del out
    gib = 1024 ** 3
    activations = counter.peak + z.numel() * z.element_size()
    return {"peak_gib": (weights + activations) / gib, "activations_gib": activations / gib,
            "weights_gib": weights / gib}
