"""Stock Diffusers hooks and LoRAs on the conditioning-variant transformers: cache hooks (FirstBlockCache, MagCache),
group offloading, layerwise casting, the registries, and a stock-format Wan LoRA on the Fun transformer."""

from __future__ import annotations

import pytest
import torch

from diffusers_wan_ext import WanFunTransformer3DModel, WanMotionControllerModel
from diffusers_wan_ext.models.motion_controller import apply_motion_control

TINY = dict(num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2)


def _fun_model(**extra):
    torch.manual_seed(0)
    cfg = dict(TINY, in_channels=52, ref_conv_in_channels=16, control_adapter_in_channels=24)
    cfg.update(extra)
    return WanFunTransformer3DModel(**cfg).eval()


def _inputs(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 52, 3, 8, 8, generator=g),
        timestep=torch.full((batch,), 700.0),
        encoder_hidden_states=torch.randn(batch, 512, 32, generator=g),
        reference_latents=torch.randn(1, 16, 1, 8, 8, generator=g),
        control_camera_latents=torch.randn(1, 24, 3, 64, 64, generator=g),
        return_dict=False,
    )


def _run(model, **kw):
    with torch.no_grad(), model.cache_context("cond"):  # cache hooks keep one state per context (as pipelines do)
        return model(**{**_inputs(), **kw})[0]


def test_reference_tokens_and_camera_are_live_and_batched():
    model = _fun_model()
    base = _run(model)
    assert (base - _run(model, reference_latents=torch.zeros(1, 16, 1, 8, 8))).abs().max() > 1e-3
    assert (base - _run(model, control_camera_latents=torch.zeros(1, 24, 3, 64, 64))).abs().max() > 1e-3
    # batch-1 conditioning is shared across a CFG batch of 2
    x = _inputs(batch=2)
    with torch.no_grad():
        two = model(**x)[0]
        one = model(**{**x, "hidden_states": x["hidden_states"][:1], "timestep": x["timestep"][:1],
                       "encoder_hidden_states": x["encoder_hidden_states"][:1]})[0]
    torch.testing.assert_close(two[:1], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(hidden_states=torch.randn(1, 48, 3, 8, 8)), r"\[B, 52, F, H, W\]"),
    (dict(reference_latents=torch.randn(1, 16, 1, 4, 4)), r"reference_latents must be \[B, 16, 1, 8, 8\]"),
    (dict(control_camera_latents=torch.randn(1, 24, 3, 32, 32)), r"control_camera_latents must be \[B, 24, 3, 64, 64\]"),
])
def test_bad_conditioning_is_explained(bad, match):
    with pytest.raises(ValueError, match=match):
        _run(_fun_model(), **bad)


def test_reference_without_ref_conv_is_explained():
    model = _fun_model(ref_conv_in_channels=None)
    with pytest.raises(ValueError, match="no ref_conv"):
        _run(model)


def test_registries_know_our_blocks_and_processors():
    from diffusers.hooks._helpers import AttentionProcessorRegistry, TransformerBlockRegistry
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    from diffusers.models.transformers.transformer_wan_vace import WanVACETransformerBlock

    from diffusers_wan_ext import WanTextLenAttnProcessor

    assert TransformerBlockRegistry.get(WanVACETransformerBlock).return_hidden_states_index == 1
    for proc in (WanAttnProcessor, WanTextLenAttnProcessor):
        assert AttentionProcessorRegistry.get(proc).skip_processor_output_fn is not None
    assert WanFunTransformer3DModel._repeated_blocks == ["WanTransformerBlock"]
    assert "blocks.0" in WanFunTransformer3DModel._cp_plan and "rope" in WanFunTransformer3DModel._cp_plan


def test_first_block_cache_and_magcache_run_on_the_fun_transformer():
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    model = _fun_model()
    ref = _run(model)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    first = _run(model)
    torch.testing.assert_close(first, ref)  # first step always computes every block
    second = _run(model, timestep=torch.full((1,), 690.0))
    assert torch.isfinite(second).all()
    model.disable_cache()
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=2))
    torch.testing.assert_close(_run(model), ref)
    model.disable_cache()
    torch.testing.assert_close(_run(model), ref)


def test_group_offloading_and_layerwise_casting_keep_outputs():
    model = _fun_model()
    ref = _run(model)
    model.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    torch.testing.assert_close(_run(model), ref)

    cast = _fun_model()
    cast.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert cast.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert cast.ref_conv.weight.dtype == torch.float32  # skipped like patch_embedding
    out = _run(cast)
    assert (out - ref).abs().max() < 0.1


def test_motion_control_hook_composes_with_cache_hooks():
    from diffusers import FirstBlockCacheConfig

    model = _fun_model()
    mc = WanMotionControllerModel(freq_dim=32, dim=48)
    torch.nn.init.normal_(mc.linear[4].weight, std=0.05)
    ref = _run(model)
    with torch.no_grad(), apply_motion_control(model, mc(100.0)):
        moved = _run(model)
    assert (moved - ref).abs().max() > 1e-3
    torch.testing.assert_close(_run(model), ref)  # hook removed on exit
    model.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    with torch.no_grad(), apply_motion_control(model, mc(100.0)):
        torch.testing.assert_close(_run(model), moved)


def _original_format_lora(model, rank=4, seed=0):
    """A LoRA in the original / ComfyUI Wan layout (``diffusion_model.blocks.N.self_attn.q.lora_A.weight``)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(model.config.num_layers):
        for orig in ("self_attn.q", "self_attn.k", "cross_attn.v", "ffn.0"):
            name = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "cross_attn.v": "attn2.to_v",
                    "ffn.0": "ffn.net.0.proj"}[orig]
            lin = model.get_submodule(f"blocks.{i}.{name}")
            sd[f"diffusion_model.blocks.{i}.{orig}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.1
            sd[f"diffusion_model.blocks.{i}.{orig}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.1
    return sd


def test_stock_format_wan_lora_loads_onto_the_fun_transformer():
    from diffusers import WanPipeline

    model = _fun_model()
    ref = _run(model)
    lora = _original_format_lora(model)
    sd = WanPipeline.lora_state_dict(lora)  # stock converter: original layout -> Diffusers PEFT keys
    sd = sd[0] if isinstance(sd, tuple) else sd
    model.load_lora_adapter(sd, prefix="transformer", adapter_name="style")
    peft_modules = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "style" in getattr(m, "lora_A", {})}
    assert {"blocks.0.attn1.to_q", "blocks.1.attn2.to_v", "blocks.1.ffn.net.0.proj"} <= peft_modules
    out = _run(model)
    assert (out - ref).abs().max() > 1e-3
    model.set_adapters(["style"], weights=[0.0])
    torch.testing.assert_close(_run(model), ref, rtol=1e-5, atol=1e-5)
