"""Issue 23 audit, Animate-2: the distilled release's few-step schedule and guidance are the call's defaults of a
converted distilled folder (``model_index.json``), not only of ``diffusers-wan generate``; the release folder keeps
DiffSynth's 40 steps at CFG 3."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

import diffusers_wan_ext  # noqa: F401  (registers WanAnimate2Pipeline)
from diffusers_wan_ext.conversion.animate2 import ANIMATE2_RELEASE_FILE
from diffusers_wan_ext.demo import make_tiny_release
from diffusers_wan_ext.families import get_variant
from diffusers_wan_ext.families.animate2 import DISTILLED_FILE
from diffusers_wan_ext_cli import main


class _Stop(Exception):
    """Raised by the step callback once the first step is seen."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("a2-defaults")
    release = make_tiny_release(root / "Wan2.2-Animate-2-14B", arch="animate2")
    shutil.copy(release / ANIMATE2_RELEASE_FILE, release / DISTILLED_FILE)
    out = {}
    for name, extra in (("wan2.2-animate-2-14b", []), ("wan2.2-animate-2-14b-distilled", ["--variant",
                                                                                          "wan2.2-animate-2-14b-distilled"])):
        out[name] = root / name
        assert main(["convert", str(release), str(out[name]), "--image-encoder-heads", "2", "--dtype", "fp32",
                     *extra]) == 0
    return out


def _first_step(pipe) -> tuple[int, int]:
    """(number of scheduler steps, transformer forwards up to the end of the first step) of a default call."""
    calls, seen = [0], {}
    forward = pipe.transformer.forward

    def counting(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    def stop(pipe_, step, timestep, kwargs):
        seen["steps"], seen["forwards"] = len(pipe_.scheduler.timesteps), calls[0]
        raise _Stop

    pipe.transformer.forward = counting
    frame = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    with pytest.raises(_Stop):
        pipe(image=frame, driving_video=[frame] * 5, prompt="a person dancing", height=32, width=32, num_frames=5,
             max_sequence_length=16, callback_on_step_end=stop)
    return seen["steps"], seen["forwards"]


@pytest.mark.parametrize("variant", ["wan2.2-animate-2-14b", "wan2.2-animate-2-14b-distilled"])
def test_call_defaults_come_from_the_converted_folder(folders, variant):
    var = get_variant(variant)
    index = json.loads((folders[variant] / "model_index.json").read_text())
    assert (index["num_inference_steps"], index["guidance_scale"]) == (var.num_inference_steps, var.guidance_scale)
    assert index["log_scale"] == (-1.3 if "distilled" in variant else 0.0)
    pipe = DiffusionPipeline.from_pretrained(str(folders[variant]))
    steps, forwards = _first_step(pipe)
    assert steps == var.num_inference_steps == (10 if "distilled" in variant else 40)
    # the reference pass, then one forward per guidance branch (CFG 1: no negative branch)
    assert forwards == (2 if var.guidance_scale == 1.0 else 3)


def test_a_folder_without_the_entries_keeps_the_release_defaults(folders, tmp_path):
    dst = shutil.copytree(folders["wan2.2-animate-2-14b-distilled"], tmp_path / "old")
    index = json.loads((dst / "model_index.json").read_text())
    del index["num_inference_steps"], index["guidance_scale"]
    (dst / "model_index.json").write_text(json.dumps(index))
    pipe = DiffusionPipeline.from_pretrained(str(dst))
    assert (pipe.config.num_inference_steps, pipe.config.guidance_scale, pipe.config.log_scale) == (40, 3.0, -1.3)


def test_stock_modular_pipeline_still_loads_the_distilled_folder(folders):
    from diffusers.modular_pipelines import WanAnimate2DistilledBlocks

    pipe = WanAnimate2DistilledBlocks().init_pipeline(str(folders["wan2.2-animate-2-14b-distilled"]))
    pipe.load_components(torch_dtype=torch.float32)
    assert pipe.transformer is not None and pipe.image_encoder is not None


def test_reference_cache_is_filled_once_per_clip(folders):
    """A 7-frame driving video in 5-frame clips = 2 clips; 3 steps each: one ``extract`` pass per clip, then one
    ``cached`` pass per step and guidance branch (CFG 2: two) against that clip's cache."""
    pipe = DiffusionPipeline.from_pretrained(str(folders["wan2.2-animate-2-14b"]))
    modes, caches = [], []
    forward = pipe.transformer.forward

    def spy(*args, **kwargs):
        mode = kwargs.get("kv_cache_mode", args[5] if len(args) > 5 else None)
        cache = kwargs.get("kv_cache", args[4] if len(args) > 4 else None)
        modes.append(mode)
        caches.append(id(cache))
        return forward(*args, **kwargs)

    pipe.transformer.forward = spy
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(7)]
    out = pipe(image=frames[0], driving_video=frames, prompt="a person dancing", height=32, width=32, num_frames=5,
               num_inference_steps=3, guidance_scale=2.0, long_video=True, max_sequence_length=16).frames
    assert out.shape[1] == 7
    per_clip = ["extract"] + ["cached"] * 6
    assert modes == per_clip * 2, modes
    assert len(set(caches[:7])) == 1 and caches[0] is not None  # every step of clip 0 reads clip 0's cache
