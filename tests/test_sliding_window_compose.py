"""Sliding windows composed with the rest (issue 20, item 2), each against an explicit per-window reference on CPU.

The reference is a hand loop: slice the inputs to each window of :func:`sliding_windows`, run the plain model (its own
copy, with its own cache state where a cache is on) on the slice, blend with :func:`blend_weights`
(``helpers.blend_windows``).  Combinations:

* step caches -- TeaCache, Diffusers' FirstBlockCache and MagCache: the hook runs each window under its own
  ``cache_context`` (``"cond/window0"``, ...), so each window and CFG branch keeps its own cache state; over a few
  steps the windowed, cached model equals one cached model copy per window;
* CFG batching: the pipeline's batched ``2B`` forward equals its two separate forwards, windows on;
* VRAM plans: the transformer's activation estimate follows the window's latent frames;
* sequence parallel and CFG parallel (2 gloo ranks): equal to the single process, windows on;
* LoRA adapters: equal to the per-window reference;
* ``torch.compile``: a fixed window shape compiles once, a shorter last window once more.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, FirstBlockCacheConfig, MagCacheConfig, WanTransformer3DModel
from diffusers.hooks import apply_first_block_cache, apply_mag_cache

from diffusers_wan_ext.hooks import (
    TeaCacheConfig,
    apply_teacache,
    disable_vram_management,
    enable_teacache,
    enable_vram_management,
    plan_vram,
    remove_teacache,
    teacache_log,
)
from diffusers_wan_ext.hooks.sliding_window import (
    apply_sliding_window,
    remove_sliding_window,
    sliding_windows,
)
from diffusers_wan_ext.runtime import optimize_transformer

from helpers import blend_windows, src_env
from sliding_window_parallel_worker import CALL, build_pipe, frames_seen, generate

HERE = Path(__file__).resolve().parent
WAN = dict(num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2)
FRAMES, SIZE, STRIDE = 7, 4, 2  # windows (0, 4), (2, 6), (4, 7): the last one is shorter
TIMESTEPS = (900.0, 800.0, 700.0, 600.0)
TOL = dict(rtol=1e-5, atol=1e-5)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_model(seed=0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(in_channels=16, out_channels=16, **WAN).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.condition_embedder.time_proj.weight.mul_(0.05)  # consecutive t_mod differ by ~1 %, as in real models
    return model


def step_inputs(step: int, batch: int = 1) -> dict:
    """Inputs of denoising step ``step`` (new latents every step; two prompts for the two CFG branches)."""
    return dict(hidden_states=rand(batch, 16, FRAMES, 4, 4, seed=10 + step),
                timestep=torch.full((batch,), TIMESTEPS[step]), encoder_hidden_states=rand(batch, 6, 32, seed=1))


BRANCHES = {"cond": 1, "uncond": 2}  # cache context -> seed of its prompt


def branch_inputs(step: int, branch: str) -> dict:
    return {**step_inputs(step), "encoder_hidden_states": rand(1, 6, 32, seed=BRANCHES[branch])}


def window_slice(kwargs: dict, a: int, b: int) -> dict:
    return {**kwargs, "hidden_states": kwargs["hidden_states"][:, :, a:b]}


def reference_windows(model, kwargs, size, stride) -> torch.Tensor:
    """The plain model per window of the sliced inputs, blended."""
    t = kwargs["hidden_states"].shape[2]
    windows = sliding_windows(t, size, stride)
    outs = [model(**window_slice(kwargs, a, b), return_dict=False)[0] for a, b in windows]
    return blend_windows(outs, windows, t, size, stride)


# ------------------------------------------------------------------------------------------ step caches
def _teacache(model):
    # rescale = the raw distance; a huge threshold: every step but the first and the last skips
    apply_teacache(model, TeaCacheConfig(threshold=1e9, coefficients=(1.0, 0.0), record=True))


def _first_block_cache(model):
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=1e9))  # skip whenever a residual is cached


def _mag_cache(model):
    # a tiny calibration: magnitude ratios of 1 (residuals keep their size), so every step after the retention
    # steps may skip, at most 2 in a row
    apply_mag_cache(model, MagCacheConfig(threshold=1e9, max_skip_steps=2, retention_ratio=0.25,
                                          num_inference_steps=len(TIMESTEPS), mag_ratios=[1.0] * len(TIMESTEPS)))


CACHES = {"teacache": _teacache, "first_block_cache": _first_block_cache, "mag_cache": _mag_cache}


def run_steps(model, inputs_of, contexts) -> list[torch.Tensor]:
    """Every step, every context (CFG branch), as a pipeline's loop runs them."""
    outs = []
    for step in range(len(TIMESTEPS)):
        for name in contexts:
            with torch.no_grad(), model.cache_context(name, step_index=step, num_inference_steps=len(TIMESTEPS)):
                outs.append(model(**inputs_of(step, name), return_dict=False)[0])
    return outs


