"""Wan-Dancer's initial noise and timestep against DiffSynth-Studio's rules (tiny release, CPU).

DiffSynth runs the Wan-Dancer stages as separate ``pipe(seed=...)`` calls (``examples/wanvideo/model_inference/
Wan-Dancer-14B-global.py`` / ``-local.py``, one call per stage and per local segment); every call draws its noise
``[1, 16, (F - 1) / 4 + 1, H / 8, W / 8]`` with ``torch.randn`` in float32 from a new CPU generator seeded with the
seed, and its loop hands the DiT ``timestep.unsqueeze(0).to(dtype=torch_dtype)``.  The rules are re-written here
from that description and compared with what :class:`WanDancerPipeline` feeds its DiTs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_wan_ext import WanDancerPipeline
from diffusers_wan_ext.demo import make_tiny_release
from diffusers_wan_ext_cli import main as cli_main

H, W = 32, 64
SEGMENT = 9


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    release = make_tiny_release(tmp_path_factory.mktemp("dancer-noise") / "Wan-Dancer-14B", arch="dancer")
    out = tmp_path_factory.mktemp("dancer-noise-converted") / "Wan-Dancer-14B-diffusers"
    assert cli_main(["convert", str(release), str(out), "--dtype", "fp32", "--image-encoder-heads", "2"]) == 0
    pipe = WanDancerPipeline.from_pretrained(out, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffsynth_noise(shape, seed: int) -> torch.Tensor:
    """``generate_noise(shape, seed=seed, rand_device="cpu")``: a fresh CPU generator per draw, float32."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_stage_and_segment_starts_from_the_seed(pipe, tmp_path, dtype):
    """The global stage and both local segments get DiffSynth's noise for the seed (in the DiT dtype) and the
    timesteps in the DiT dtype (bf16: rounded)."""
    for model in (pipe.transformer, pipe.transformer_2):
        model.to(dtype)
    seen = []

    def record(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        seen.append((module is pipe.transformer, hidden[:, :16].clone(), timestep.clone()))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in (pipe.transformer, pipe.transformer_2)]
    image = tmp_path / "ref.png"
    Image.fromarray((np.random.default_rng(1).random((H, W, 3)) * 255).astype(np.uint8)).save(image)
    seed, steps = 5, 2
    try:
        pipe(image=str(image), music_features=torch.randn(18, 35, generator=torch.Generator().manual_seed(0)),
             prompt="dance", height=H, width=W, segment_frames=SEGMENT, num_inference_steps=steps,
             local_num_inference_steps=steps, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed))
    finally:
        for h in handles:
            h.remove()
        for model in (pipe.transformer, pipe.transformer_2):
            model.to(torch.float32)
    # 2 keyframes (global: 5 frames at 7.5 fps -> 2 latent frames), then 2 local segments of 9 frames (3 latent)
    assert [s[0] for s in seen] == [True] * steps + [False] * 2 * steps
    shapes = [(1, 16, 2, H // 8, W // 8)] + [(1, 16, 3, H // 8, W // 8)] * 2
    for stage, shape in enumerate(shapes):
        first = seen[stage * steps]
        assert first[1].dtype == dtype and torch.equal(first[1], diffsynth_noise(shape, seed).to(dtype))
    pipe.scheduler.set_timesteps(steps)
    timesteps = pipe.scheduler.timesteps
    assert (timesteps.to(torch.bfloat16).float() != timesteps).any()  # bf16 rounding shows on these timesteps
    for stage in range(3):
        got = torch.cat([s[2] for s in seen[stage * steps:(stage + 1) * steps]])
        assert got.dtype == dtype and torch.equal(got, timesteps.to(dtype))
