"""Converted tiny folders of every conditioning pipeline, loaded in a fresh interpreter through both loading routes
(import the package first, or ``trust_remote_code=True`` with the shim) and run end to end."""

from __future__ import annotations

import json

import pytest

from diffusers_wan_ext.release_converter import convert_release

from helpers import run_python

# (name, tiny arch, experts, --variant, pipeline class, call kwargs as Python source)
FOLDERS = [
    ("fun-inp", "i2v", 1, "wan2.1-fun-1.3b-inp", "WanFunInpaintPipeline", "image=img, end_image=img"),
    ("fun-control", "fun-control", 1, None, "WanFunControlPipeline", "control_video=vid"),
    ("fun-v11-control", "fun-control-ref", 1, None, "WanFunControlPipeline", "control_video=vid, reference_image=img"),
    ("fun22-control", "fun-control-ref", 2, None, "WanFunControlPipeline", "control_video=vid, reference_image=img, image=img"),
    ("fun-camera", "fun-camera", 1, None, "WanFunCameraControlPipeline", "image=img, camera_control_direction='LeftUp'"),
    ("fun22-camera", "fun-camera", 2, None, "WanFunCameraControlPipeline", "image=img, camera_control_direction='Right'"),
    ("speed", "t2v", 1, None, "WanSpeedControlPipeline", "motion_bucket_id=50"),
]

RUN = r"""
import json, sys
import numpy as np, torch
from PIL import Image
{prelude}
from diffusers import DiffusionPipeline
rng = np.random.default_rng(0)
img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
vid = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
results = {{}}
for folder, expected, call in {jobs!r}:
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32{trust})
    assert type(pipe).__name__ == expected, (type(pipe).__name__, expected)
    out = eval("pipe(prompt='a fox', negative_prompt='blur', height=32, width=32, num_frames=5, num_inference_steps=2, "
               "output_type='np', max_sequence_length=16, generator=torch.Generator().manual_seed(0), " + call + ")").frames
    assert out.shape == (1, 5, 32, 32, 3) and np.isfinite(out).all(), out.shape
    results[expected + ":" + folder] = float(np.abs(out).mean())
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def folders(tiny_release, tmp_path_factory):
    from diffusers_wan_ext.demo import TINY, make_tiny_motion_controller

    out = {}
    root = tmp_path_factory.mktemp("variant-folders")
    for name, arch, experts, variant, cls, call in FOLDERS:
        mc = make_tiny_motion_controller(root / "mc" / "model.safetensors") if name == "speed" else None
        dst = convert_release(tiny_release(arch, experts), root / name, variant=variant, dtype="fp32", progress=False,
                              image_encoder_heads=TINY["clip_heads"], motion_controller=mc)
        index = json.loads((dst / "model_index.json").read_text())
        assert index["_class_name"] == ["diffusers_wan_ext", cls]
        out[name] = (str(dst), cls, call)
    return out


def _run(jobs, route):
    if route == "import":
        code = RUN.format(prelude="import diffusers_wan_ext", trust="", jobs=jobs)
    else:
        code = RUN.format(prelude="assert 'diffusers_wan_ext' not in sys.modules", trust=", trust_remote_code=True",
                          jobs=jobs)
    proc = run_python(code, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_variant_folder_loads_after_import_and_runs(folders):
    res = _run([folders[name] for name, *_ in FOLDERS], "import")
    assert len(res) == len(FOLDERS)


@pytest.mark.parametrize("name", ["fun-v11-control", "fun22-camera", "speed"])
def test_variant_folder_loads_with_trust_remote_code_in_a_fresh_interpreter(folders, name):
    res = _run([folders[name]], "trust")
    assert len(res) == 1
