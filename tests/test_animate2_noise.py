"""Animate-2's initial noise and timestep against DiffSynth-Studio's rules (tiny release, CPU).

DiffSynth's ``WanVideoUnit_NoiseInitializer`` draws ``[1, 16, (F - 1) / 4 + 1 + 1, H / 8, W / 8]`` (one latent frame
more with ``animate2_reference_video``) with ``torch.randn`` in float32 from a new CPU generator seeded with the seed,
and ``generate_long_video`` (examples/wanvideo/model_inference/Wan2.2-Animate-2-14B.py) calls the pipeline once per
clip with the same seed; its loop hands the DiT ``timestep.unsqueeze(0).to(dtype=torch_dtype)``.  The rules are
re-written here from that description and compared with what :class:`WanAnimate2Pipeline` feeds its DiT.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from diffusers_wan_ext.demo import make_tiny_release
from diffusers_wan_ext_cli import main


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    release = make_tiny_release(tmp_path_factory.mktemp("a2-noise") / "rel", arch="animate2")
    dst = tmp_path_factory.mktemp("a2-noise-converted") / "out"
    assert main(["convert", str(release), str(dst), "--image-encoder-heads", "2", "--dtype", "fp32"]) == 0
    pipe = DiffusionPipeline.from_pretrained(str(dst))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames(n: int, seed: int = 0, size: int = 16) -> list[Image.Image]:
    rs = np.random.RandomState(seed)
    return [Image.fromarray(rs.randint(0, 255, (size, size, 3), np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_clip_starts_from_the_seed_and_the_timestep_is_in_the_dit_dtype(pipe, dtype):
    """A long video of two clips: both start from DiffSynth's noise for the seed (in the DiT dtype); every denoising
    call gets the timestep in the DiT dtype (bf16: rounded)."""
    seen = []

    def record(module, args, kwargs):
        mode = kwargs.get("kv_cache_mode", args[5] if len(args) > 5 else None)
        if mode == "cached":
            seen.append((args[0][0].clone(), args[1].clone()))

    pipe.transformer.to(dtype)
    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    seed, steps = 3, 2
    try:
        pipe(image=_frames(1, seed=99)[0], driving_video=_frames(7), prompt="a person dancing", height=16, width=16,
             num_frames=5, num_inference_steps=steps, guidance_scale=1.0, max_sequence_length=16, long_video=True,
             generator=torch.Generator().manual_seed(seed))
    finally:
        handle.remove()
        pipe.transformer.to(torch.float32)
    noise = torch.randn((1, 16, (5 - 1) // 4 + 2, 2, 2), generator=torch.Generator("cpu").manual_seed(seed),
                        device="cpu", dtype=torch.float32)
    assert len(seen) == 2 * steps  # two clips
    for clip in range(2):
        latents, _ = seen[clip * steps]
        assert latents.dtype == dtype and torch.equal(latents, noise[0].to(dtype))
    timesteps = pipe.scheduler.timesteps
    assert (timesteps.to(torch.bfloat16).float() != timesteps).any()  # bf16 rounding shows on these timesteps
    got = torch.cat([t for _, t in seen[-steps:]])
    assert got.dtype == dtype and torch.equal(got.cpu(), timesteps.to(dtype).cpu())