def per_window_reference(base, cache, inputs_of, contexts) -> list[torch.Tensor]:
    """One copy of the plain model per window, each with its own cache, fed that window's slices."""
    windows = sliding_windows(FRAMES, SIZE, STRIDE)
    per_window = []
    for a, b in windows:
        model = copy.deepcopy(base)
        cache(model)
        per_window.append(run_steps(model, lambda step, name: window_slice(inputs_of(step, name), a, b), contexts))
    return [blend_windows(list(outs), windows, FRAMES, SIZE, STRIDE) for outs in zip(*per_window)]


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_step_caches_keep_one_state_per_window_and_cfg_branch(cache):
    base = tiny_model()
    model = copy.deepcopy(base)
    CACHES[cache](model)
    apply_sliding_window(model, SIZE, STRIDE)
    got = run_steps(model, branch_inputs, BRANCHES)
    expected = per_window_reference(base, CACHES[cache], branch_inputs, BRANCHES)
    for step, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, **TOL, msg=lambda m: f"output {step}: {m}")
    apply_sliding_window(base, SIZE, STRIDE)  # the cache did skip: the uncached windowed model differs
    plain = run_steps(base, branch_inputs, BRANCHES)
    assert any((g - p).abs().max() > 1e-4 for g, p in zip(got, plain))
    if cache == "teacache":
        for name in BRANCHES:
            for k in range(len(sliding_windows(FRAMES, SIZE, STRIDE))):
                decisions = [r["decision"] for r in teacache_log(model, f"{name}/window{k}")]
                assert decisions == ["compute", "skip", "skip", "compute"], (name, k, decisions)


@pytest.mark.parametrize("cache", ["teacache"])
def test_step_caches_under_batched_cfg(cache):
    """One ``2B`` forward per step under ``cache_context("cond_uncond")``: one state per window for the batch."""
    base = tiny_model()
    model = copy.deepcopy(base)
    CACHES[cache](model)
    apply_sliding_window(model, SIZE, STRIDE)

    def batched(step, name):
        kwargs = step_inputs(step, batch=2)
        kwargs["encoder_hidden_states"] = torch.cat([rand(1, 6, 32, seed=s) for s in BRANCHES.values()])
        return kwargs

    got = run_steps(model, batched, ["cond_uncond"])
    for g, e in zip(got, per_window_reference(base, CACHES[cache], batched, ["cond_uncond"])):
        torch.testing.assert_close(g, e, **TOL)


class MovingSchedule:
    """Windows that move at step 2: window 0 stays, windows 1 and 2 cover other frames (weights: ones)."""

    def windows(self, num_frames, step_index=None):
        return [(0, 4), (2, 6), (4, 7)] if (step_index or 0) < 2 else [(0, 4), (1, 5), (3, 7)]

    def weights(self, num_frames, window, step_index=None):
        return torch.ones(window[1] - window[0])


@pytest.mark.parametrize("cache", ["mag_cache", "teacache"])  # (FirstBlockCache keeps its state the same way)
def test_a_window_that_moves_starts_a_fresh_cache_state(cache):
    """Window ``k`` covering other frames than at the previous step gets a fresh state (never the residual of other
    frames); a window that stays keeps its state."""
    base = tiny_model()
    model = copy.deepcopy(base)
    CACHES[cache](model)
    apply_sliding_window(model, schedule=MovingSchedule())
    got = run_steps(model, branch_inputs, BRANCHES)
    owners: dict[tuple, tuple] = {}  # (branch, k) -> (window, model copy with its own cache)
    expected = []
    for step in range(len(TIMESTEPS)):
        for name in BRANCHES:
            windows, outs = MovingSchedule().windows(FRAMES, step), []
            for k, (a, b) in enumerate(windows):
                if owners.get((name, k), ((a, b),))[0] != (a, b) or (name, k) not in owners:
                    owners[name, k] = ((a, b), copy.deepcopy(base))
                    CACHES[cache](owners[name, k][1])
                own = owners[name, k][1]
                with torch.no_grad(), own.cache_context(name, step_index=step, num_inference_steps=len(TIMESTEPS)):
                    outs.append(own(**window_slice(branch_inputs(step, name), a, b), return_dict=False)[0])
            value, weight = torch.zeros_like(got[0]), torch.zeros(FRAMES)
            for out, (a, b) in zip(outs, windows):
                value[:, :, a:b] += out
                weight[a:b] += 1
            expected.append(value / weight.view(1, 1, -1, 1, 1))
    for step, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, **TOL, msg=lambda m: f"output {step}: {m}")
    if cache == "teacache":  # window 0 skipped through the move; window 1 computed again after it
        assert [r["decision"] for r in teacache_log(model, "cond/window0")] == ["compute", "skip", "skip", "compute"]
        assert [r["decision"] for r in teacache_log(model, "cond/window1")][-2:] == ["compute", "compute"]


