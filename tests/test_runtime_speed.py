"""CPU tests of the speed options: optimize_transformer / fuse_ffn_gelu / optimize_vae leave outputs unchanged,
detach cleanly, and refuse to compile models with weight-moving hooks; flash-attn 4 is reported unavailable here."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from diffusers_wan_ext.runtime import optimize_transformer, optimize_vae, restore_vae
from diffusers_wan_ext.runtime.flash4 import flash4_unavailable_reason
from diffusers_wan_ext.runtime.speed import fuse_ffn_gelu


def _tiny_dit():
    torch.manual_seed(0)
    return WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 3, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 7, 16, generator=g)


def test_optimize_transformer_keeps_outputs_and_reports():
    model = _tiny_dit()
    x, t, e = _inputs()
    with torch.no_grad():
        ref = model(x, t, e).sample
        report = optimize_transformer(model, compile=False, verbose=False)
        out = model(x, t, e).sample
    assert report == {"attention_backend": "native", "compiled": [], "fp8": False, "fused_gelu": True,
                      "fused_qkv": True, "fused_qk_rope": len(model.blocks),
                      "hopper_gemm": "model is not on a CUDA device"}
    assert all(blk.attn1.fused_projections for blk in model.blocks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fused_gelu_falls_back_on_cpu_and_on_hooked_layers():
    model = _tiny_dit()
    x, t, e = _inputs()
    with torch.no_grad():
        ref = model(x, t, e).sample
        assert fuse_ffn_gelu(model) == 2
        assert "forward" in vars(model.blocks[0].ffn.net[0])
        torch.testing.assert_close(model(x, t, e).sample, ref)  # CPU: the stock path runs
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        out = model(x, t, e).sample  # hooked projections: stock path again, no error
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_compile_is_skipped_with_weight_moving_hooks(caplog):
    model = _tiny_dit()
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    report = optimize_transformer(model, fuse_qkv=False, verbose=False)
    assert report["compiled"] == []


def test_optimize_vae_matches_stock_and_restores():
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           temperal_downsample=[False, True, True]).eval()
    z = torch.randn(1, 16, 5, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = vae.decode(z).sample
        report = optimize_vae(vae)
        out = vae.decode(z).sample
        assert {k: report[k] for k in ("channels_last", "fused_blocks", "compiled", "fast_decode")} == {
            "channels_last": True, "fused_blocks": 24, "compiled": False, "fast_decode": True}
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        restore_vae(vae)
        assert not any("forward" in vars(m) for m in vae.modules())
        torch.testing.assert_close(vae.decode(z).sample, ref, rtol=1e-4, atol=1e-4)


def test_flash4_unavailable_without_cuda():
    reason = flash4_unavailable_reason("cpu", torch.bfloat16)
    assert reason is not None and "CUDA" in reason


def _unique_storage_bytes(model):
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())


def test_fused_projections_share_storage_with_the_separate_layers():
    model = _tiny_dit()
    x, t, e = _inputs()
    with torch.no_grad():
        ref = model(x, t, e).sample
        before = _unique_storage_bytes(model)
        optimize_transformer(model, compile=False, verbose=False)
        attn1, attn2 = model.blocks[0].attn1, model.blocks[0].attn2
        assert attn1.to_k.weight.untyped_storage().data_ptr() == attn1.to_qkv.weight.untyped_storage().data_ptr()
        assert attn2.to_v.bias.untyped_storage().data_ptr() == attn2.to_kv.bias.untyped_storage().data_ptr()
        assert _unique_storage_bytes(model) == before  # no second copy of the projections
        torch.testing.assert_close(model(x, t, e).sample, ref, rtol=1e-5, atol=1e-5)
        for blk in model.blocks:  # the separate layers still compute the same projections after unfusing
            blk.attn1.unfuse_projections()
            blk.attn2.unfuse_projections()
        torch.testing.assert_close(model(x, t, e).sample, ref, rtol=1e-5, atol=1e-5)


def test_hopper_gemm_patches_table_shapes_and_falls_back_off_gpu(monkeypatch):
    """Layers whose shape has a measured config get the quack forward (the FFN GELU keeps its fused epilogue and gets
    the GELU config); off CUDA and with gradients recorded the patched layers compute exactly nn.Linear."""
    from diffusers.models.activations import GELU

    from diffusers_wan_ext.ops import hopper_gemm
    from diffusers_wan_ext.runtime.speed import use_hopper_gemm

    monkeypatch.setattr(hopper_gemm, "HOPPER_GEMM_CONFIGS", {
        (16, 16, None): (128, 256, 2, 1, False), (16, 48, None): (256, 192, 1, 2, False),
        (16, 32, "gelu_tanh_approx"): (128, 192, 2, 1, True)})
    model = _tiny_dit()
    x, t, e = _inputs()
    with torch.no_grad():
        ref = model(x, t, e).sample
    optimize_transformer(model, compile=False, verbose=False, hopper_gemm=False)
    # per block: attn1 qkv + its q/k/v views + out, attn2 q/k/v + out, the FFN GELU; not the (16 -> 32) text KV
    assert use_hopper_gemm(model) == 2 * (5 + 4 + 1)
    blk = model.blocks[0]
    assert blk.attn1.to_qkv._wan_hopper_gemm == (256, 192, 1, 2, False)
    assert blk.attn1.to_out[0]._wan_hopper_gemm == (128, 256, 2, 1, False)
    gelu = next(m for m in blk.ffn.modules() if isinstance(m, GELU))
    assert gelu._wan_hopper_gemm == (128, 192, 2, 1, True) and "forward" not in vars(gelu.proj)
    assert "forward" not in vars(blk.attn2.to_kv) and "forward" not in vars(blk.ffn.net[2])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, e).sample, ref, rtol=1e-5, atol=1e-5)
    model(x, t, e).sample.sum().backward()  # gradient mode: stock path, autograd works


def test_hopper_linear_without_cuda_is_the_pytorch_expression():
    from diffusers_wan_ext.ops.hopper_gemm import hopper_gemm_unavailable_reason, hopper_linear, hopper_linear_op

    x, w, b = torch.randn(3, 5, 16), torch.randn(24, 16), torch.randn(24)
    assert hopper_gemm_unavailable_reason() is not None
    torch.testing.assert_close(hopper_linear(x, w, b, config=(128, 192, 2, 1, True)), torch.nn.functional.linear(x, w, b))
    torch.testing.assert_close(hopper_linear(x, w, b, "gelu_tanh_approx"),
                               torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh"))
    try:
        hopper_linear(x, w, b, "relu")
    except ValueError as exc:
        assert "activation" in str(exc)
    else:
        raise AssertionError("unknown activation accepted")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # the op's fake lets torch.compile trace through it
        out = hopper_linear_op(torch.empty(3, 5, 16, dtype=torch.bfloat16), torch.empty(24, 16, dtype=torch.bfloat16),
                               None, None, 128, 192, 2, 1, True)
    assert out.shape == (3, 5, 24) and out.dtype == torch.bfloat16
