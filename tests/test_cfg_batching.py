"""CFG batching (cond + uncond in one transformer forward) and the runtime mixin, on tiny fp32 models (CPU).

``WanExtPipeline`` (one and two experts, TI2V per-token timesteps) and a Wan-Fun pipeline give the same latents
batched and unbatched (within float rounding); unbatched ``WanExtPipeline`` is bit-identical to stock ``WanPipeline``.
Forward pre-hooks count the transformer calls: one per step batched (batch ``2 x B``), two unbatched, one without
guidance.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, WanPipeline

from diffusers_wan_ext import (
    WanExtPipeline,
    WanFunControlPipeline,
    WanFunInpaintPipeline,
    WanSpeedControlPipeline,
)
from diffusers_wan_ext.hooks import teacache_log
from diffusers_wan_ext.utils.media import load_image
from diffusers_wan_ext.pipelines import runtime_options
from diffusers_wan_ext.pipelines.denoising import WanDenoisingMixin
from diffusers_wan_ext.pipelines.runtime_options import WanRuntimeOptionsMixin
from helpers import latents_of
from test_fun_pipelines import (
    H,
    W,
    build,
    control_frames,
    make_scheduler,
    make_text_parts,
    make_transformer,
    make_vae,
    picture,
)
from test_fun_pipelines import parts  # noqa: F401  (fixture)
from test_fun_pipelines import run as run_fun

F = 5
STEPS = 3
TOL = dict(rtol=1e-5, atol=1e-5)


class Calls:
    """Forward pre-hook: batch size of ``hidden_states`` of every call, and the cache-context names used."""

    def __init__(self, model):
        self.batches, self.contexts = [], []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)
        self.model, self._orig = model, model.cache_context

        def cache_context(name, **kwargs):
            self.contexts.append(name)
            return self._orig(name, **kwargs)

        model.cache_context = cache_context

    def _hook(self, module, args, kwargs):
        self.batches.append(kwargs["hidden_states"].shape[0])

    def remove(self):
        self.handle.remove()
        del self.model.cache_context


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return make_text_parts(tmp_path_factory.mktemp("tok") / "umt5")


def t2v(text, cls=WanExtPipeline, experts=1, **config):
    tokenizer, text_encoder = text
    kwargs = dict(transformer=make_transformer(16, clip=False, stock=True, seed=1))
    if experts == 2:
        kwargs.update(transformer_2=make_transformer(16, clip=False, stock=True, seed=2), boundary_ratio=0.875)
    return cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=make_vae(), scheduler=make_scheduler(),
               **kwargs, **config)


run = partial(latents_of, height=H, width=W, num_frames=F, num_inference_steps=STEPS)


def stock_of(pipe):
    """Stock WanPipeline with the same components and config."""
    return WanPipeline(**pipe.components, boundary_ratio=pipe.config.boundary_ratio,
                       expand_timesteps=pipe.config.expand_timesteps)


# ------------------------------------------------------------------------------------------ WanExtPipeline
def test_one_expert_batched_equals_unbatched_and_stock(text):
    pipe = t2v(text)
    calls = Calls(pipe.transformer)
    batched = run(pipe)
    assert calls.batches == [2] * STEPS and calls.contexts == ["cond_uncond"] * STEPS
    calls.batches.clear(), calls.contexts.clear()
    plain = run(pipe, cfg_batching=False)
    assert calls.batches == [1] * (2 * STEPS) and calls.contexts == ["cond", "uncond"] * STEPS
    calls.remove()
    torch.testing.assert_close(batched, plain, **TOL)
    torch.testing.assert_close(plain, run(stock_of(pipe)), rtol=0, atol=0)


def test_two_experts_batched_equals_unbatched_and_stock(text):
    pipe = t2v(text, experts=2)
    high, low = Calls(pipe.transformer), Calls(pipe.transformer_2)
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=2.5)
    batched = run(pipe, **kwargs)
    assert high.batches == [2] and low.batches == [2, 2, 2]  # t=1000 high; 937.5 ... low (shift 3)
    assert low.contexts == ["cond_uncond"] * 3
    plain = run(pipe, cfg_batching=False, **kwargs)
    assert high.batches[1:] == [1, 1] and low.batches[3:] == [1] * 6
    high.remove(), low.remove()
    torch.testing.assert_close(batched, plain, **TOL)
    torch.testing.assert_close(plain, run(stock_of(pipe), **kwargs), rtol=0, atol=0)
    # guidance_scale_2 is used: another low-noise scale changes the result
    assert not torch.allclose(batched, run(pipe, **{**kwargs, "guidance_scale_2": 1.5}))


def test_batch_of_prompts_and_videos(text):
    pipe = t2v(text)
    kwargs = dict(prompt=["a", "b"], negative_prompt=["x", "y"], num_videos_per_prompt=2,
                  generator=[torch.Generator().manual_seed(i) for i in range(4)])
    calls = Calls(pipe.transformer)
    batched = run(pipe, **kwargs)
    assert calls.batches == [8] * STEPS
    calls.remove()
    kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(4)]
    torch.testing.assert_close(batched, run(pipe, cfg_batching=False, **kwargs), **TOL)
    assert batched.shape[0] == 4


def test_no_guidance_no_batching(text):
    pipe = t2v(text)
    calls = Calls(pipe.transformer)
    a = run(pipe, guidance_scale=1.0)
    b = run(pipe, guidance_scale=1.0, cfg_batching=False)
    assert calls.batches == [1] * (2 * STEPS) and calls.contexts == ["cond"] * (2 * STEPS)
    calls.remove()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_embeds_of_different_length_fall_back_to_two_forwards(text):
    pipe = t2v(text)
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(1, 12, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    calls = Calls(pipe.transformer)
    out = run(pipe, prompt=None, negative_prompt=None, prompt_embeds=pos, negative_prompt_embeds=neg)
    assert calls.batches == [1] * (2 * STEPS)
    calls.remove()
    torch.testing.assert_close(out, run(pipe, prompt=None, negative_prompt=None, prompt_embeds=pos,
                                        negative_prompt_embeds=neg, cfg_batching=False), rtol=0, atol=0)


def test_ti2v_per_token_timesteps(text):
    """expand_timesteps (Wan2.2 TI2V-5B): timesteps of shape [B, tokens] are batched too."""
    pipe = t2v(text, expand_timesteps=True)
    batched = run(pipe)
    torch.testing.assert_close(batched, run(pipe, cfg_batching=False), **TOL)
    torch.testing.assert_close(run(pipe, cfg_batching=False), run(stock_of(pipe)), rtol=0, atol=0)


def test_callbacks_interrupt_and_output_types(text):
    pipe = t2v(text)

    def callback(p, i, t, kw):
        assert set(kw) == {"latents", "negative_prompt_embeds"}
        if i == 1:
            p._interrupt = True  # the remaining steps are skipped, as stock does
        return {"latents": kw["latents"] * 0.9}

    outs = {}
    for batching in (True, False):
        seen = []

        def cb(p, i, t, kw, seen=seen):
            seen.append(i)
            return callback(p, i, t, kw)

        outs[batching] = run(pipe, cfg_batching=batching, callback_on_step_end=cb,
                             callback_on_step_end_tensor_inputs=["latents", "negative_prompt_embeds"])
        assert seen == [0, 1]
    torch.testing.assert_close(outs[True], outs[False], **TOL)
    video = run(pipe, output_type="np", num_inference_steps=2)
    assert isinstance(video, np.ndarray) and video.shape == (1, F, H, W, 3)
    (frames,) = pipe(prompt="a", num_inference_steps=1, height=H, width=W, num_frames=F, output_type="pt",
                     return_dict=False)
    assert torch.is_tensor(frames) and frames.shape == (1, F, 3, H, W)


def test_attention_kwargs_reach_the_transformer(text):
    pipe = t2v(text)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("attention_kwargs")), with_kwargs=True)
    run(pipe, attention_kwargs={"scale": 0.5}, num_inference_steps=1)
    handle.remove()
    assert seen == [{"scale": 0.5}]


def test_teacache_with_batching_one_joint_context(text):
    """TeaCache sees one context ("cond_uncond"); its indicator (the timestep modulation) is the same in both halves,
    so batched and unbatched runs make the same decisions and give the same latents."""
    pipe = t2v(text)
    pipe.enable_teacache(threshold=10.0, record=True)  # large: skip every step that is not forced
    try:
        kwargs = dict(num_inference_steps=5)
        batched = run(pipe, **kwargs)
        log = teacache_log(pipe.transformer, "cond_uncond")
        assert [r["decision"] for r in log] == ["compute", "skip", "skip", "skip", "compute"]
        plain = run(pipe, cfg_batching=False, **kwargs)
        assert [r["decision"] for r in teacache_log(pipe.transformer, "cond")] == [r["decision"] for r in log]
    finally:
        pipe.disable_teacache()
    torch.testing.assert_close(batched, plain, **TOL)
    assert not torch.allclose(batched, run(pipe, **kwargs))  # the cache did skip steps


# ----------------------------------------------------------------------------------------------- loading
def test_from_pretrained_stock_folder_and_round_trip(text, tmp_path):
    stock = t2v(text, cls=WanPipeline, experts=2)
    stock.save_pretrained(tmp_path / "stock")
    assert json.loads((tmp_path / "stock" / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    pipe = WanExtPipeline.from_pretrained(str(tmp_path / "stock"))
    assert type(pipe) is WanExtPipeline and pipe.config.boundary_ratio == 0.875
    want = run(stock)
    torch.testing.assert_close(run(pipe, cfg_batching=False), want, rtol=0, atol=0)
    torch.testing.assert_close(run(pipe), want, **TOL)

    pipe.save_pretrained(tmp_path / "ext")
    index = json.loads((tmp_path / "ext" / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_wan_ext", "WanExtPipeline"]
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "ext"))
    assert type(loaded) is WanExtPipeline
    torch.testing.assert_close(run(loaded), run(pipe), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- Wan-Fun
def test_fun_control_batched_equals_unbatched(parts):  # noqa: F811
    """Fun-Control V1.1 with a CLIP branch (image features doubled) and ref_conv (reference latents broadcast),
    a batch of 2 prompts x 2 videos."""
    pipe = build(WanFunControlPipeline, parts, make_transformer(48, ref_conv=True), clip=True)
    inputs = dict(control_video=control_frames(), reference_image=picture(2), image=picture(3),
                  prompt=["a", "b"], negative_prompt=["x", "y"], num_videos_per_prompt=2)
    assert pipe.cfg_batching is True  # the default of every pipeline of ours: one batched forward per step
    calls = Calls(pipe.transformer)
    pipe.cfg_batching = False
    try:
        plain = run_fun(pipe, generator=[torch.Generator().manual_seed(i) for i in range(4)], **inputs)
    finally:
        pipe.cfg_batching = True
    assert calls.batches == [4] * 4
    calls.batches.clear()
    batched = run_fun(pipe, generator=[torch.Generator().manual_seed(i) for i in range(4)], **inputs)
    assert calls.batches == [8] * 2 and calls.contexts[-2:] == ["cond_uncond"] * 2
    calls.remove()
    torch.testing.assert_close(batched, plain, **TOL)


def test_fun_two_experts_generate_argument(parts):  # noqa: F811
    """generate(cfg_batching=...) overrides the pipeline setting (Wan2.2-Fun InP, two experts, no CLIP)."""
    high, low = make_transformer(36, clip=False, seed=1), make_transformer(36, clip=False, seed=2)
    pipe = build(WanFunInpaintPipeline, parts, high, clip=False, transformer_2=low, boundary_ratio=0.875)
    common = dict(prompt="a fox", negative_prompt="blurry", height=H, width=W, num_frames=F, num_inference_steps=2,
                  guidance_scale=3.0, guidance_scale_2=2.0, output_type="latent")
    calls = Calls(low)
    image = load_image(picture(3), H, W)
    outs = [
        pipe.generate(dict(image=image), generator=torch.Generator().manual_seed(0), cfg_batching=b, **common).frames
        for b in (True, False)
    ]
    assert calls.batches == [2, 1, 1]
    calls.remove()
    torch.testing.assert_close(outs[0], outs[1], **TOL)


# ------------------------------------------------------------------------------------------------ denoise()
def _denoise_inputs(pipe, guidance_scale=4.0):
    """Latents, timesteps and embeddings for calling ``pipe.denoise`` directly (2 steps)."""
    g = torch.Generator().manual_seed(0)
    pipe._guidance_scale, pipe._interrupt = guidance_scale, False
    pipe.scheduler.set_timesteps(2)
    latents = torch.randn(1, 16, 2, H // 8, W // 8, generator=g)
    embeds = dict(prompt_embeds=torch.randn(1, 8, 32, generator=g),
                  negative_prompt_embeds=torch.randn(1, 8, 32, generator=g))
    return latents, pipe.scheduler.timesteps, dict(**embeds, guidance_scale=guidance_scale, num_inference_steps=2,
                                                   transformer_dtype=torch.float32)


def test_denoise_hooks(text):
    """guide, step, after_step, transformer and progress=False do what denoise() declares."""
    pipe = t2v(text)
    latents, timesteps, common = _denoise_inputs(pipe)
    # guide = the conditional prediction only: the no-guidance loop (one forward per step) on the same prompt
    cond_only = pipe.denoise(latents, timesteps, **common, guide=lambda cond, uncond, scale: cond)
    pipe._guidance_scale = 1.0
    pipe.scheduler.set_timesteps(2)
    torch.testing.assert_close(cond_only, pipe.denoise(latents, timesteps, **common), **TOL)

    # step / after_step (in that order, per step), another transformer, no progress bar
    pipe._guidance_scale = 4.0
    other = make_transformer(16, clip=False, stock=True, seed=5)
    calls, order = Calls(other), []

    def step(pred, t, x, i):
        order.append(("step", i))
        return x - 0.1 * pred

    def after_step(x, i):
        order.append(("after_step", i))
        return x * 0.5

    def no_bar(*args, **kwargs):
        raise AssertionError("progress=False must not open a progress bar")

    pipe.progress_bar = no_bar
    out = pipe.denoise(latents, timesteps, **common, step=step, after_step=after_step, transformer=other,
                       progress=False)
    calls.remove()
    assert order == [("step", 0), ("after_step", 0), ("step", 1), ("after_step", 1)]
    assert calls.batches == [2, 2] and calls.contexts == ["cond_uncond"] * 2
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_declared_capabilities():
    for cls in (WanExtPipeline, WanSpeedControlPipeline, WanFunInpaintPipeline, WanFunControlPipeline):
        assert cls.supports_cfg_parallel is True and cls.cfg_batching is True


# ----------------------------------------------------------------------------------------- runtime mixin
@pytest.mark.parametrize("cls", [WanExtPipeline, WanSpeedControlPipeline, WanFunInpaintPipeline])
def test_mixin_on_our_pipelines(cls):
    assert issubclass(cls, WanRuntimeOptionsMixin) and issubclass(cls, WanDenoisingMixin)
    for name in ("set_attention_backend", "reset_attention_backend", "enable_vram_management",
                 "disable_vram_management", "enable_teacache", "disable_teacache"):
        assert getattr(cls, name) is getattr(WanRuntimeOptionsMixin, name)
    assert cls.denoise is WanDenoisingMixin.denoise


def test_vram_management_delegates(text, monkeypatch):
    pipe = t2v(text)
    seen = []
    monkeypatch.setattr(
        runtime_options, "enable_vram_management", lambda p, limit, **kw: seen.append(("on", p, limit, kw)) or "plan"
    )
    monkeypatch.setattr(runtime_options, "disable_vram_management", lambda p: seen.append(("off", p)))
    assert pipe.enable_vram_management(12.5, offload="cpu") == "plan"
    pipe.disable_vram_management()
    assert seen == [("on", pipe, 12.5, {"offload": "cpu"}), ("off", pipe)]


def test_enable_teacache_arguments(text):
    from diffusers_wan_ext.hooks import TeaCacheConfig

    pipe = t2v(text, experts=2)
    with pytest.raises(ValueError, match="either config= or TeaCacheConfig fields"):
        pipe.enable_teacache(config=TeaCacheConfig(), model_id="Wan2.1-T2V-14B")
    pipe.enable_teacache(threshold=0.2, model_id="Wan2.1-T2V-14B")
    for model in (pipe.transformer, pipe.transformer_2):
        assert model.condition_embedder._diffusers_hook.get_hook("wan_teacache_indicator").config.threshold == 0.2
    pipe.disable_teacache()
    for model in (pipe.transformer, pipe.transformer_2):
        assert model.condition_embedder._diffusers_hook.get_hook("wan_teacache_indicator") is None
