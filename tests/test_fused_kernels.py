"""Our Triton kernels off the GPU: the fused q/k RMSNorm + RoPE (``ops.qk_norm_rope``) and the residual + LayerNorm +
modulation kernel (``ops.layer_norm_mod``) against the stock expressions under ``TRITON_INTERPRET=1`` (subprocess),
the processor / block forward that use them inside a Wan transformer, and a full Triton
compile of every kernel to sm_90 machine code (the interpreter does not type-check like the compiler does).
Skipped, with the reason, when Triton is not importable."""

from __future__ import annotations


import pytest
import torch

from diffusers_wan_ext.ops import layer_norm_mod
from diffusers_wan_ext.ops import qk_norm_rope as qk_mod
from diffusers_wan_ext.vae import norm_kernel as vae_norm
from helpers import run_interpreted

needs_triton = pytest.mark.skipif(qk_mod.triton is None, reason="triton is not importable")

_QK_SCRIPT = r"""
import torch
from diffusers import WanTransformer3DModel
from diffusers_wan_ext.ops.qk_norm_rope import _head_groups, qk_norm_rope, qk_norm_rope_reference
from diffusers_wan_ext.runtime import optimize_transformer

assert _head_groups(40) == (32, 8, 0) and _head_groups(12) == (8, 4, 0) and _head_groups(15) == (16, 0, 0)
cases = 0
for batch, tokens, heads, head_dim, cos_batch in ((1, 37, 12, 16, 1), (2, 9, 3, 8, 1), (2, 5, 15, 4, 2),
                                                  (1, 3, 40, 8, 1)):
    g = torch.Generator().manual_seed(cases)
    dim = heads * head_dim
    qkv = torch.randn(batch, tokens, 3 * dim, generator=g)
    wq, wk = torch.rand(dim, generator=g) + 0.5, torch.rand(dim, generator=g) + 0.5
    ang = torch.rand(cos_batch, tokens, 1, head_dim // 2, generator=g) * 6
    cos, sin = torch.cos(ang).repeat_interleave(2, -1), torch.sin(ang).repeat_interleave(2, -1)
    rq, rk = qk_norm_rope_reference(qkv, wq, wk, cos, sin, 1e-6, heads)
    rv = qkv[..., 2 * dim:].unflatten(2, (heads, -1))
    for heads_first in (False, True):
        q, k, v = qk_norm_rope(qkv, wq, wk, cos, sin, 1e-6, heads, heads_first=heads_first)
        assert q.shape == rq.shape and k.shape == rk.shape and v.shape == rv.shape
        lay = (lambda t: t.permute(0, 2, 1, 3)) if heads_first else (lambda t: t)
        assert lay(q).is_contiguous() and lay(k).is_contiguous()
        torch.testing.assert_close(q, rq, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, rk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, rv, rtol=0, atol=0)
        cases += 1

import diffusers_wan_ext.ops.qk_norm_rope as qk_mod

launches = []
_launch = qk_mod._launch
qk_mod._launch = lambda *a: launches.append(1) or _launch(*a)  # the processor must really run the kernel
torch.manual_seed(0)
model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                              rope_max_seq_len=64).eval()
x, t, ctx = torch.randn(2, 4, 3, 8, 8), torch.tensor([500.0, 20.0]), torch.randn(2, 7, 32)
with torch.no_grad():
    ref = model(x, t, ctx, return_dict=False)[0]
    for backend in ("native", "_native_math"):
        report = optimize_transformer(model, compile=False, attention=backend, verbose=False)
        assert report["fused_qk_rope"] == 2, report
        out = model(x, t, ctx, return_dict=False)[0]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        cases += 1
assert len(launches) == 4, launches  # 2 layers x 2 backends
# with gradients recorded the processor takes the stock path (the kernel has no backward): training still works
out = model(x, t, ctx, return_dict=False)[0]
out.float().pow(2).mean().backward()
assert model.blocks[0].attn1.to_qkv.weight.grad is not None and len(launches) == 4
print("ok", cases)
"""


@needs_triton
def test_qk_norm_rope_kernel_and_processor_under_interpreter():
    run_interpreted(_QK_SCRIPT, "ok 10")


