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
                      "fused_qkv": True, "fused_qk_rope": len(model.blocks), "fused_norms": len(model.blocks)}
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



def test_flash4_passes_the_sm90_config_knobs(monkeypatch):
    """The per-head-dim Hopper configuration reaches flash-attn 4's forward as its keyword knobs (a stand-in module
    records them: the package needs CUDA)."""
    import sys

    from diffusers_wan_ext.runtime import flash4
    from helpers import flash4_stand_in_modules

    seen = []
    for name, mod in flash4_stand_in_modules(lambda q, k, v, **kw: seen.append(kw) or (q,)).items():
        monkeypatch.setitem(sys.modules, name, mod)
    flash4._flash4_import.cache_clear()
    try:
        func, reason = flash4._flash4_import()
        assert reason is None
        q = torch.zeros(1, 4, 2, 128)
        func(q, q, q, 0.5, False, flash4.SM90_CONFIGS[128])
        func(q, q, q, 0.5, False, None)
    finally:
        flash4._flash4_import.cache_clear()
    tile_m, tile_n, rs, overlap = flash4.SM90_CONFIGS[128]
    assert seen[0] == dict(softmax_scale=0.5, causal=False, tile_mn=(tile_m, tile_n), mma_pv_is_rs=rs,
                           intra_wg_overlap=overlap)
    assert seen[1] == dict(softmax_scale=0.5, causal=False)
