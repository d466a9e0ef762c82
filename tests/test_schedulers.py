"""Reference schedulers and pipeline subclasses: schedule formulas vs literal re-implementations of the references,
stock-pipeline compatibility, config round trips.  Tiny random models only; runs in seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    WanVideoToVideoPipeline,
)
from diffusers.pipelines.wan.pipeline_wan_video2video import retrieve_timesteps

import diffusers_wan_ext  # noqa: F401  (registers our classes with Diffusers)
from diffusers_wan_ext.pipelines import WanImageToVideoReferencePipeline, WanVideoToVideoReferencePipeline
from diffusers_wan_ext.schedulers import WanFlowMatchScheduler, WanFlowUniPCScheduler

from golden_runners.core import discover_cases, load_case

CASES = [(0, 4, 5.0, 1.0), (1, 4, 5.0, 0.6), (2, 6, 12.0, 1.0), (3, 3, 5.0, 1.0), (4, 50, 3.0, 1.0), (5, 40, 16.0, 0.3),
         (6, 1, 5.0, 1.0), (7, 7, 1.0, 0.75)]


# ---------------------------------------------------------------------------------------- literal references
def diffsynth_wan_schedule(n: int, strength: float, shift: float):
    """DiffSynth-Studio ``FlowMatchScheduler.set_timesteps_wan``, written out literally."""
    sigma_min, sigma_max = 0.0, 1.0
    sigma_start = sigma_min + (sigma_max - sigma_min) * strength
    sigmas = torch.linspace(sigma_start, sigma_min, n + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    return sigmas, timesteps


def diffsynth_step(sigmas, timesteps, model_output, timestep, sample):
    """DiffSynth-Studio ``FlowMatchScheduler.step``, written out literally."""
    timestep_id = torch.argmin((timesteps - timestep).abs())
    sigma = sigmas[timestep_id]
    sigma_ = 0 if timestep_id + 1 >= len(timesteps) else sigmas[timestep_id + 1]
    return sample + model_output * (sigma_ - sigma)


def original_wan_unipc_schedule(n: int, shift: float, num_train_timesteps: int = 1000):
    """The original Wan ``FlowUniPCMultistepScheduler(num_train_timesteps, shift=1, use_dynamic_shifting=False)``
    followed by ``set_timesteps(n, shift=shift)`` (``wan/utils/fm_solvers_unipc.py``), written out literally."""
    # __init__
    alphas = np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1].copy()
    sigmas = torch.from_numpy(1.0 - alphas).to(dtype=torch.float32)
    init_shift = 1
    sigmas = init_shift * sigmas / (1 + (init_shift - 1) * sigmas)
    sigma_min, sigma_max = sigmas[-1].item(), sigmas[0].item()
    # set_timesteps
    sig = np.linspace(sigma_max, sigma_min, n + 1).copy()[:-1]
    sig = shift * sig / (1 + (shift - 1) * sig)
    timesteps = sig * num_train_timesteps
    sig = np.concatenate([sig, [0]]).astype(np.float32)
    return torch.from_numpy(sig), torch.from_numpy(timesteps).to(dtype=torch.int64)


# ------------------------------------------------------------------------------------- WanFlowMatchScheduler
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[1]}-shift{c[2]}-strength{c[3]}")
def test_flow_match_schedule_is_diffsynth_bitwise(case):
    _, n, shift, strength = case
    s = WanFlowMatchScheduler(shift=shift)
    s.set_timesteps(n, denoising_strength=strength)
    ref_sigmas, ref_t = diffsynth_wan_schedule(n, strength, shift)
    assert torch.equal(s.sigmas[:-1], ref_sigmas) and s.sigmas[-1] == 0 and len(s.sigmas) == n + 1
    assert torch.equal(s.timesteps, ref_t) and s.timesteps.dtype == torch.float32
    assert s.num_inference_steps == n


def test_flow_match_schedule_matches_golden_manifests():
    found = 0
    for name in discover_cases():
        case = load_case(name)
        sch = case.manifest.get("schedule")
        if not sch or "sigmas" not in sch or "Wan" not in sch.get("template", ""):
            continue
        s = WanFlowMatchScheduler(shift=float(sch["shift"]))
        s.set_timesteps(int(sch["num_inference_steps"]), denoising_strength=float(sch.get("denoising_strength", 1.0)))
        torch.testing.assert_close(s.sigmas[:-1], torch.tensor(sch["sigmas"]), rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(s.timesteps, torch.tensor(sch["timesteps"]), rtol=1e-7, atol=1e-4)
        found += 1
    if not found:
        pytest.skip("no golden case with a recorded Wan schedule")


@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: f"N{c[1]}-strength{c[3]}")
def test_flow_match_step_and_noising_are_diffsynth_bitwise(case):
    seed, n, shift, strength = case
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)
    s = WanFlowMatchScheduler(shift=shift)
    s.set_timesteps(n, denoising_strength=strength)
    ref_sigmas, ref_t = diffsynth_wan_schedule(n, strength, shift)
    x = s.add_noise(x0, noise, s.timesteps[:1])
    assert torch.equal(x, (1 - ref_sigmas[0]) * x0 + ref_sigmas[0] * noise)
    assert torch.equal(s.scale_noise(x0, s.timesteps[:1], noise), x)
    ref = x.clone()
    for t in s.timesteps:
        v = torch.randn(x.shape, generator=g)
        x = s.step(v, t, x, return_dict=False)[0]
        ref = diffsynth_step(ref_sigmas, ref_t, v, t, ref)
        assert torch.equal(x, ref)
    assert s.step_index == n


def test_flow_match_step_index_and_dtype():
    s = WanFlowMatchScheduler(shift=5.0)
    s.set_timesteps(4)
    x = torch.zeros(1, 2, 1, 2, 2)
    # no set_begin_index (as WanVideoToVideoPipeline): the first timestep is looked up, then counted
    s.step(torch.ones_like(x), s.timesteps[2], x)
    assert s.step_index == 3
    # the latents keep their dtype (float32 latents stay float32 with a bf16 model output)
    s.set_timesteps(4)
    s.set_begin_index(0)
    out = s.step(torch.ones_like(x, dtype=torch.bfloat16), s.timesteps[0], x).prev_sample
    assert out.dtype == torch.float32 and s.step_index == 1
    torch.testing.assert_close(out, torch.full_like(x, float(s.sigmas[1] - s.sigmas[0])))
    # per-row timesteps in add_noise
    s.set_timesteps(4)
    y = s.add_noise(torch.zeros(2, 1), torch.ones(2, 1), torch.stack([s.timesteps[0], s.timesteps[3]]))
    assert y[:, 0].tolist() == [float(s.sigmas[0]), float(s.sigmas[3])]


def test_flow_match_custom_schedules():
    s = WanFlowMatchScheduler(shift=5.0)
    s.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])  # shifted like FlowMatchEulerDiscreteScheduler
    ref, _ = diffsynth_wan_schedule(4, 1.0, 5.0)
    torch.testing.assert_close(s.sigmas[:-1], ref)
    s.set_timesteps(timesteps=[1000.0, 750.0, 500.0, 250.0])  # used as given
    assert s.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0] and s.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        s.set_timesteps(4, mu=0.5)
    with pytest.raises(ValueError):
        s.set_timesteps(sigmas=[1.0], timesteps=[1000.0])
    with pytest.raises(ValueError):
        s.set_timesteps(4, denoising_strength=1.5)
    # retrieve_timesteps of the stock pipelines accepts both custom forms
    t, n = retrieve_timesteps(s, None, "cpu", sigmas=[1.0, 0.5])
    assert n == 2 and len(t) == 2
    t, n = retrieve_timesteps(s, None, "cpu", timesteps=[900.0, 500.0, 100.0])
    assert n == 3


def test_stock_flow_match_euler_differs():
    """Documented difference: stock FlowMatchEulerDiscreteScheduler.set_timesteps(N) is not the Wan schedule."""
    stock = FlowMatchEulerDiscreteScheduler(shift=5.0)
    stock.set_timesteps(4)
    ours = WanFlowMatchScheduler(shift=5.0)
    ours.set_timesteps(4)
    assert (stock.sigmas - ours.sigmas).abs().max() > 0.5
    # ... but given the Wan pre-shift sigmas it shifts them the same way
    stock.set_timesteps(sigmas=np.linspace(1.0, 0.0, 5)[:-1])
    torch.testing.assert_close(stock.sigmas, ours.sigmas)


# ------------------------------------------------------------------------------------- WanFlowUniPCScheduler
@pytest.mark.parametrize("n,shift", [(4, 5.0), (50, 5.0), (40, 3.0), (40, 12.0), (50, 16.0), (1, 5.0), (10, 1.0)])
def test_unipc_schedule_is_original_bitwise(n, shift):
    s = WanFlowUniPCScheduler(flow_shift=shift)
    s.set_timesteps(n)
    ref_sigmas, ref_t = original_wan_unipc_schedule(n, shift)
    assert torch.equal(s.sigmas, ref_sigmas)
    assert torch.equal(s.timesteps, ref_t) and s.timesteps.dtype == torch.int64
    # the original's set_timesteps(n, shift=...) form
    s2 = WanFlowUniPCScheduler(flow_shift=1.0)
    s2.set_timesteps(n, shift=shift)
    assert torch.equal(s2.sigmas, ref_sigmas) and torch.equal(s2.timesteps, ref_t)


def test_stock_unipc_schedule_differs():
    """Documented difference: stock UniPC(use_flow_sigmas) starts from linspace(1, 1/1000, N+1)[:-1]."""
    stock = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    stock.set_timesteps(50)
    ref_sigmas, ref_t = original_wan_unipc_schedule(50, 5.0)
    assert not torch.equal(stock.timesteps, ref_t)
    assert (stock.sigmas - ref_sigmas).abs().max() > 1e-3


def test_unipc_solver_is_stock():
    """Only the schedule differs: with the same sigmas the stock UniPC update gives identical samples."""
    ours = WanFlowUniPCScheduler(flow_shift=5.0)
    ours.set_timesteps(6)
    stock = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    stock.set_timesteps(sigmas=np.linspace(ours.original_sigma_max, 0.0, 7)[:-1])
    assert torch.equal(stock.sigmas, ours.sigmas) and torch.equal(stock.timesteps, ours.timesteps)
    g = torch.Generator().manual_seed(0)
    x = y = torch.randn(1, 4, 2, 4, 4, generator=g)
    for t in ours.timesteps:
        v = torch.randn(x.shape, generator=g)
        x = ours.step(v, t, x, return_dict=False)[0]
        y = stock.step(v, t, y, return_dict=False)[0]
        assert torch.equal(x, y)
    assert torch.isfinite(x).all()


def test_unipc_config_checks_and_from_config():
    with pytest.raises(ValueError):
        WanFlowUniPCScheduler(use_flow_sigmas=False)
    with pytest.raises(ValueError):
        WanFlowUniPCScheduler(use_karras_sigmas=True)
    stock = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    ours = WanFlowUniPCScheduler.from_config(stock.config)
    assert ours.config.flow_shift == 3.0 and isinstance(ours, UniPCMultistepScheduler)


# --------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("cls,kwargs", [(WanFlowMatchScheduler, {"shift": 12.0}),
                                        (WanFlowUniPCScheduler, {"flow_shift": 3.0, "solver_order": 3})])
def test_scheduler_save_load_round_trip(cls, kwargs, tmp_path):
    s = cls(**kwargs)
    s.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == cls.__name__
    loaded = cls.from_pretrained(tmp_path)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert strip(loaded.config) == strip(s.config) and loaded.config[next(iter(kwargs))] == kwargs[next(iter(kwargs))]
    assert (tmp_path / "diffusers_wan_ext.py").is_file()  # the re-export shim (lead's ShimSaveMixin)
    for sch in (s, loaded):
        sch.set_timesteps(5)
    assert torch.equal(loaded.sigmas, s.sigmas) and torch.equal(loaded.timesteps, s.timesteps)


def tiny_transformer(in_channels: int = 16, out_channels: int = 16, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
        out_channels=out_channels, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    ).eval()


def tiny_vae(z_dim: int = 16) -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=4, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            latents_mean=[0.1] * z_dim, latents_std=[2.0] * z_dim).eval()


def test_drop_into_stock_wan_pipeline(tmp_path):
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=WanFlowMatchScheduler(shift=5.0),
                       transformer=tiny_transformer())
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"][1] == "WanFlowMatchScheduler"
    none = dict(tokenizer=None, text_encoder=None, vae=None)  # saved as absent components
    loaded = DiffusionPipeline.from_pretrained(tmp_path, **none)
    assert type(loaded) is WanPipeline and type(loaded.scheduler) is WanFlowMatchScheduler
    # the documented form: a stock folder, our scheduler passed in
    loaded = WanPipeline.from_pretrained(tmp_path, scheduler=WanFlowUniPCScheduler(flow_shift=3.0), **none)
    assert type(loaded.scheduler) is WanFlowUniPCScheduler


@pytest.mark.parametrize("scheduler", [WanFlowMatchScheduler(shift=5.0), WanFlowUniPCScheduler(flow_shift=5.0)],
                         ids=["flow_match", "flow_unipc"])
def test_stock_pipelines_run_with_our_schedulers(scheduler):
    ctx = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    model = tiny_transformer()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=ctx, negative_prompt_embeds=-ctx, latents=noise, height=32, width=32, num_frames=5,
               num_inference_steps=3, output_type="latent", return_dict=False)[0]
    assert out.shape == noise.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert [int(t[0]) for t in seen[::2]] == [int(t) for t in scheduler.timesteps]
    # stock video-to-video: add_noise path and the timestep look-up without set_begin_index
    v2v = WanVideoToVideoPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=tiny_vae(),
                                  scheduler=scheduler)
    v2v.set_progress_bar_config(disable=True)
    video = torch.rand(1, 5, 3, 32, 32)  # [B, F, C, H, W] in [0, 1]
    out = v2v(video=video, prompt_embeds=ctx, negative_prompt_embeds=-ctx, height=32, width=32, num_inference_steps=4,
              strength=0.5, output_type="latent", return_dict=False, generator=torch.Generator().manual_seed(0))[0]
    assert out.shape == (1, 16, 2, 4, 4) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------- pipeline subclasses
def test_v2v_denoising_strength_vs_stock_strength():
    ctx = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    x0 = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    model = tiny_transformer()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["timestep"][0].item(), kw["hidden_states"])),
                                    with_kwargs=True)
    common = dict(prompt_embeds=ctx, negative_prompt_embeds=-ctx, height=32, width=32, num_inference_steps=4,
                  output_type="latent", return_dict=False, cfg_batching=False)  # stock's two forwards per step
    for scheduler in (WanFlowMatchScheduler(shift=5.0), FlowMatchEulerDiscreteScheduler(shift=5.0)):
        pipe = WanVideoToVideoReferencePipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                                                scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        seen.clear()
        pipe(video_latents=x0, noise=noise, denoising_strength=0.6, **common)
        ref_sigmas, ref_t = diffsynth_wan_schedule(4, 0.6, 5.0)
        torch.testing.assert_close(torch.tensor([t for t, _ in seen[::2]]), ref_t, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(seen[0][1], (1 - ref_sigmas[0]) * x0 + ref_sigmas[0] * noise)
    # stock rule (denoising_strength=None): int(4 * 0.6) = 2 steps at the tail of the full schedule
    pipe = WanVideoToVideoReferencePipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                                            scheduler=WanFlowMatchScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    seen.clear()
    pipe(video_latents=x0, noise=noise, strength=0.6, **common)
    assert [round(t, 3) for t, _ in seen[::2]] == [833.333, 625.0]
    with pytest.raises(ValueError):
        WanVideoToVideoReferencePipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                                         scheduler=UniPCMultistepScheduler())(
            video_latents=x0, denoising_strength=0.6, **common)


def _run_i2v(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    ctx = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    steps = []
    out = pipe(prompt_embeds=ctx, negative_prompt_embeds=-ctx, height=32, width=32, num_frames=5,
               num_inference_steps=3, output_type="latent", return_dict=False,
               callback_on_step_end=lambda p, i, t, k: steps.append(k["latents"].clone()) or {}, **kw)[0]
    return out, steps


def test_i2v_image_latents_equal_vae_path():
    """Wan2.1-style I2V (36 channels): image_latents give exactly the model inputs of the stock VAE path."""
    vae = tiny_vae()
    model = tiny_transformer(in_channels=36)
    inputs = []
    model.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"]), with_kwargs=True)
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    image = torch.rand(1, 3, 32, 32)
    stock = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=WanFlowMatchScheduler(),
                                    transformer=model)
    out_stock, _ = _run_i2v(stock, image=image, latents=noise)
    stock_inputs = list(inputs)
    # the latents the stock pipeline encodes: [image, zeros], normalized
    pix = stock.video_processor.preprocess(image, height=32, width=32).unsqueeze(2)
    video = torch.cat([pix, pix.new_zeros(1, 3, 4, 32, 32)], dim=2)
    z = (vae.encode(video).latent_dist.mode() - 0.1) / 2.0
    inputs.clear()
    ours = WanImageToVideoReferencePipeline(tokenizer=None, text_encoder=None, vae=vae,
                                            scheduler=WanFlowMatchScheduler(), transformer=model)
    out_ours, _ = _run_i2v(ours, image_latents=z, latents=noise, cfg_batching=False)
    for a, b in zip(inputs, stock_inputs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_ours, out_stock, rtol=0, atol=1e-6)


def test_ti2v_pinning_and_stock_equivalence():
    """TI2V (expand_timesteps): same model inputs and final latents as stock; per-step latents pinned to the image."""
    model = tiny_transformer(in_channels=16)
    vae = tiny_vae()
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    image = torch.rand(1, 3, 32, 32)
    stock = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=WanFlowMatchScheduler(),
                                    transformer=model, expand_timesteps=True)
    out_stock, steps_stock = _run_i2v(stock, image=image, latents=noise)
    pix = stock.video_processor.preprocess(image, height=32, width=32).unsqueeze(2)
    z = (vae.encode(pix).latent_dist.mode() - 0.1) / 2.0
    ours = WanImageToVideoReferencePipeline(tokenizer=None, text_encoder=None, vae=vae,
                                            scheduler=WanFlowMatchScheduler(), transformer=model,
                                            expand_timesteps=True)
    out_ours, steps_ours = _run_i2v(ours, image_latents=z, latents=noise, cfg_batching=False)
    torch.testing.assert_close(out_ours, out_stock, rtol=0, atol=1e-6)
    for a, b in zip(steps_ours, steps_stock):
        torch.testing.assert_close(a[:, :, 1:], b[:, :, 1:], rtol=0, atol=1e-6)  # other frames: identical
        torch.testing.assert_close(a[:, :, :1], z, rtol=0, atol=0)  # frame 0: pinned (stock: drifting noise)
        assert not torch.allclose(b[:, :, :1], z)
    with pytest.raises(ValueError):
        _run_i2v(ours, image_latents=z[:, :, :, :2], latents=noise)
