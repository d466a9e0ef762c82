"""Context-window schedules (uniform / looped / static, FreeNoise) and segment continuation for long videos.

The schedules' windows are checked against hand-derived lists and for coverage; the hook running a schedule inside a
pipeline is checked against an explicit per-window loop written here; the continuation helper runs a tiny I2V pipeline.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from diffusers_wan_ext import WanExtPipeline
from diffusers_wan_ext.hooks.sliding_window import apply_sliding_window, remove_sliding_window
from diffusers_wan_ext.runtime.context_windows import (
    FUSE_METHODS,
    StaticStandardSchedule,
    UniformLoopedSchedule,
    UniformStandardSchedule,
    apply_freenoise,
    context_schedule,
    freenoise_latents,
    latent_frames,
    ordered_halving,
)
from diffusers_wan_ext.runtime.long_video import continuation_frames, generate_long_video, to_pil
from test_fun_pipelines import make_scheduler, make_text_parts, make_transformer, make_vae

LENGTHS = (1, 5, 8, 9, 13, 21, 30, 47)


def _schedules():
    return [StaticStandardSchedule(8, 2), UniformStandardSchedule(8, 2), UniformLoopedSchedule(8, 2),
            UniformStandardSchedule(6, 3, context_stride=3), UniformLoopedSchedule(6, 1, context_stride=2,
                                                                                   closed_loop=False)]


# ------------------------------------------------------------------------------------------------ windows
def test_static_windows():
    s = StaticStandardSchedule(8, 2)
    assert s.frame_windows(21) == [list(range(0, 8)), list(range(6, 14)), list(range(12, 20)), list(range(13, 21))]
    assert s.frame_windows(20, 5) == [list(range(0, 8)), list(range(6, 14)), list(range(12, 20))]
    assert s.frame_windows(5) == [[0, 1, 2, 3, 4]]  # shorter than a window: one window of all frames
    assert all(s.frame_windows(30, k) == s.frame_windows(30) for k in range(6))  # static: every step alike
    assert s.windows(21) == [range(0, 8), range(6, 14), range(12, 20), range(13, 21)]


def test_ordered_halving():
    assert [ordered_halving(k) for k in range(5)] == [0.0, 0.5, 0.25, 0.75, 0.125]


def test_uniform_windows_move_with_the_step():
    s = UniformStandardSchedule(8, 2)
    assert s.frame_windows(21, 0) == [list(range(0, 8)), list(range(6, 14)), list(range(12, 20)),
                                      list(range(13, 21))]
    # step 1: offset round(21 * 0.5) = 10; the window reaching around (18..25 -> 18,19,20,0..4) moves back to the
    # end and a window starting at frame 0 is added
    assert s.frame_windows(21, 1) == [list(range(10, 18)), list(range(13, 21)), list(range(0, 8)),
                                      list(range(1, 9)), list(range(7, 15))]
    assert s.frame_windows(21, None) == s.frame_windows(21, 0)


def test_looped_windows_wrap():
    s = UniformLoopedSchedule(8, 2)
    assert s.frame_windows(21, 0) == [list(range(0, 8)), list(range(6, 14)), list(range(12, 20)),
                                      [18, 19, 20, 0, 1, 2, 3, 4]]
    windows = s.windows(21, 0)
    assert windows[:3] == [range(0, 8), range(6, 14), range(12, 20)]
    assert windows[3] == [18, 19, 20, 0, 1, 2, 3, 4]  # wraps: a frame list for the hook
    open_loop = UniformLoopedSchedule(8, 2, closed_loop=False)
    assert open_loop.frame_windows(20, 0) == [list(range(0, 8)), list(range(6, 14)), list(range(12, 20))]
    assert s.frame_windows(20, 0)[-1] == [18, 19, 0, 1, 2, 3, 4, 5]  # closed loop: also across the seam


def test_strided_levels():
    s = UniformStandardSchedule(4, 1, context_stride=3)
    windows = s.frame_windows(16, 0)
    assert [0, 2, 4, 6] in windows and [7, 9, 11, 13] in windows  # level 1: every 2nd frame, 2 * 4 - 1 apart
    assert [0, 4, 8, 12] in windows  # level 2: every 4th frame
    assert all(len(set(w)) == len(w) for w in windows)
    # a level whose window would span more frames than the video is left out (no window wraps onto itself)
    assert all(w[1] - w[0] == 1 for w in UniformLoopedSchedule(6, 1, context_stride=3).frame_windows(10, 0))


@pytest.mark.parametrize("schedule", _schedules(), ids=repr)
def test_every_frame_covered_with_positive_weight(schedule):
    for num_frames in LENGTHS:
        for step in range(8):
            windows = schedule.windows(num_frames, step)
            total = torch.zeros(num_frames)
            for window, frames in zip(windows, schedule.frame_windows(num_frames, step)):
                assert list(window) == frames
                assert all(0 <= f < num_frames for f in frames)
                assert len(frames) == min(schedule.context_frames, num_frames)
                weight = schedule.weights(num_frames, window, step)
                assert weight.shape == (len(frames),) and bool((weight > 0).all())
                total.index_add_(0, torch.tensor(frames), weight)
            assert bool((total > 0).all()), (num_frames, step, windows)


@pytest.mark.parametrize("fuse_method", FUSE_METHODS)
def test_weights_positive_for_every_fuse_method(fuse_method):
    for overlap in (0, 1, 3):
        s = UniformStandardSchedule(6, overlap, fuse_method=fuse_method)
        for num_frames in (4, 6, 7, 17):
            for step in range(4):
                assert all(bool((s.weights(num_frames, w) > 0).all()) for w in s.windows(num_frames, step))


def test_linear_weights_cross_fade():
    s = StaticStandardSchedule(8, 2)
    assert s.weights(20, range(0, 8)).tolist() == pytest.approx([1] * 6 + [2 / 3, 1 / 3])
    assert s.weights(20, (6, 14)).tolist() == pytest.approx([1 / 3, 2 / 3] + [1] * 4 + [2 / 3, 1 / 3])
    total = torch.zeros(20)  # windows 6 frames apart overlapping by 2: the weights sum to 1 everywhere
    for w in s.windows(20):
        total[w.start:w.stop] += s.weights(20, w)
    assert torch.allclose(total, torch.ones(20))
    looped = UniformLoopedSchedule(8, 2)  # looped: every side has a neighbour
    assert looped.weights(21, range(0, 8))[0] < 1
    pyramid = StaticStandardSchedule(5, 2, fuse_method="pyramid")
    assert pyramid.weights(12, range(3, 8)).tolist() == pytest.approx([1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
    assert StaticStandardSchedule(5, 2, fuse_method="flat").weights(12, range(3, 8)).tolist() == [1.0] * 5


def test_context_schedule_by_name_and_errors():
    assert isinstance(context_schedule("uniform_looped", 21), UniformLoopedSchedule)
    assert context_schedule("uniform_standard", 21, 6, 2).context_stride == 2
    assert context_schedule("static_standard", 21, 6).frame_windows(40) == StaticStandardSchedule(21, 6).frame_windows(40)
    assert latent_frames(81) == 21 and latent_frames(241) == 61
    bad = [
        (lambda: context_schedule("uniform", 21), "unknown context schedule"),
        (lambda: context_schedule("static_standard", 21, 4, 2), "contiguous"),
        (lambda: UniformStandardSchedule(8, 8), r"context_overlap \(8\) must be smaller than context_frames \(8\)"),
        (lambda: UniformStandardSchedule(8, 9), "must be smaller"),
        (lambda: StaticStandardSchedule(0), "context_frames must be a positive"),
        (lambda: StaticStandardSchedule(-3), "context_frames must be a positive"),
        (lambda: StaticStandardSchedule(8, -1), "context_overlap must be"),
        (lambda: UniformLoopedSchedule(8, 2, context_stride=0), "context_stride must be a positive"),
        (lambda: StaticStandardSchedule(8, 2, fuse_method="cosine"), "fuse_method must be one of"),
        (lambda: StaticStandardSchedule(8, 2).frame_windows(0), "num_frames must be a positive"),
        (lambda: apply_freenoise(torch.zeros(1, 1, 9, 1, 1), 4, 4), "smaller than context_frames"),
        (lambda: freenoise_latents((1, 16, 0, 2, 2), 4, 1), "no frames"),
        (lambda: latent_frames(0), "video_frames must be positive"),
    ]
    for make, message in bad:
        with pytest.raises(ValueError, match=message):
            make()


# ------------------------------------------------------------------------------------------------ FreeNoise
def _source_frame(noise: torch.Tensor, t: int, first: int) -> list[int]:
    return [k for k in range(first) if torch.equal(noise[:, :, t], noise[:, :, k])]


def test_freenoise_reuses_the_first_window():
    shape, frames, overlap = (1, 4, 17, 3, 3), 6, 2
    noise = freenoise_latents(shape, frames, overlap, generator=torch.Generator().manual_seed(0))
    assert noise.shape == shape and noise.dtype == torch.float32
    again = freenoise_latents(shape, frames, overlap, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise, again)  # deterministic
    assert not torch.equal(noise, freenoise_latents(shape, frames, overlap, generator=torch.Generator().manual_seed(1)))
    base = randn_tensor(shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise[:, :, :frames], base[:, :, :frames])  # the first window keeps its draw
    origin = [_source_frame(noise, t, frames) for t in range(17)]
    assert all(len(o) == 1 for o in origin)  # every frame repeats exactly one of the first window's frames
    delta = frames - overlap
    for start in range(0, 17 - frames, delta):  # each chunk: a shuffle of the chunk one window earlier
        place = start + frames
        n = min(delta, 17 - place)
        assert sorted(origin[place:place + n]) == sorted(origin[start:start + n])


def test_freenoise_short_video_and_generators():
    shape = (2, 3, 5, 2, 2)
    plain = randn_tensor(shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(freenoise_latents(shape, 8, 2, generator=torch.Generator().manual_seed(3)), plain)
    gens = [torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)]
    noise = freenoise_latents((2, 3, 12, 2, 2), 4, 1, generator=gens)
    assert noise.shape == (2, 3, 12, 2, 2)
    assert all(_source_frame(noise, t, 4) for t in range(4, 12))
    src = torch.arange(9.0).view(1, 1, 9, 1, 1)
    out = apply_freenoise(src, 3, 0, generator=torch.Generator().manual_seed(0))
    assert sorted(out.flatten()[3:6].tolist()) == [0, 1, 2] and sorted(out.flatten()[6:].tolist()) == [0, 1, 2]
    assert torch.equal(src.flatten(), torch.arange(9.0))  # the input is left alone


# ------------------------------------------------------------------------------------------------ hook + pipeline
def _explicit_forward(original, schedule, step_of):
    """The transformer's forward as an explicit loop over the schedule's windows (the reference)."""

    def forward(hidden_states, timestep, encoder_hidden_states, return_dict=True, **kwargs):
        num_frames = hidden_states.shape[2]
        step = step_of()
        value = weight = None
        for frames in schedule.frame_windows(num_frames, step):
            index = torch.tensor(frames)
            out = original(hidden_states=hidden_states.index_select(2, index), timestep=timestep,
                           encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)[0]
            w = schedule.weights(num_frames, frames)
            if value is None:
                value = torch.zeros((*out.shape[:2], num_frames, *out.shape[3:]))
                weight = torch.zeros(num_frames)
            value.index_add_(2, index, out.float() * w.view(1, 1, -1, 1, 1))
            weight.index_add_(0, index, w)
        result = (value / weight.view(1, 1, -1, 1, 1)).to(out.dtype)
        return (result,)

    return forward


def test_hook_runs_strided_schedule_like_explicit_loop():
    model = make_transformer(16, clip=False, stock=True, seed=3)
    schedule = UniformStandardSchedule(3, 1, context_stride=2)
    x = torch.randn(1, 16, 9, 4, 4, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    for step in (0, 1, 2):
        assert any(w[1] - w[0] == 2 for w in schedule.frame_windows(9, step))
        with torch.no_grad():
            expected = _explicit_forward(model.forward, schedule, lambda: step)(x, t, text)[0]
            apply_sliding_window(model, schedule=schedule)
            with model.cache_context("cond", step_index=step):
                got = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            remove_sliding_window(model)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def text_parts(tmp_path_factory):
    return make_text_parts(tmp_path_factory.mktemp("ctx") / "umt5")


def test_pipeline_with_looped_schedule_equals_explicit_loop(text_parts):
    tokenizer, text_encoder = text_parts
    pipe = WanExtPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=make_vae(), scheduler=make_scheduler(),
                          transformer=make_transformer(16, clip=False, stock=True, seed=5))
    schedule = UniformLoopedSchedule(3, 1, fuse_method="pyramid")
    num_frames, steps = 25, 3  # 7 latent frames: windows wrap, and move at every step
    assert schedule.frame_windows(7, 0) != schedule.frame_windows(7, 1)
    latents = freenoise_latents((1, 16, 7, 2, 2), 3, 1, generator=torch.Generator().manual_seed(0))
    call = dict(prompt="a red fox", negative_prompt="blurry", height=16, width=16, num_frames=num_frames,
                num_inference_steps=steps, guidance_scale=4.0, cfg_batching=True, output_type="latent",
                latents=latents)
    apply_sliding_window(pipe.transformer, schedule=schedule)
    try:
        got = pipe(**call).frames
    finally:
        remove_sliding_window(pipe.transformer)
    calls = []  # one batched cond + uncond forward per step
    pipe.transformer.forward = _explicit_forward(pipe.transformer.forward, schedule, lambda: len(calls) - 1)
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    expected = pipe(**call).frames
    assert len(calls) == steps
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ continuation
class _FakeVideoPipeline:
    """Returns frames numbered from a counter; a ``video`` argument's frames come first (a continuing pipeline)."""

    def __init__(self):
        self.calls = []
        self.counter = 0

    def __call__(self, prompt=None, image=None, video=None, num_frames=9, height=2, width=2, output_type="np",
                 return_dict=True):
        self.calls.append(dict(prompt=prompt, image=image, video=video))
        k = 0 if video is None else len(video)
        new = [np.full((height, width, 3), (self.counter + i) / 100, dtype=np.float32) for i in range(num_frames - k)]
        self.counter += num_frames - k
        frames = ([] if video is None else list(video)) + new

        class Out:
            pass

        out = Out()
        out.frames = np.stack(frames)[None]
        return out


