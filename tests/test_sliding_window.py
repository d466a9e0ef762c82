"""Sliding-window DiT forwards (DiffSynth-Studio's ``sliding_window_size`` / ``sliding_window_stride``), on CPU.

The window enumeration against the golden manifests and hand-derived lists; the hook against an explicit per-window
loop (windows of the enumeration, DiffSynth's blend masks) on tiny models of every family that supports windows; the
pipelines' ``sliding_window_size`` / ``sliding_window_stride`` against the hook applied by hand; the families that
cannot be windowed refuse with their reason.
"""

from __future__ import annotations

import json
import types
from functools import partial

import pytest
import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

from diffusers_wan_ext import (  # the package registers the families' declarations
    LongCatVideoTransformer3DModel,
    WanAnimateExtTransformer3DModel,
    WanExtPipeline,
    WanFunControlPipeline,
    WanFunTransformer3DModel,
    WanS2VTransformer3DModel,
    WanStreamingPipeline,
    WanVideoAsPromptTransformer3DModel,
)
from diffusers_wan_ext.hooks.sliding_window import (
    SlidingWindowSchedule,
    WindowSchedule,
    apply_sliding_window,
    blend_weights,
    check_sliding_window,
    current_schedule,
    remove_sliding_window,
    skipped_window_starts,
    sliding_window_unsupported_reason,
    sliding_windows,
)
from diffusers_wan_ext.pipelines.denoising import WanDenoisingMixin
from golden_runners.core import GOLDENS_DIR
from helpers import blend_windows, latents_of, run_main
from test_fun_pipelines import build, control_frames, make_scheduler, make_transformer
from test_fun_pipelines import parts  # noqa: F401  (fixture: tiny umT5, VAE and CLIP)

GOLDENS = GOLDENS_DIR  # $WAN_GOLDENS_DIR, else the shipped tests/goldens
TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ enumeration
@pytest.mark.parametrize("case", ["dit_sliding_window", "dit_sliding_window_i2v"])
def test_enumeration_matches_golden_manifest(case):
    manifest = GOLDENS / case / "manifest.json"
    if not manifest.is_file():
        pytest.skip(f"no {case} fixture under {GOLDENS}")
    spec = json.loads(manifest.read_text()).get("sliding_window")
    if not spec or not {"latent_frames", "size", "stride", "windows"} <= set(spec):
        pytest.skip(f"{case}: the manifest states no sliding_window enumeration")
    t, size, stride = spec["latent_frames"], spec["size"], spec["stride"]
    assert [list(w) for w in sliding_windows(t, size, stride)] == spec["windows"]
    if "skipped_window_starts" in spec:
        assert skipped_window_starts(t, size, stride) == spec["skipped_window_starts"]
    if "masks" in spec:
        masks = [blend_weights(t, a, b, spec["border_width"]).tolist() for a, b in spec["windows"]]
        assert masks == spec["masks"]


@pytest.mark.parametrize("frames, size, stride, windows, skipped", [
    (7, 4, 2, [(0, 4), (2, 6), (4, 7)], [6]),
    (8, 4, 2, [(0, 4), (2, 6), (4, 8)], [6]),
    (3, 4, 2, [(0, 3)], [2]),                       # S >= T: one window of every frame
    (4, 4, 1, [(0, 4)], [1, 2, 3]),                 # S == T
    (9, 3, 3, [(0, 3), (3, 6), (6, 9)], []),        # s == S: no overlap, no ramps
    (10, 4, 3, [(0, 4), (3, 7), (6, 10)], [9]),     # T reached exactly
    (11, 4, 3, [(0, 4), (3, 7), (6, 10), (9, 11)], []),  # T not reached by the stride: a short last window
    (21, 8, 4, [(0, 8), (4, 12), (8, 16), (12, 20), (16, 21)], [20]),
    (1, 2, 1, [(0, 1)], []),
])
def test_enumeration_hand_derived(frames, size, stride, windows, skipped):
    assert sliding_windows(frames, size, stride) == windows
    assert skipped_window_starts(frames, size, stride) == skipped


def test_blend_weights():
    assert blend_weights(11, 9, 11, 1).tolist() == [0.5, 1.0]
    assert blend_weights(9, 0, 3, 0).tolist() == [1.0, 1.0, 1.0]
    # both ramps wider than half the window: the falling one is written last (DiffSynth's order)
    assert blend_weights(9, 1, 5, 3).tolist() == pytest.approx([1 / 6, 5 / 6, 0.5, 1 / 6])