_LN_SCRIPT = r"""
import torch
from diffusers import WanTransformer3DModel
import diffusers_wan_ext.ops.layer_norm_mod as L
from diffusers_wan_ext.runtime import optimize_transformer

assert L._column_groups(5120) == (4096, 1024, 0) and L._column_groups(1536) == (1024, 512, 0)
assert L._column_groups(3072) == (2048, 1024, 0) and L._column_groups(15) is None
cases = 0
for batch, tokens, channels in ((1, 7, 5120), (2, 5, 48), (2, 3, 1536)):
    g = torch.Generator().manual_seed(cases)
    x = (torch.randn(batch, tokens, channels, generator=g) * 3 + 1).bfloat16()
    r = torch.randn(batch, tokens, channels, generator=g).bfloat16()
    table = torch.randn(batch, 6, channels, generator=g)  # modulation chunks are strided views, as in the block
    per_token = torch.randn(batch, tokens, 6, channels, generator=g)
    w, b = torch.randn(channels, generator=g).bfloat16(), torch.randn(channels, generator=g).bfloat16()
    for args in ((None, None, table[:, 1:2], table[:, 0:1], None, None),
                 (r, table[:, 2:3], None, None, w, b),
                 (r, None, table[:, 4:5], table[:, 3:4], None, None),
                 (r, per_token[:, :, 2], per_token[:, :, 1], per_token[:, :, 0], w, b),
                 (None, None, per_token[:, :, 1].bfloat16(), table[:, 0:1], None, None)):  # mixed shapes / dtypes
        got = L.ln_modulate(x, *args, 1e-6)
        want = L.ln_modulate_reference(x, *args, 1e-6)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for u, v in zip(got, want):
            assert u.shape == v.shape and u.dtype == v.dtype and u.is_contiguous()
            # the interpreter rounds fp32 -> bf16 by truncation: a new residual one bf16 ulp off moves its
            # normalised row by up to ~ulp(x) / std; on average the outputs agree to far below that
            torch.testing.assert_close(u.float(), v.float(), rtol=2 ** -7, atol=0.1)
            assert (u.float() - v.float()).abs().mean() < 2 ** -8 * v.float().abs().mean()
        cases += 1

launches = []
_launch = L._launch
L._launch = lambda *a: launches.append(1) or _launch(*a)  # the block must really run the kernel
torch.manual_seed(0)
model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                              rope_max_seq_len=64).eval().to(torch.bfloat16)
x, ctx = torch.randn(2, 4, 3, 8, 8).bfloat16(), torch.randn(2, 7, 32).bfloat16()
with torch.no_grad():
    for t in (torch.tensor([500.0, 20.0]), torch.rand(2, 48) * 1000):  # per-sample, then per-token (TI2V) timesteps
        ref = model(x, t, ctx, return_dict=False)[0]
        report = optimize_transformer(model, compile=False, verbose=False)
        assert report["fused_norms"] == 2, report
        out = model(x, t, ctx, return_dict=False)[0]
        torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
        cases += 1
        for blk in model.blocks:
            del blk.forward
assert len(launches) == 12, launches  # 3 per block, 2 blocks, 2 timestep layouts
out = model(x, torch.tensor([500.0, 20.0]), ctx, return_dict=False)[0]  # stock again after removing the patch
assert len(launches) == 12
print("ok", cases)
"""


@needs_triton
def test_layer_norm_mod_kernel_and_block_under_interpreter():
    run_interpreted(_LN_SCRIPT, "ok 17")


def test_layer_norm_mod_falls_back_on_cpu_and_validates():
    x, r = torch.randn(1, 4, 24), torch.randn(1, 4, 24)
    sc, sh = torch.randn(1, 1, 24), torch.randn(1, 1, 24)
    out = layer_norm_mod.ln_modulate(x, r, None, sc, sh, None, None, 1e-6)  # CPU, no interpreter: the reference
    want = layer_norm_mod.ln_modulate_reference(x, r, None, sc, sh, None, None, 1e-6)
    assert all(torch.equal(u, v) for u, v in zip(out, want))
    with pytest.raises(ValueError, match="scale and shift"):
        layer_norm_mod.ln_modulate(x, None, None, sc, None, None, None, 1e-6)
    with pytest.raises(ValueError, match="gate needs a residual"):
        layer_norm_mod.ln_modulate(x, None, sc, None, None, None, None, 1e-6)