def test_continuation_joins_segments_without_the_overlap():
    pipe = _FakeVideoPipeline()
    video = generate_long_video(pipe, ["a", "b", "c"], segments=3, num_frames=9, overlap_frames=3, condition="video")
    assert video.shape == (continuation_frames(3, 9, 3), 2, 2, 3) == (21, 2, 2, 3)
    assert np.allclose(video[:, 0, 0, 0], np.arange(21) / 100)  # no repeated frame
    assert [c["prompt"] for c in pipe.calls] == ["a", "b", "c"]
    assert pipe.calls[0]["video"] is None
    assert np.allclose(pipe.calls[1]["video"][:, 0, 0, 0], np.arange(6, 9) / 100)
    assert np.allclose(pipe.calls[2]["video"][:, 0, 0, 0], np.arange(12, 15) / 100)


def test_continuation_errors_before_any_call():
    pipe = _FakeVideoPipeline()
    bad = [
        (dict(segments=0), "segments must be a positive"),
        (dict(overlap_frames=9), r"overlap_frames \(9\) must be smaller than num_frames \(9\)"),
        (dict(overlap_frames=2), "image-conditioned segment continues from one frame"),
        (dict(condition="latent"), "condition must be one of"),
        (dict(output_type="pil"), "sets 'output_type' itself"),
        (dict(num_videos_per_prompt=2), "num_videos_per_prompt must be 1"),
        (dict(prompt=["a"]), "a list of 2 strings"),
    ]
    for kwargs, message in bad:
        call = {**dict(prompt="p", segments=2, num_frames=9), **kwargs}
        with pytest.raises(ValueError, match=message):
            generate_long_video(pipe, call.pop("prompt"), **call)
    with pytest.raises(ValueError, match="takes no 'image' argument"):
        generate_long_video(lambda prompt, num_frames, output_type, return_dict: None, "p")
    assert pipe.calls == []