@pytest.mark.parametrize("size, stride, message", [
    (4, None, "give both"), (0, 1, "sliding_window_size must be a positive integer"),
    (4, 5, "must not exceed"), (4.0, 2, "positive integer"), (True, 1, "positive integer"),
])
def test_check_sliding_window(size, stride, message):
    with pytest.raises(ValueError, match=message):
        check_sliding_window(size, stride)


def test_schedule_is_a_window_schedule():
    assert isinstance(SlidingWindowSchedule(4, 2), WindowSchedule)
    with pytest.raises(ValueError, match="stride"):
        SlidingWindowSchedule(2, 3)


# ------------------------------------------------------------------------------- hook vs explicit windows
WAN = dict(num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2)


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def explicit(model, kwargs, size, stride, sliced=("hidden_states",), axes=None, per_token=False):
    """The reference: one forward per window of :func:`sliding_windows` on the sliced inputs, DiffSynth's blend."""
    axes = axes or {}
    t = kwargs["hidden_states"].shape[2]
    windows, outputs = sliding_windows(t, size, stride), []
    for a, b in windows:
        window = dict(kwargs)
        for name in sliced:
            window[name] = kwargs[name].narrow(axes.get(name, 2), a, b - a)
        if per_token:
            n = kwargs["timestep"].shape[1] // t
            window["timestep"] = kwargs["timestep"][:, a * n:b * n]
        outputs.append(model(**window, return_dict=False)[0])
    return blend_windows(outputs, windows, t, size, stride)


def windowed_forward(model, kwargs, size, stride):
    apply_sliding_window(model, size, stride)
    try:
        return model(**kwargs, return_dict=False)[0]
    finally:
        remove_sliding_window(model)


def t2v_case(batch=1, frames=7):
    model = perturbed(WanTransformer3DModel(in_channels=16, out_channels=16, **WAN))
    return model, dict(hidden_states=rand(batch, 16, frames, 4, 4), timestep=torch.full((batch,), 600.0),
                       encoder_hidden_states=rand(batch, 6, 32, seed=1))


def i2v_case():
    model = perturbed(WanTransformer3DModel(in_channels=36, out_channels=16, image_dim=40, added_kv_proj_dim=48,
                                            **WAN))
    latents, y = rand(1, 16, 7, 4, 4), rand(1, 20, 7, 4, 4, seed=2)
    return model, dict(hidden_states=torch.cat([latents, y], dim=1), timestep=torch.tensor([600.0]),
                       encoder_hidden_states=rand(1, 6, 32, seed=1), encoder_hidden_states_image=rand(1, 257, 40))


@torch.no_grad()
@pytest.mark.parametrize("size, stride", [(4, 2), (3, 1), (3, 3), (5, 4)])
def test_t2v_hook_equals_explicit_windows(size, stride):
    model, kwargs = t2v_case()
    got = windowed_forward(model, kwargs, size, stride)
    torch.testing.assert_close(got, explicit(model, kwargs, size, stride), rtol=0, atol=0)
    assert not torch.allclose(got, model(**kwargs).sample, atol=1e-3)  # windows change the result
    assert current_schedule(model) is None


@torch.no_grad()
def test_window_covering_every_frame_is_the_plain_forward():
    model, kwargs = t2v_case()
    torch.testing.assert_close(windowed_forward(model, kwargs, 7, 2), model(**kwargs).sample, rtol=0, atol=0)


@torch.no_grad()
def test_i2v_y_sliced_clip_whole():
    """I2V: ``y`` is in hidden_states' channels, so it is cut with the latents; the CLIP feature is not."""
    model, kwargs = i2v_case()
    torch.testing.assert_close(windowed_forward(model, kwargs, 3, 2), explicit(model, kwargs, 3, 2), **TOL)


@torch.no_grad()
def test_ti2v_per_token_timesteps_are_sliced():
    model, kwargs = t2v_case()
    n = 2 * 2  # tokens per latent frame (4x4 latents, patch 2x2)
    timestep = torch.full((1, 7 * n), 600.0)
    timestep[:, :n] = 0  # TI2V: the clean first frame
    kwargs["timestep"] = timestep
    got = windowed_forward(model, kwargs, 4, 2)
    torch.testing.assert_close(got, explicit(model, kwargs, 4, 2, per_token=True), rtol=0, atol=0)


