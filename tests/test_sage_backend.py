"""Diffusers' ``sage`` backend through our custom op (``runtime/sage.py``): sageattention 2.x's call, traceable by
``torch.compile(fullgraph=True)``. CPU, with a stand-in ``sageattention`` module whose ``sageattn`` Dynamo could not
trace (a ``torch.compiler.disable``'d step stands for the real one's pybind11 quantization kernels)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers.models import attention_dispatch as ad

from diffusers_wan_ext.runtime.sage import register_traceable_sage

CALLS: list[dict] = []


@torch.compiler.disable
def untraceable_step(q):
    return q


def fake_sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
    q = untraceable_step(q)
    CALLS.append(dict(tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=sm_scale,
                                         is_causal=is_causal)
    return out.transpose(1, 2)


@pytest.fixture
def fake_sage(monkeypatch):
    module = types.ModuleType("sageattention")
    module.sageattn = fake_sageattn
    monkeypatch.setitem(sys.modules, "sageattention", module)
    monkeypatch.setattr(ad, "sageattn", fake_sageattn, raising=False)  # what Diffusers imported at its import
    registry = ad._AttentionBackendRegistry
    name = ad.AttentionBackendName.SAGE
    for table in (registry._backends, registry._constraints, registry._supported_arg_names):
        monkeypatch.setitem(table, name, table[name])  # restored after the test
    CALLS.clear()
    return name


def test_stand_in_is_untraceable_through_diffusers_own_function(fake_sage):
    q = torch.randn(1, 16, 2, 8)
    eager = ad.dispatch_attention_fn(q, q, q, backend=fake_sage)  # Diffusers' own function runs eagerly
    torch.testing.assert_close(eager, fake_sageattn(q, q, q, "NHD"))
    attend = torch.compile(lambda q: ad.dispatch_attention_fn(q, q, q, backend=fake_sage), fullgraph=True,
                           backend="eager")
    with pytest.raises(Exception):  # noqa: B017 - Dynamo's Unsupported error, whatever its class in this torch
        attend(q)
    torch._dynamo.reset()


def test_sage_backend_goes_through_the_op_and_compiles_fullgraph(fake_sage):
    original = ad._AttentionBackendRegistry._backends[fake_sage]
    register_traceable_sage()
    register_traceable_sage()  # idempotent: Diffusers' function stays the fallback
    assert ad._AttentionBackendRegistry._backends[fake_sage] is not original
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))  # (batch, seq, heads, head_dim)
    ref = fake_sageattn(q, k, v, "NHD")
    CALLS.clear()

    def attend(q, k, v):
        return ad.dispatch_attention_fn(q, k, v, scale=0.25, backend=fake_sage)

    eager = attend(q, k, v)
    assert CALLS == [dict(tensor_layout="NHD", is_causal=False, sm_scale=0.25)]
    assert not torch.allclose(eager, ref)  # scale 0.25 was passed through (ref used the default)
    torch.testing.assert_close(eager, fake_sageattn(q, k, v, "NHD", sm_scale=0.25))
    compiled = torch.compile(attend, fullgraph=True, backend="eager")(q, k, v)
    torch.testing.assert_close(compiled, eager)
    assert len(CALLS) == 3  # eager, the reference above, and the compiled call ran the kernel


def test_sage_lse_and_masks_keep_diffusers_behaviour(fake_sage):
    register_traceable_sage()
    q = torch.randn(1, 16, 2, 8)
    with pytest.raises(ValueError, match="attn_mask"):
        ad._AttentionBackendRegistry._backends[fake_sage](q, q, q, attn_mask=torch.ones(1, 16, dtype=torch.bool))
