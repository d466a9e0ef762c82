"""TeaCache hooks beyond the golden: Fun pipelines, Wan2.2 expert switch, removal, bad configuration."""

from __future__ import annotations

import pytest
import torch

from diffusers_wan_ext import WanFunTransformer3DModel
from diffusers_wan_ext.hooks import TeaCacheConfig, apply_teacache, enable_teacache, remove_teacache, teacache_log

TINY = dict(num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2)


def _model(seed=0, **extra):
    torch.manual_seed(seed)
    m = WanFunTransformer3DModel(**TINY, in_channels=16, **extra).eval()
    with torch.no_grad():  # small time-projection gain: consecutive t_mod differ by ~1%, as in real models
        m.condition_embedder.time_proj.weight.mul_(0.05)
        m.condition_embedder.time_proj.bias.normal_()
    return m


def _steps(model, timesteps, context="cond"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    ctx = torch.randn(1, 512, 32, generator=g)
    outs = []
    for i, t in enumerate(timesteps):
        with torch.no_grad(), model.cache_context(context, step_index=i, num_inference_steps=len(timesteps)):
            outs.append(model(x, torch.tensor([float(t)]), ctx, return_dict=False)[0])
    return outs


def test_skipped_steps_reuse_the_residual_and_forced_steps_compute():
    model = _model()
    ts = torch.linspace(1000, 300, 8)
    plain = _steps(model, ts)
    apply_teacache(model, TeaCacheConfig(threshold=0.2, record=True))
    cached = _steps(model, ts)
    log = teacache_log(model)
    decisions = [r["decision"] for r in log]
    assert decisions[0] == decisions[-1] == "compute" and "skip" in decisions
    for i, d in enumerate(decisions):
        if d == "compute" and all(x == "compute" for x in decisions[: i + 1]):
            torch.testing.assert_close(cached[i], plain[i])
    skipped = [i for i, d in enumerate(decisions) if d == "skip"]
    assert any((cached[i] - plain[i]).abs().max() > 1e-6 for i in skipped)
    remove_teacache(model)
    for a, b in zip(_steps(model, ts), plain):
        torch.testing.assert_close(a, b)


def test_threshold_below_every_distance_never_skips():
    # (threshold 0 can still skip: the rescale polynomial goes negative for tiny changes, as in the reference)
    model = _model()
    ts = torch.linspace(1000, 300, 6)
    plain = _steps(model, ts)
    apply_teacache(model, TeaCacheConfig(threshold=-1e9, record=True))
    for a, b in zip(_steps(model, ts), plain):
        torch.testing.assert_close(a, b)
    assert {r["decision"] for r in teacache_log(model)} == {"compute"}


def test_each_expert_keeps_its_own_cache():
    from types import SimpleNamespace

    high, low = _model(0), _model(1)
    pipe = SimpleNamespace(transformer=high, transformer_2=low)
    enable_teacache(pipe, TeaCacheConfig(threshold=10.0, record=True))
    ts = torch.linspace(1000, 300, 6)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 512, 32, generator=g)
    for i, t in enumerate(ts):
        model = high if i < 3 else low
        with torch.no_grad(), model.cache_context("cond", step_index=i, num_inference_steps=len(ts)):
            model(x, torch.tensor([float(t)]), ctx, return_dict=False)
    high_log, low_log = teacache_log(high), teacache_log(low)
    assert [r["decision"] for r in high_log] == ["compute", "skip", "skip"]
    # the switch starts a fresh cache: the low-noise expert computes its first step, never reuses the other's residual
    assert [r["step"] for r in low_log] == [3, 4, 5] and low_log[0]["decision"] == "compute"
    assert low_log[-1]["decision"] == "compute"  # last step always computes


def test_bad_configuration_is_explained():
    with pytest.raises(ValueError, match="unknown TeaCache model_id"):
        apply_teacache(_model(), TeaCacheConfig(model_id="Wan9"))


def _vace(seed=0):
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(seed)
    m = WanVACETransformer3DModel(**TINY, vace_layers=[0, 1], vace_in_channels=16).eval()
    with torch.no_grad():
        m.condition_embedder.time_proj.weight.mul_(0.05)
        m.condition_embedder.time_proj.bias.normal_()
    return m


def _vace_steps(model, timesteps, control):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 512, 32, generator=g)
    outs = []
    for i, t in enumerate(timesteps):
        with torch.no_grad(), model.cache_context("cond", step_index=i, num_inference_steps=len(timesteps)):
            outs.append(model(x, torch.tensor([float(t)]), ctx, control_hidden_states=control[i],
                              return_dict=False)[0])
    return outs


def test_vace_skip_steps_skip_the_vace_hints_with_the_blocks():
    model = _vace()
    ts = torch.linspace(1000, 300, 5)
    controls = [torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(10 + i)) for i in range(5)]
    plain = _vace_steps(model, ts, controls)

    # the reference semantics, built by hand on the unhooked model: step 0 records the residual of the blocks
    # (hints included); a skip step adds it to the first block's input, runs no block and adds no hint
    seen = {}
    h0 = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("x0", a[0]))
    h1 = model.blocks[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    _vace_steps(model, ts[:1], controls)
    residual = seen["out"] - seen["x0"]
    h0.remove(), h1.remove()
    handles = [model.blocks[0].register_forward_hook(lambda m, a, o: a[0] + residual)]
    handles += [b.register_forward_hook(lambda m, a, o: a[0]) for b in model.blocks[1:]]
    handles += [b.register_forward_hook(lambda m, a, o: (torch.zeros_like(a[0]), o[1])) for b in model.vace_blocks]
    expected = _vace_steps(model, ts, controls)
    for h in handles:
        h.remove()

    apply_teacache(model, TeaCacheConfig(threshold=10.0, record=True))
    cached = _vace_steps(model, ts, controls)
    decisions = [r["decision"] for r in teacache_log(model)]
    assert decisions == ["compute", "skip", "skip", "skip", "compute"]
    torch.testing.assert_close(cached[0], plain[0], rtol=0, atol=0)
    for i in (1, 2, 3):
        torch.testing.assert_close(cached[i], expected[i])
        assert (cached[i] - plain[i]).abs().max() > 1e-6  # really skipped
    # a skip step does not look at the control video at all
    other = [c if i != 2 else torch.randn_like(c) for i, c in enumerate(controls)]
    torch.testing.assert_close(_vace_steps(model, ts, other)[2], cached[2], rtol=0, atol=0)
    remove_teacache(model)
    for a, b in zip(_vace_steps(model, ts, controls), plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