def test_mag_cache_outside_a_cache_context_keeps_one_state_per_window():
    """A direct model call without ``cache_context``: MagCache falls back to one state of its own, which the hook
    replaces by one per window (``"window0"``, ...), so no window reuses another's residual."""
    base = tiny_model()
    model = copy.deepcopy(base)
    _mag_cache(model)
    apply_sliding_window(model, SIZE, STRIDE)

    def run(model, inputs_of):
        with torch.no_grad():
            return [model(**inputs_of(step), return_dict=False)[0] for step in range(len(TIMESTEPS))]

    got = run(model, step_inputs)
    windows = sliding_windows(FRAMES, SIZE, STRIDE)
    per_window = []
    for a, b in windows:
        own = copy.deepcopy(base)
        _mag_cache(own)
        per_window.append(run(own, lambda step: window_slice(step_inputs(step), a, b)))
    for g, outs in zip(got, zip(*per_window)):
        torch.testing.assert_close(g, blend_windows(list(outs), windows, FRAMES, SIZE, STRIDE), **TOL)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_pipe(tmp_path_factory.mktemp("pipe"))


def test_pipeline_teacache_windows_batched_cfg_equals_two_forwards(pipe):
    """``enable_teacache`` + ``sliding_window_size``: the batched-CFG loop (one ``"cond_uncond"`` state per window)
    gives the two-forward loop's result (``"cond"`` / ``"uncond"`` states per window)."""
    kwargs = {**CALL, "num_inference_steps": 3}
    enable_teacache(pipe, TeaCacheConfig(threshold=1e9, coefficients=(1.0, 0.0), record=True))
    try:
        with torch.no_grad():
            batched = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
            assert [r["decision"] for r in teacache_log(pipe.transformer, "cond_uncond/window1")] == [
                "compute", "skip", "compute"]
            unbatched = pipe(**kwargs, cfg_batching=False, generator=torch.Generator().manual_seed(0)).frames
            assert [r["decision"] for r in teacache_log(pipe.transformer, "uncond/window2")] == [
                "compute", "skip", "compute"]
    finally:
        remove_teacache(pipe.transformer)
    torch.testing.assert_close(batched, unbatched, **TOL)


def test_pipeline_windows_under_a_vram_plan(pipe):
    """``enable_vram_management(..., sliding_window_size=S)`` plans for the window; group-offloaded blocks run the
    windows unchanged."""
    expected = generate(pipe)
    plan = enable_vram_management(pipe, 4, device="cpu", height=CALL["height"], width=CALL["width"],
                                  num_frames=CALL["num_frames"], sliding_window_size=CALL["sliding_window_size"],
                                  overrides={"transformer": "group_offload"}, verbose=False)
    try:
        assert plan.window_frames == 3 and plan.tokens == 3  # 3 latent frames of one 2 x 2-patch token
        torch.testing.assert_close(generate(pipe), expected, rtol=0, atol=0)
    finally:
        disable_vram_management(pipe)


# ------------------------------------------------------------------------------------------ LoRA
@torch.no_grad()
def test_lora_adapters_are_windowed_like_the_reference():
    from peft import LoraConfig

    model = tiny_model()
    torch.manual_seed(3)
    for name, targets in (("a", ["to_q", "to_v"]), ("b", ["to_k", "ffn.net.2"])):
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets), name)
    model.set_adapters(["a", "b"], weights=[0.5, 1.0])
    kwargs = step_inputs(0)
    apply_sliding_window(model, SIZE, STRIDE)
    got = model(**kwargs, return_dict=False)[0]
    remove_sliding_window(model)
    torch.testing.assert_close(got, reference_windows(model, kwargs, SIZE, STRIDE), rtol=0, atol=0)
    model.disable_adapters()
    assert not torch.allclose(got, reference_windows(model, kwargs, SIZE, STRIDE), atol=1e-4)


# ------------------------------------------------------------------------------------------ VRAM plans
WAN21_14B = dict(
    num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", cross_attn_norm=True,
    eps=1e-6, rope_max_seq_len=1024,
)


@pytest.fixture(scope="module")
def release_14b():
    """A bf16 Wan2.1 14B transformer and a tiled VAE on the meta device (sizes only)."""
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**WAN21_14B).to(torch.bfloat16)
        vae = AutoencoderKLWan().to(torch.bfloat16)
    vae.enable_tiling()
    return dict(transformer=transformer, vae=vae)