@torch.no_grad()
def test_fun_camera_latents_sliced_reference_whole():
    model = perturbed(WanFunTransformer3DModel(in_channels=32, control_adapter_in_channels=24,
                                               control_adapter_downscale_factor=2, ref_conv_in_channels=None, **WAN))
    kwargs = dict(hidden_states=rand(1, 32, 5, 8, 8), timestep=torch.tensor([600.0]),
                  encoder_hidden_states=rand(1, 6, 32, seed=1), control_camera_latents=rand(1, 24, 5, 16, 16, seed=3))
    want = explicit(model, kwargs, 3, 2, sliced=("hidden_states", "control_camera_latents"))
    torch.testing.assert_close(windowed_forward(model, kwargs, 3, 2), want, rtol=0, atol=0)
    ref = perturbed(WanFunTransformer3DModel(in_channels=36, ref_conv_in_channels=16, **WAN))
    kwargs = dict(hidden_states=rand(1, 36, 5, 8, 8), timestep=torch.tensor([600.0]),
                  encoder_hidden_states=rand(1, 6, 32, seed=1), reference_latents=rand(1, 16, 1, 8, 8, seed=4))
    torch.testing.assert_close(windowed_forward(ref, kwargs, 3, 2), explicit(ref, kwargs, 3, 2), rtol=0, atol=0)


@torch.no_grad()
def test_vace_control_sliced_with_the_latents():
    """VACE: ``control_hidden_states`` is cut like the latents (DiffSynth passes ``vace_context`` whole, which
    cannot fit a window's tokens)."""
    model = perturbed(WanVACETransformer3DModel(in_channels=16, out_channels=16, vace_layers=[0, 1],
                                                vace_in_channels=32, **WAN))
    kwargs = dict(hidden_states=rand(1, 16, 6, 4, 4), timestep=torch.tensor([600.0]),
                  encoder_hidden_states=rand(1, 6, 32, seed=1), control_hidden_states=rand(1, 32, 6, 4, 4, seed=5))
    want = explicit(model, kwargs, 4, 2, sliced=("hidden_states", "control_hidden_states"))
    torch.testing.assert_close(windowed_forward(model, kwargs, 4, 2), want, rtol=0, atol=0)


@torch.no_grad()
def test_vap_reference_video_goes_whole_to_every_window():
    model = perturbed(WanVideoAsPromptTransformer3DModel(in_channels=36, image_dim=40, added_kv_proj_dim=48,
                                                         text_len=8, vap_layers=[0], **WAN))
    kwargs = dict(hidden_states=rand(1, 36, 5, 4, 4), timestep=torch.tensor([600.0]),
                  encoder_hidden_states=rand(1, 8, 32, seed=1), encoder_hidden_states_image=rand(1, 4, 40, seed=2),
                  vap_hidden_states=rand(1, 36, 2, 4, 4, seed=3), vap_encoder_hidden_states=rand(1, 8, 32, seed=4),
                  vap_encoder_hidden_states_image=rand(1, 4, 40, seed=5))
    torch.testing.assert_close(windowed_forward(model, kwargs, 3, 2), explicit(model, kwargs, 3, 2), rtol=0, atol=0)


@torch.no_grad()
def test_cfg_batch_equals_two_calls():
    model, kwargs = t2v_case(batch=2)
    both = windowed_forward(model, kwargs, 4, 2)
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in kwargs.items()}
        torch.testing.assert_close(both[i:i + 1], windowed_forward(model, one, 4, 2), **TOL)


@torch.no_grad()
def test_lora_is_windowed_too():
    from peft import LoraConfig

    model, kwargs = t2v_case()
    plain = windowed_forward(model, kwargs, 4, 2)
    torch.manual_seed(3)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    got = windowed_forward(model, kwargs, 4, 2)
    torch.testing.assert_close(got, explicit(model, kwargs, 4, 2), rtol=0, atol=0)
    assert not torch.allclose(got, plain, atol=1e-3)


@torch.no_grad()
def test_cache_context_step_index_reaches_the_schedule_and_each_window_gets_a_context():
    seen = []

    class Recording(SlidingWindowSchedule):
        def windows(self, num_frames, step_index=None):
            seen.append(step_index)
            return super().windows(num_frames, step_index)

    model, kwargs = t2v_case()
    contexts = []
    orig = model.cache_context

    def cache_context(name, **fields):
        contexts.append(name)
        return orig(name, **fields)

    model.cache_context = cache_context
    apply_sliding_window(model, schedule=Recording(4, 2))
    with model.cache_context("cond", step_index=5):
        got = model(**kwargs).sample
    remove_sliding_window(model)
    del model.cache_context
    assert seen == [5] and contexts == ["cond", "cond/window0", "cond/window1", "cond/window2"]
    torch.testing.assert_close(got, explicit(model, kwargs, 4, 2), rtol=0, atol=0)