def test_qk_norm_rope_falls_back_on_cpu_and_validates():
    """Off CUDA (no interpreter) the stock expression runs; bad shapes are refused with what was passed."""
    qkv = torch.randn(1, 5, 3 * 24)
    w = torch.ones(24)
    cos = sin = torch.ones(1, 5, 1, 8)
    q, k, v = qk_mod.qk_norm_rope(qkv, w, w, cos, sin, 1e-6, 3)  # CPU without the interpreter: stock expression
    rq, rk = qk_mod.qk_norm_rope_reference(qkv, w, w, cos, sin, 1e-6, 3)
    assert torch.equal(q, rq) and torch.equal(k, rk) and v.shape == (1, 5, 3, 8)
    with pytest.raises(ValueError, match="divisible into 5 heads"):
        qk_mod.qk_norm_rope(qkv, w, w, cos, sin, 1e-6, 5)


def _compile_sm90(fn, signature: dict, constexprs: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))


@needs_triton
@pytest.mark.parametrize("groups", [(32, 8, 0), (8, 4, 0), (16, 0, 0), (8, 4, 2)])
def test_qk_kernel_compiles_for_hopper(groups):
    ints = ["n_rows", "tokens", "heads", "dim", "row_stride", "out_sel", "out_b", "out_n", "out_h", "cos_b", "cos_n"]
    sig = {"qkv_ptr": "*bf16", "w_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16",
           **{n: "i32" for n in ints}, "eps": "fp32"}
    ha, hb, hc = groups
    consts = {"HA": ha, "HB": hb, "HC": hc, "HEAD_DIM": 128, "ROWS": 2}
    sig.update({k: "constexpr" for k in consts})
    kernel = _compile_sm90(qk_mod._qk_norm_rope_kernel, sig, consts)
    assert "cubin" in kernel.asm


@needs_triton
@pytest.mark.parametrize("silu,bias", [(True, False), (False, True)])
def test_vae_norm_kernel_compiles_for_hopper(silu, bias):
    ints = ["n_pix", "C", "T", "H", "W", "xs_b", "xs_c", "xs_t", "xs_h", "xs_w", "os_b", "os_c", "os_t", "os_h",
            "os_w"]
    sig = {"x_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*bf16", **{n: "i64" for n in ints},
           "eps": "fp32"}
    consts = {"HAS_BIAS": bias, "SILU": silu, "BLOCK_P": 64, "BLOCK_C": 128}
    sig.update({k: "constexpr" for k in consts})
    kernel = _compile_sm90(vae_norm._rms_norm_act_kernel, sig, consts)
    assert "cubin" in kernel.asm


@needs_triton
@pytest.mark.parametrize("flags", [(False, False, True, False), (True, True, False, True), (True, False, True, False),
                                   (True, True, True, True)])
@pytest.mark.parametrize("groups", [(4096, 1024, 0), (1024, 512, 0), (2048, 1024, 256)])
def test_layer_norm_mod_kernel_compiles_for_hopper(flags, groups):
    ints = ["n_rows", "tokens", "C", "g_sb", "g_sn", "m_sb", "m_sn"]
    ptrs = {"x_ptr": "*bf16", "r_ptr": "*bf16", "g_ptr": "*fp32", "sc_ptr": "*fp32", "sh_ptr": "*fp32",
            "w_ptr": "*bf16", "b_ptr": "*bf16", "h_ptr": "*bf16", "y_ptr": "*bf16"}
    sig = {**ptrs, **{n: "i32" for n in ints}, "eps": "fp32"}
    res, gate, mod, affine = flags
    consts = {"CA": groups[0], "CB": groups[1], "CC": groups[2], "HAS_RES": res, "HAS_GATE": gate, "HAS_MOD": mod,
              "HAS_AFFINE": affine, "ROWS": 2}
    sig.update({k: "constexpr" for k in consts})
    kernel = _compile_sm90(layer_norm_mod._ln_mod_kernel, sig, consts)
    assert "cubin" in kernel.asm