def test_continuation_on_tiny_i2v_pipeline(text_parts):
    from diffusers_wan_ext import WanImageToVideoReferencePipeline
    from diffusers_wan_ext.schedulers import WanFlowMatchScheduler
    from test_fun_pipelines import picture

    tokenizer, text_encoder = text_parts
    cls = type("RecordingI2V", (WanImageToVideoReferencePipeline,), {})
    calls, outputs = [], []
    original = WanImageToVideoReferencePipeline.__call__

    @functools.wraps(original)
    def record(self, *args, **kwargs):
        calls.append(kwargs)
        out = original(self, *args, **kwargs)
        outputs.append(out.frames[0])
        return out

    cls.__call__ = record
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=make_vae(), scheduler=WanFlowMatchScheduler(),
               transformer=make_transformer(36, clip=False, stock=True, seed=11))
    first = picture(11, size=(16, 16))
    video = generate_long_video(pipe, "a red fox", image=first, segments=3, num_frames=5, height=16, width=16,
                                num_inference_steps=1, guidance_scale=4.0, negative_prompt="blurry",
                                generator=torch.Generator().manual_seed(0))
    assert video.shape == (13, 16, 16, 3) and video.dtype == np.float32
    assert calls[0]["image"] is first
    for k in (1, 2):  # each segment starts from the previous one's last frame, which it reproduces first
        assert np.array_equal(np.asarray(calls[k]["image"]), np.asarray(to_pil(outputs[k - 1][-1])))
    np.testing.assert_array_equal(video[:5], outputs[0])
    np.testing.assert_array_equal(video[5:9], outputs[1][1:])
    np.testing.assert_array_equal(video[9:], outputs[2][1:])


def test_long_video_example_tiny(tmp_path):
    """examples/long_video.py t2v on the tiny default: 41 frames in windows of 5 latent frames, FreeNoise."""
    import importlib.util

    import imageio.v3 as iio

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("long_video_example", ROOT / "examples" / "long_video.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "long.mp4"
    example.main(["t2v", "--tiny", "--output", str(out), "--schedule", "uniform_looped", "--fuse-method", "pyramid"])
    assert iio.imread(out).shape[0] == 41