@torch.no_grad()
def test_index_windows_wrap_around():
    """A schedule may give windows as ``range`` objects or frame lists (context-window schedules: looped)."""

    class Looped:
        def windows(self, num_frames, step_index=None):
            return [(0, 4), (3, 7), [6, 0, 1]]

        def weights(self, num_frames, window, step_index=None):
            return torch.ones(len(window) if isinstance(window, list) else window[1] - window[0])

    model, kwargs = t2v_case()
    apply_sliding_window(model, schedule=Looped())
    got = model(**kwargs).sample
    remove_sliding_window(model)
    x = kwargs["hidden_states"]

    def fwd(frames):
        return model(**dict(kwargs, hidden_states=x[:, :, frames])).sample

    want = torch.zeros_like(got)
    want[:, :, 0:4] += fwd(list(range(0, 4)))
    want[:, :, 3:7] += fwd(list(range(3, 7)))
    loop = fwd([6, 0, 1])
    want[:, :, 6] += loop[:, :, 0]
    want[:, :, 0:2] += loop[:, :, 1:]
    counts = torch.tensor([2.0, 2, 1, 2, 1, 1, 2]).view(1, 1, -1, 1, 1)
    torch.testing.assert_close(got, want / counts, **TOL)


# --------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("cls", [WanS2VTransformer3DModel, WanAnimateExtTransformer3DModel,
                                 LongCatVideoTransformer3DModel])
def test_unsupported_classes_refuse_with_their_reason(cls):
    reason = sliding_window_unsupported_reason(cls)
    assert reason
    model = cls.__new__(cls)  # the declaration is read from the class: no weights needed
    with pytest.raises(ValueError, match=f"not supported for {cls.__name__}: "):
        apply_sliding_window(model, 4, 2)


def test_undeclared_class_with_extra_inputs_is_refused():
    class Extra(WanTransformer3DModel):
        def forward(self, hidden_states, timestep, encoder_hidden_states, mystery_frames=None, return_dict=True):
            return super().forward(hidden_states, timestep, encoder_hidden_states, return_dict=return_dict)

    with pytest.raises(ValueError, match="mystery_frames"):
        apply_sliding_window(Extra.__new__(Extra), 4, 2)


def test_pipeline_refusals():
    for cls in (WanS2VTransformer3DModel, LongCatVideoTransformer3DModel):
        fake = types.SimpleNamespace(sliding_window_unsupported_reason=None, transformer=cls.__new__(cls))
        with pytest.raises(ValueError, match="does not take sliding_window_size"):
            WanDenoisingMixin.check_sliding_window_options(fake, 4, 2)
    streaming = types.SimpleNamespace(
        sliding_window_unsupported_reason=WanStreamingPipeline.sliding_window_unsupported_reason, transformer=None)
    with pytest.raises(ValueError, match="block by block"):
        WanDenoisingMixin.check_sliding_window_options(streaming, 4, 2)
    WanDenoisingMixin.check_sliding_window_options(streaming, None, None)  # off: nothing to refuse
    with pytest.raises(ValueError, match="give both"):
        WanDenoisingMixin.check_sliding_window_options(streaming, 4, None)


# -------------------------------------------------------------------------------------------- pipelines
class FrameCounter:
    """Forward pre-hook on ``patch_embedding``: the latent frames of every (window) forward."""

    def __init__(self, model):
        self.frames = []
        self.handle = model.patch_embedding.register_forward_pre_hook(
            lambda module, args: self.frames.append(args[0].shape[2]))


def t2v_pipe(parts, experts=1):
    kwargs = dict(transformer=perturbed(make_transformer(16, clip=False, stock=True, seed=1)))
    if experts == 2:
        kwargs.update(transformer_2=perturbed(make_transformer(16, clip=False, stock=True, seed=2), seed=5),
                      boundary_ratio=0.875)
    return WanExtPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
                          scheduler=make_scheduler(), **kwargs)


run = partial(latents_of, num_frames=17)


