"""SageAttention 2 behind Diffusers' ``sage`` backend, traceable by ``torch.compile(fullgraph=True)``.

Diffusers 0.42's ``sage`` backend calls ``sageattention.sageattn`` (2.x API: ``tensor_layout="NHD"``, ``sm_scale``,
``return_lse``) directly. sageattention 2.x quantizes q / k / v with pybind11 kernels (``sageattention._fused``) and
reads the GPU's compute capability on every call, which Dynamo cannot trace, so a regionally compiled transformer
(:func:`~diffusers_wan_ext.runtime.optimize_transformer`, ``compile_repeated_blocks(fullgraph=True)``) would fail on
its first forward. :func:`register_traceable_sage` puts the same call behind a ``torch.library`` custom op (one
opaque node) in the backend's registry slot. Calls that ask for the log-sum-exp or run under context parallelism
keep Diffusers' own function.
"""

from __future__ import annotations

import torch

#: Diffusers' own ``sage`` backend function, kept for the calls the op does not serve
_DIFFUSERS_SAGE: dict = {}


@torch.library.custom_op("diffusers_wan_ext::sageattn", mutates_args=())
def sageattn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                scale: float | None = None) -> torch.Tensor:
    """``sageattention.sageattn`` on ``(batch, seq, heads, head_dim)`` tensors (output in the same layout)."""
    from sageattention import sageattn

    out = sageattn(q, k, v, tensor_layout="NHD", is_causal=is_causal, sm_scale=scale)
    return out.contiguous()  # head dims padded by sageattn come back as a slice


@sageattn_op.register_fake
def _(q, k, v, is_causal=False, scale=None):
    return q.new_empty(q.shape)


def _sage_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: torch.Tensor | None = None, is_causal: bool = False, scale: float | None = None,
                    return_lse: bool = False, _parallel_config=None):
    """Diffusers' ``sage`` backend function, through :func:`sageattn_op` when no lse / context parallelism is asked."""
    if attn_mask is not None:
        raise ValueError("`attn_mask` is not supported for sage attention")
    if return_lse or _parallel_config is not None:
        return _DIFFUSERS_SAGE["fn"](query=query, key=key, value=value, attn_mask=attn_mask, is_causal=is_causal,
                                     scale=scale, return_lse=return_lse, _parallel_config=_parallel_config)
    return sageattn_op(query, key, value, is_causal, scale)


def register_traceable_sage() -> None:
    """Points Diffusers' ``sage`` backend at :func:`_sage_attention` (same constraints, context-parallel capable as
    before); calling it again does nothing."""
    from diffusers.models import attention_dispatch as ad

    name = ad.AttentionBackendName.SAGE
    registry = ad._AttentionBackendRegistry
    current = registry._backends.get(name)
    if current is _sage_attention:
        return
    _DIFFUSERS_SAGE["fn"] = current
    supports_cp = name.value in getattr(registry, "_supports_context_parallel", set())
    registry.register(name, constraints=registry._constraints.get(name), supports_context_parallel=supports_cp)(
        _sage_attention)
