"""``WanSpeedControlPipeline`` (Wan2.1 speed control) on tiny random components (CPU)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from diffusers import DiffusionPipeline, WanPipeline

from diffusers_wan_ext import WanMotionControllerModel, WanSpeedControlPipeline
from helpers import latents_of, run_python
from test_fun_pipelines import make_scheduler, make_text_parts, make_transformer, make_vae

H = W = 32
F = 5


def make_motion_controller(dim=48, seed=0):
    torch.manual_seed(seed)
    mc = WanMotionControllerModel(freq_dim=32, dim=dim).eval()
    with torch.no_grad():  # the release zero-initialises the last layer; make it matter here
        mc.linear[4].weight.normal_(0, 0.5)
        mc.linear[4].bias.normal_(0, 0.5)
    return mc


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tokenizer, text_encoder = make_text_parts(tmp_path_factory.mktemp("tok") / "umt5")
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=make_vae(),
                transformer=make_transformer(16, clip=False, stock=True))


def build(parts, motion_controller=None, **kwargs):
    return WanSpeedControlPipeline(
        tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
        scheduler=make_scheduler(), transformer=kwargs.pop("transformer", parts["transformer"]),
        motion_controller=motion_controller, **kwargs,
    )


run = partial(latents_of, height=H, width=W, num_frames=F, num_inference_steps=2)


class Spy:
    """Records the modulation (``timestep_proj``) the transformer's condition embedder hands to the blocks."""

    def __init__(self, transformer):
        self.proj = []
        self.handle = transformer.condition_embedder.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.proj.append(output[1].clone())

    def remove(self):
        self.handle.remove()


def test_motion_bucket_ids_differ_and_none_is_stock(parts):
    mc = make_motion_controller()
    pipe = build(parts, motion_controller=mc)
    slow, fast = run(pipe, motion_bucket_id=0), run(pipe, motion_bucket_id=100)
    plain = run(pipe)
    assert slow.shape == (1, 16, (F - 1) // 4 + 1, H // 8, W // 8)
    assert not torch.allclose(slow, fast) and not torch.allclose(slow, plain)
    stock = WanPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
                        scheduler=make_scheduler(), transformer=parts["transformer"])
    # bit-exact with stock's two-forward loop: cfg_batching=False (batched CFG equals it within float rounding)
    torch.testing.assert_close(run(pipe, cfg_batching=False), run(stock), rtol=0, atol=0)
    # the hook is gone after the call
    registry = getattr(parts["transformer"].condition_embedder, "_diffusers_hook", None)
    assert registry is None or registry.get_hook("wan_motion_control") is None


@pytest.mark.parametrize("cfg_batching", [True, False])
def test_offset_on_both_passes_and_constant(parts, cfg_batching):
    """DiffSynth: the same offset in the conditional and unconditional pass, at every step."""
    mc = make_motion_controller()
    pipe = build(parts, motion_controller=mc)
    spy = Spy(parts["transformer"])
    run(pipe, motion_bucket_id=37.0, cfg_batching=cfg_batching)
    with_offset = spy.proj[:]
    spy.proj.clear()
    run(pipe, cfg_batching=cfg_batching)
    spy.remove()
    # 2 steps x (one forward of cond + uncond batched, or two forwards)
    assert len(with_offset) == (2 if cfg_batching else 4)
    offset = mc(torch.tensor([37.0])).offset
    for a, b in zip(with_offset, spy.proj):
        torch.testing.assert_close(a - b, offset.expand_as(a), rtol=1e-5, atol=1e-5)


def test_two_experts_both_get_the_offset(parts):
    high = make_transformer(16, clip=False, stock=True, seed=1)
    low = make_transformer(16, clip=False, stock=True, seed=2)
    pipe = build(parts, motion_controller=make_motion_controller(), transformer=high, transformer_2=low,
                 boundary_ratio=0.875)
    spies = Spy(high), Spy(low)
    a = run(pipe, motion_bucket_id=0)
    b = run(pipe, motion_bucket_id=100)
    for s in spies:
        s.remove()
    # one step per expert and call, cond + uncond in one batched forward
    assert len(spies[0].proj) == 2 and len(spies[1].proj) == 2
    assert not torch.allclose(spies[1].proj[0], spies[1].proj[1])  # low expert: different offsets per id
    assert not torch.allclose(a, b)


def test_save_pretrained_round_trip(parts, tmp_path):
    pipe = build(parts, motion_controller=make_motion_controller(seed=3))
    before = run(pipe, motion_bucket_id=50)
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_wan_ext", "WanSpeedControlPipeline"]
    assert index["motion_controller"] == ["diffusers_wan_ext", "WanMotionControllerModel"]
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "saved"))
    assert type(loaded) is WanSpeedControlPipeline
    assert isinstance(loaded.motion_controller, WanMotionControllerModel)
    torch.testing.assert_close(run(loaded, motion_bucket_id=50), before, rtol=0, atol=0)

    # a fresh interpreter that never imported us loads it through the shims
    code = (
        "from diffusers import DiffusionPipeline\n"
        f"p = DiffusionPipeline.from_pretrained({str(tmp_path / 'saved')!r}, trust_remote_code=True)\n"
        "print(type(p).__name__, type(p.motion_controller).__name__)\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2:] == ["WanSpeedControlPipeline", "WanMotionControllerModel"]


def test_error_missing_motion_controller(parts):
    pipe = build(parts)
    with pytest.raises(ValueError, match="`motion_bucket_id` needs the speed-control `motion_controller`"):
        run(pipe, motion_bucket_id=10)
    run(pipe)  # without motion_bucket_id it is plain WanPipeline


def test_error_motion_controller_of_another_width(parts):
    pipe = build(parts, motion_controller=make_motion_controller(dim=64))
    with pytest.raises(ValueError, match="motion controller is for a 64-wide transformer but `transformer` is 48"):
        run(pipe, motion_bucket_id=10)


def test_error_motion_bucket_id_not_a_number(parts):
    pipe = build(parts, motion_controller=make_motion_controller())
    with pytest.raises(ValueError, match="motion_bucket_id must be one number"):
        run(pipe, motion_bucket_id=[1, 2])