@torch.no_grad()
def test_pipeline_arguments_equal_the_manual_hook(parts):
    pipe = t2v_pipe(parts)
    counter = FrameCounter(pipe.transformer)
    got = run(pipe, sliding_window_size=3, sliding_window_stride=2)  # 5 latent frames: windows [0, 3), [2, 5)
    assert counter.frames == [3, 3] * 2 and current_schedule(pipe.transformer) is None
    apply_sliding_window(pipe.transformer, 3, 2)
    manual = run(pipe)
    remove_sliding_window(pipe.transformer)
    torch.testing.assert_close(got, manual, rtol=0, atol=0)
    unbatched = run(pipe, sliding_window_size=3, sliding_window_stride=2, cfg_batching=False)
    torch.testing.assert_close(got, unbatched, **TOL)
    assert not torch.allclose(got, run(pipe), atol=1e-4)


@torch.no_grad()
def test_pipeline_windows_both_experts_and_removes_the_hook_on_errors(parts):
    pipe = t2v_pipe(parts, experts=2)
    high, low = FrameCounter(pipe.transformer), FrameCounter(pipe.transformer_2)
    run(pipe, num_inference_steps=4, sliding_window_size=4, sliding_window_stride=2)
    assert high.frames and low.frames and set(high.frames + low.frames) == {4, 3}

    def fail(*args):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        run(pipe, sliding_window_size=4, sliding_window_stride=2, callback_on_step_end=fail)
    assert current_schedule(pipe.transformer) is None and current_schedule(pipe.transformer_2) is None
    with pytest.raises(ValueError, match="sliding_window_stride .* must not exceed"):
        run(pipe, sliding_window_size=2, sliding_window_stride=3)


@torch.no_grad()
def test_fun_control_pipeline_windows(parts):
    """Fun control: the control latents are in hidden_states' channels (``y``), cut with the latents."""
    pipe = build(WanFunControlPipeline, parts, perturbed(make_transformer(48, stock=True)), clip=True)
    counter = FrameCounter(pipe.transformer)
    frames = control_frames(n=13)
    got = run(pipe, control_video=frames, num_frames=13, sliding_window_size=3, sliding_window_stride=2)
    assert counter.frames == [3, 2] * 2  # 4 latent frames: windows [0, 3), [2, 4)
    apply_sliding_window(pipe.transformer, 3, 2)
    manual = run(pipe, control_video=frames, num_frames=13)
    remove_sliding_window(pipe.transformer)
    torch.testing.assert_close(got, manual, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("value, fragment", [
    ("4", "expected SIZE,STRIDE"), ("a,2", "SIZE 'a' is not an integer"), ("0,1", "SIZE must be a positive"),
    ("2,3", "STRIDE must not exceed SIZE"), ("4,2,1", "expected SIZE,STRIDE"),
])
def test_cli_rejects_bad_sliding_window(value, fragment, capsys):
    rc, err = run_main(["generate", "--model", "m", "--prompt", "a fox", "--sliding-window", value], capsys)
    assert rc == 2 and "Traceback" not in err and fragment in err.strip().splitlines()[-1], err


def test_cli_generate_with_sliding_window(converted, tmp_path, capsys, monkeypatch):
    import imageio.v3 as iio

    folder = converted("t2v")
    base = ["generate", "--model", str(folder), "--prompt", "a fox", "--height", "32", "--width", "32",
            "--num-frames", "17", "--steps", "1", "--dtype", "fp32"]
    seen = []
    original = SlidingWindowSchedule.windows

    def spy(self, num_frames, step_index=None):
        seen.append((self.size, self.stride, num_frames, step_index))
        return original(self, num_frames, step_index)

    monkeypatch.setattr(SlidingWindowSchedule, "windows", spy)
    rc, err = run_main([*base, "--sliding-window", "4,2", "--output", str(tmp_path / "w.mp4")], capsys)
    assert rc == 0, err
    # stock WanPipeline: the hook on pipe.transformer (cond and uncond forwards); 17 frames = 5 latent frames
    assert seen == [(4, 2, 5, 0)] * 2
    rc, err = run_main([*base, "--output", str(tmp_path / "plain.mp4")], capsys)
    assert rc == 0, err
    assert len(seen) == 2
    windowed_video, plain = iio.imread(tmp_path / "w.mp4"), iio.imread(tmp_path / "plain.mp4")
    assert windowed_video.shape[0] == 17 and windowed_video.shape == plain.shape