def test_vram_plan_follows_the_window_token_count(release_14b):
    shape = dict(height=720, width=1280, num_frames=161)  # 41 latent frames of 45 x 80 tokens
    whole = plan_vram(release_14b, "80gb", **shape)
    windowed = plan_vram(release_14b, "80gb", **shape, sliding_window_size=21)
    assert whole.tokens == 41 * 45 * 80 and whole.window_frames is None
    assert windowed.tokens == 21 * 45 * 80 and windowed.window_frames == 21
    assert "per 21-latent-frame sliding window" in str(windowed)
    act_whole, act_windowed = (p.components["transformer"].activations_gib for p in (whole, windowed))
    assert act_windowed == pytest.approx(act_whole * 21 / 41, rel=1e-6)
    # a window longer than the video is the whole video; the VAE (whole video) is planned the same either way
    longer = plan_vram(release_14b, "80gb", **shape, sliding_window_size=64)
    assert longer.tokens == whole.tokens
    assert windowed.components["vae"].activations_gib == whole.components["vae"].activations_gib


def test_vram_plan_under_24gb_fits_only_with_windows(release_14b):
    shape = dict(height=720, width=1280, num_frames=321)  # 81 latent frames: ~34 GiB of activations unwindowed
    with pytest.raises(ValueError, match="use sliding windows"):
        plan_vram(release_14b, "24gb", **shape)
    with pytest.raises(ValueError, match="a smaller sliding_window_size .now 61"):
        plan_vram(release_14b, "24gb", **shape, sliding_window_size=61)
    plan = plan_vram(release_14b, "24gb", **shape, sliding_window_size=8)
    assert plan.peak_gib + plan.margin_gib <= plan.vram_limit_gib and plan.tokens == 8 * 45 * 80
    with pytest.raises(ValueError, match="sliding_window_size must be a positive integer"):
        plan_vram(release_14b, "24gb", **shape, sliding_window_size=0)


def test_vram_plan_reads_the_window_of_an_applied_hook(release_14b):
    shape = dict(height=720, width=1280, num_frames=161)
    apply_sliding_window(release_14b["transformer"], 12, 8)
    try:
        plan = plan_vram(release_14b, "80gb", **shape)
    finally:
        remove_sliding_window(release_14b["transformer"])
    assert plan.window_frames == 12 and plan.tokens == 12 * 45 * 80
    assert plan_vram(release_14b, "80gb", **shape).window_frames is None


# ------------------------------------------------------------------------------- sequence / CFG parallel
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_parallel_windows_equal_the_single_process(tmp_path):
    """2 gloo ranks: CFG parallel (each rank windows its branch) and Ulysses 2 (each window's tokens split)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(HERE / "sliding_window_parallel_worker.py"), str(tmp_path)],
        env=src_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    pipe = build_pipe(tmp_path)
    seen = frames_seen(pipe)
    reference, seen = generate(pipe), list(seen)
    assert seen == [3, 3, 2] * CALL["num_inference_steps"]  # one batched-CFG forward per window and step
    assert not torch.allclose(reference, generate_unwindowed(pipe), atol=1e-4)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results["cfg"]["layout"] == [2, 1, 1] and results["ulysses"]["layout"] == [1, 2, 1]
        for name in ("cfg", "ulysses"):
            assert results[name]["frames"] == seen, name
            torch.testing.assert_close(results[name]["latents"], reference, rtol=2e-5, atol=2e-5,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")


def generate_unwindowed(pipe) -> torch.Tensor:
    with torch.no_grad():
        kwargs = {k: v for k, v in CALL.items() if not k.startswith("sliding_window")}
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames


# -------------------------------------------------------------------------------------- optimize_transformer
@pytest.mark.parametrize("frames, compilations", [(7, 2)])  # windows (0, 4), (2, 6) and a shorter (4, 7)
def test_compiled_windows_compile_once_per_window_shape(frames, compilations):
    """Regional compile (Dynamo tracing; a counting backend instead of Inductor): the window shape compiles once,
    a shorter last window once more, over two calls of two steps each."""
    base = tiny_model()
    model = copy.deepcopy(base)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        report = optimize_transformer(model, attention="native", compile_backend=counting_backend, verbose=False)
        assert report["compiled"]
        apply_sliding_window(model, SIZE, STRIDE)
        kwargs = {**step_inputs(0), "hidden_states": rand(1, 16, frames, 4, 4, seed=3)}
        with torch.no_grad():
            for call in range(2):
                for step in range(2):
                    inputs = {**kwargs, "timestep": torch.tensor([TIMESTEPS[step]])}
                    with model.cache_context("cond", step_index=step):
                        got = model(**inputs, return_dict=False)[0]
                    torch.testing.assert_close(got, reference_windows(base, inputs, SIZE, STRIDE), **TOL)
        assert len(graphs) == compilations
    finally:
        torch._dynamo.reset()
