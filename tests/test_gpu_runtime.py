"""GPU checks of the runtime kernels (skipped without CUDA): the Triton attention and flash-attn 4 (when installed)
against fp32 SDPA, the fused GELU GEMM against the stock FFN, the fused q/k norm + RoPE kernel, the residual + LayerNorm + modulation kernel and the VAE norm
kernel against their PyTorch references, and the fast VAE decode against stock."""

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


def test_flash4_sm90_config_matches_package_default():
    """The tuned Hopper configuration (192-row tiles, three consumer warpgroups) changes the schedule, not the math:
    same key tiles, so the output equals the package default's bit for bit, for self- and cross-attention lengths."""
    from diffusers_wan_ext.runtime.flash4 import SM90_CONFIGS, _flash4_import, flash4_unavailable_reason

    reason = flash4_unavailable_reason("cuda", torch.bfloat16)
    if reason or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(f"flash-attn 4 {reason or 'SM90 configuration: needs a Hopper GPU'}")
    func = _flash4_import()[0]
    for sq, sk in ((1037, 1037), (777, 512)):
        q = _qkv(sq)[0]
        k, v = _qkv(sk)[1:]
        tuned = func(q, k, v, None, False, SM90_CONFIGS[128])
        default = func(q, k, v, None, False, None)
        tuned, default = (o[0] if isinstance(o, tuple) else o for o in (tuned, default))
        assert torch.equal(tuned, default)


def test_fused_gelu_gemm_matches_stock():
    from diffusers_wan_ext.runtime.speed import linear_gelu_tanh

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 77, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(96, 64, device="cuda", dtype=torch.bfloat16, generator=g) / 8
    b = torch.randn(96, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    out = linear_gelu_tanh(x, w, b).float()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


def test_qk_norm_rope_kernel_matches_reference():
    pytest.importorskip("triton")
    from diffusers_wan_ext.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    for heads in (12, 40, 15):
        dim = heads * 128
        qkv = torch.randn(2, 301, 3 * dim, device="cuda", dtype=torch.bfloat16, generator=g)
        wq, wk = (torch.rand(dim, device="cuda", generator=g).bfloat16() + 0.5 for _ in range(2))
        ang = torch.rand(1, 301, 1, 64, device="cuda", generator=g) * 6
        cos, sin = torch.cos(ang).repeat_interleave(2, -1), torch.sin(ang).repeat_interleave(2, -1)
        rq, rk = qk_norm_rope_reference(qkv.float(), wq.float(), wk.float(), cos, sin, 1e-6, heads)
        for heads_first in (False, True):
            q, k, v = qk_norm_rope(qkv, wq, wk, cos, sin, 1e-6, heads, heads_first=heads_first)
            for got, want in ((q, rq), (k, rk)):
                assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
            assert torch.equal(v, qkv[..., 2 * dim:].unflatten(2, (heads, -1)))


def test_layer_norm_mod_kernel_matches_reference():
    """On the GPU the kernel rounds like PyTorch: equal to the stock expression up to fp32 summation order."""
    pytest.importorskip("triton")
    from diffusers_wan_ext.ops.layer_norm_mod import ln_modulate, ln_modulate_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    for channels in (5120, 1536, 3072):
        x = torch.randn(2, 301, channels, device="cuda", generator=g).mul(4).add(1).bfloat16()
        r = torch.randn(2, 301, channels, device="cuda", generator=g).bfloat16()
        mods = torch.randn(2, 6, channels, device="cuda", generator=g)
        w, b = (torch.randn(channels, device="cuda", generator=g).bfloat16() for _ in range(2))
        for args in ((None, None, mods[:, 1:2], mods[:, 0:1], None, None), (r, mods[:, 2:3], None, None, w, b),
                     (r, None, mods[:, 4:5], mods[:, 3:4], None, None)):
            got, want = ln_modulate(x, *args, 1e-6), ln_modulate_reference(x, *args, 1e-6)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            for u, v in zip(got, want):
                assert ((u.float() - v.float()).norm() / v.float().norm()).item() < 4e-3


def test_fast_vae_decode_matches_stock():
    pytest.importorskip("triton")
    from diffusers import AutoencoderKLWan

    from diffusers_wan_ext.runtime import optimize_vae

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           temperal_downsample=[False, True, True]).cuda().eval()
    z = torch.randn(1, 16, 4, 12, 16, device="cuda")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 rounding would depend on which conv algorithm cuDNN picks
    try:
        with torch.no_grad():
            ref = vae.decode(z).sample
            report = optimize_vae(vae)
            out = vae.decode(z).sample
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert report["fast_decode"] and report["norm_kernel"] == "triton", report
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ CUDA GPUs")
def test_parallel_ring_and_hybrid(tmp_path):
    """Ring (and, on 4+ GPUs, Ulysses x Ring) context parallel over NCCL equals the one-GPU bf16 output."""
    from test_parallel import launch

    n = 4 if torch.cuda.device_count() >= 4 else 2
    for r, res in enumerate(launch("gpu_layouts", n, tmp_path)):
        assert {"ring", "ulysses_padded"} <= set(res), res
        for name, d in res.items():
            assert d < 3e-2, f"rank {r}: {name} differs from the one-GPU output by {d}"
