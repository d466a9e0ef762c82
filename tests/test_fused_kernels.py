"""Our Triton kernels off the GPU: the fused q/k RMSNorm + RoPE (``ops.qk_norm_rope``) against the stock expression
under ``TRITON_INTERPRET=1`` (subprocess), the processor that uses it inside a Wan transformer, and a full Triton
compile of every kernel to sm_90 machine code (the interpreter does not type-check like the compiler does).
Skipped, with the reason, when Triton is not importable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from diffusers_wan_ext.ops import qk_norm_rope as qk_mod
from diffusers_wan_ext.ops import vae_norm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.join(ROOT, "src"))
    proc = subprocess.run([sys.executable, "-c", _QK_SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ok 10" in proc.stdout, proc.stdout


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
