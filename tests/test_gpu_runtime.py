"""GPU checks of the runtime kernels (skipped without CUDA): the Triton attention and flash-attn 4 (when installed)
against fp32 SDPA, and the fused GELU GEMM against the stock FFN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(s=1037, h=3, d=128):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(2, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]


def _ref(q, k, v):
    return F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def test_triton_attention_matches_fp32():
    pytest.importorskip("triton")
    from diffusers_wan_ext.ops.attention_triton import attention_bshd

    q, k, v = _qkv()
    ref = _ref(q, k, v)
    out = attention_bshd(q, k, v)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_flash4_matches_fp32_when_installed():
    from diffusers_wan_ext.runtime.flash4 import flash4_unavailable_reason, flash_attn4

    reason = flash4_unavailable_reason("cuda", torch.bfloat16)
    if reason:
        pytest.skip(f"flash-attn 4 {reason}")
    q, k, v = _qkv()
    ref = _ref(q, k, v)
    assert ((flash_attn4(q, k, v).float() - ref).norm() / ref.norm()).item() < 1e-2


def test_fused_gelu_gemm_matches_stock():
    from diffusers_wan_ext.runtime.speed import linear_gelu_tanh

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 77, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(96, 64, device="cuda", dtype=torch.bfloat16, generator=g) / 8
    b = torch.randn(96, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    out = linear_gelu_tanh(x, w, b).float()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ CUDA GPUs")
def test_parallel_ring_and_hybrid(tmp_path):
    """Ring (and, on 4+ GPUs, Ulysses x Ring) context parallel over NCCL equals the one-GPU bf16 output."""
    from test_parallel import launch

    n = 4 if torch.cuda.device_count() >= 4 else 2
    for r, res in enumerate(launch("gpu_layouts", n, tmp_path)):
        assert {"ring", "ulysses_padded"} <= set(res), res
        for name, d in res.items():
            assert d < 3e-2, f"rank {r}: {name} differs from the one-GPU output by {d}"
