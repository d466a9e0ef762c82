"""Converters of the conditioning variants: Fun (Control, V1.1 reference, Camera; Wan2.1 and Wan2.2 A14B), VACE
(Wan2.1 and Wan2.2 VACE-Fun A14B) and the speed-control motion controller."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_wan_ext.conversion.dit import (
    convert_dit_state_dict,
    dit_config_from_state_dict,
    export_dit_state_dict,
    load_dit_from_original,
)
from diffusers_wan_ext.release_converter import choose_variant, convert_release
from diffusers_wan_ext.utils.io import ConversionError

from helpers import run_python

CASES = [  # (tiny arch, experts, Diffusers class, variant family)
    ("fun-control", 1, "WanTransformer3DModel", "fun-control"),
    ("fun-control-ref", 1, "WanFunTransformer3DModel", "fun-control-ref"),
    ("fun-control-ref", 2, "WanFunTransformer3DModel", "fun-control-ref"),
    ("fun-camera", 1, "WanFunTransformer3DModel", "fun-camera"),
    ("fun-camera", 2, "WanFunTransformer3DModel", "fun-camera"),
    ("vace", 1, "WanVACETransformer3DModel", "vace"),
    ("vace", 2, "WanVACETransformer3DModel", "vace"),
]


def _dit_files(release, experts):
    return [release] if experts == 1 else [release / "high_noise_model", release / "low_noise_model"]


@pytest.mark.parametrize("arch,experts,cls,family", CASES, ids=[f"{a}-{e}" for a, e, _, _ in CASES])
def test_variant_converts_to_the_right_class_and_round_trips(tiny_release, tmp_path, arch, experts, cls, family):
    release = tiny_release(arch, experts)
    out = convert_release(release, tmp_path / "out", dtype="fp32", transformer_only=True, progress=False)
    assert json.loads((out / "config.json").read_text())["_class_name"] == cls
    for folder in _dit_files(release, experts):
        sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        info = dit_config_from_state_dict(sd, json.loads((folder / "config.json").read_text()))
        assert info.arch == family and info.model_class == cls
        back = export_dit_state_dict(convert_dit_state_dict(sd))
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def _release_state_dict(cls_name: str, **config):
    """Original-layout keys and shapes of a release-size DiT, on the meta device (no memory)."""
    import diffusers
    from accelerate import init_empty_weights

    import diffusers_wan_ext

    cls = getattr(diffusers_wan_ext, cls_name, None) or getattr(diffusers, cls_name)
    with init_empty_weights():
        model = cls(**config)
    return export_dit_state_dict(model.state_dict())


W13 = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
W14 = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
CLIP = dict(image_dim=1280, added_kv_proj_dim=None)
RELEASES = [  # (variant, experts, class, config, release config.json, folder-name hint)
    ("wan2.1-fun-1.3b-inp", 1, "WanTransformer3DModel", dict(W13, in_channels=36, image_dim=1280, added_kv_proj_dim=1536), {}, None),
    ("wan2.1-fun-14b-inp", 1, "WanTransformer3DModel", dict(W14, in_channels=36, image_dim=1280, added_kv_proj_dim=5120), {}, "wan2.1-fun-14b-inp"),
    ("wan2.1-fun-1.3b-control", 1, "WanTransformer3DModel", dict(W13, in_channels=48, image_dim=1280, added_kv_proj_dim=1536), {}, None),
    ("wan2.1-fun-14b-control", 1, "WanTransformer3DModel", dict(W14, in_channels=48, image_dim=1280, added_kv_proj_dim=5120), {}, None),
    ("wan2.1-fun-v1.1-1.3b-control", 1, "WanFunTransformer3DModel",
     dict(W13, in_channels=48, image_dim=1280, added_kv_proj_dim=1536, ref_conv_in_channels=16), {}, None),
    ("wan2.1-fun-v1.1-14b-control-camera", 1, "WanFunTransformer3DModel",
     dict(W14, in_channels=32, image_dim=1280, added_kv_proj_dim=5120, control_adapter_in_channels=24), {}, None),
    ("wan2.2-fun-a14b-inp", 2, "WanTransformer3DModel", dict(W14, in_channels=36), {}, "wan2.2-fun-a14b-inp"),
    ("wan2.2-fun-a14b-control", 2, "WanFunTransformer3DModel", dict(W14, in_channels=52, ref_conv_in_channels=16), {}, None),
    ("wan2.2-fun-a14b-control-camera", 2, "WanFunTransformer3DModel",
     dict(W14, in_channels=36, control_adapter_in_channels=24), {}, None),
    ("wan2.1-vace-1.3b", 1, "WanVACETransformer3DModel", dict(W13, vace_layers=list(range(0, 30, 2))), {}, None),
    ("wan2.1-vace-14b", 1, "WanVACETransformer3DModel", dict(W14, vace_layers=list(range(0, 40, 5))), {}, None),
    ("wan2.2-vace-fun-a14b", 2, "WanVACETransformer3DModel", dict(W14, vace_layers=list(range(0, 40, 5))), {}, None),
]


@pytest.mark.parametrize("variant,experts,cls,config,release_cfg,hint", RELEASES, ids=[r[0] for r in RELEASES])
def test_release_layouts_are_detected(variant, experts, cls, config, release_cfg, hint):
    sd = _release_state_dict(cls, **config)
    info = dit_config_from_state_dict(sd, release_cfg)
    assert info.model_class == cls
    for key in ("vace_layers", "ref_conv_in_channels", "control_adapter_in_channels", "in_channels"):
        if key in config:
            assert info.config[key] == config[key]
    assert choose_variant(info, experts, None, hint).name == variant
    assert choose_variant(info, experts, variant, None).name == variant  # --variant accepted


def test_wrong_variant_flag_names_the_layout():
    sd = _release_state_dict("WanFunTransformer3DModel", **W13, in_channels=48, image_dim=1280,
                             added_kv_proj_dim=1536, ref_conv_in_channels=16)
    info = dit_config_from_state_dict(sd)
    with pytest.raises(ConversionError, match="fun-control-ref"):
        choose_variant(info, 1, "wan2.1-fun-1.3b-control", None)


def _tiny_sd(tiny_release, arch, experts=1):
    folder = _dit_files(tiny_release(arch, experts), experts)[0]
    return load_file(str(folder / "diffusion_pytorch_model.safetensors")), json.loads((folder / "config.json").read_text())


def test_bad_ref_conv_shape_is_named(tiny_release):
    sd, cfg = _tiny_sd(tiny_release, "fun-control-ref")
    sd["ref_conv.weight"] = torch.zeros(48, 16, 3, 3)
    with pytest.raises(ConversionError, match=r"ref_conv\.weight \(48, 16, 3, 3\)"):
        dit_config_from_state_dict(sd, cfg)


def test_camera_adapter_with_extra_residual_block_is_refused(tiny_release):
    sd, cfg = _tiny_sd(tiny_release, "fun-camera")
    for p in ("conv1", "conv2"):
        for s in ("weight", "bias"):
            sd[f"control_adapter.residual_blocks.1.{p}.{s}"] = sd[f"control_adapter.residual_blocks.0.{p}.{s}"]
    with pytest.raises(ConversionError, match="residual blocks"):
        dit_config_from_state_dict(sd, cfg)


def test_vace_layers_that_do_not_fit_are_refused(tiny_release):
    sd, cfg = _tiny_sd(tiny_release, "vace")
    cfg["vace_layers"] = [0, 5]
    with pytest.raises(ConversionError, match="vace_layers"):
        dit_config_from_state_dict(sd, cfg)
    cfg.pop("vace_layers")
    del sd["vace_blocks.1.after_proj.weight"], sd["vace_blocks.1.after_proj.bias"]
    with pytest.raises(ConversionError, match=r"vace_blocks\.1\.after_proj\.weight"):
        dit_config_from_state_dict(sd, cfg)


def test_unknown_channel_layout_is_explained(tiny_release):
    sd, cfg = _tiny_sd(tiny_release, "t2v")
    sd["patch_embedding.weight"] = torch.zeros(48, 40, 1, 2, 2)
    cfg.pop("in_dim")
    with pytest.raises(ConversionError, match="in_dim 40"):
        dit_config_from_state_dict(sd, cfg)


def test_converted_fun_transformer_matches_the_release_weights(tiny_release):
    sd, cfg = _tiny_sd(tiny_release, "fun-camera")
    model = load_dit_from_original(dict(sd), cfg)
    assert type(model).__name__ == "WanFunTransformer3DModel"
    assert torch.equal(model.control_adapter.conv.weight, sd["control_adapter.conv.weight"])
    assert model.config.control_adapter_downscale_factor == 8


def test_motion_controller_errors(tiny_release, tmp_path):
    from diffusers_wan_ext.demo import make_tiny_motion_controller

    mc = make_tiny_motion_controller(tmp_path / "model.safetensors")
    with pytest.raises(ConversionError, match="text-to-video"):
        convert_release(tiny_release("fun-control"), tmp_path / "x", dtype="fp32", motion_controller=mc,
                        progress=False, image_encoder_heads=2)
    sd = load_file(str(mc))
    sd["linear.4.weight"] = sd["linear.4.weight"][:10]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError, match=r"linear\.4\.weight"):
        convert_release(tiny_release("t2v"), tmp_path / "y", dtype="fp32", motion_controller=tmp_path / "bad.safetensors",
                        progress=False)
    sd = load_file(str(mc))
    sd["linear.6.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ConversionError, match=r"unexpected keys.*linear\.6\.weight"):
        convert_release(tiny_release("t2v"), tmp_path / "z", dtype="fp32", motion_controller=tmp_path / "extra.safetensors",
                        progress=False)
    assert not any(p.name in ("x", "y", "z") for p in tmp_path.iterdir())  # nothing half-written


VACE_FRESH = r"""
import json, sys
import numpy as np, torch
from PIL import Image
from diffusers import DiffusionPipeline
assert "diffusers_wan_ext" not in sys.modules
pipe = DiffusionPipeline.from_pretrained(FOLDER, dtype=torch.float32)
assert type(pipe).__name__ == "WanVACEPipeline", type(pipe)
rng = np.random.default_rng(0)
video = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
mask = [Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)) for _ in range(5)]
out = pipe(prompt="a fox", video=video, mask=mask, reference_images=[video[0]], height=32, width=32, num_frames=5,
           num_inference_steps=2, output_type="np", max_sequence_length=16,
           generator=torch.Generator().manual_seed(0)).frames
assert out.shape == (1, 5, 32, 32, 3) and np.isfinite(out).all()
print(json.dumps({"boundary_ratio": pipe.config.boundary_ratio, "two": pipe.transformer_2 is not None}))
assert "diffusers_wan_ext" not in sys.modules
"""


@pytest.mark.parametrize("experts", [1, 2])
def test_vace_folders_run_in_stock_diffusers(converted, experts):
    folder = converted("vace", experts)
    proc = run_python(f"FOLDER = {str(folder)!r}\n" + VACE_FRESH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec == {"boundary_ratio": 0.875 if experts == 2 else None, "two": experts == 2}


def test_add_motion_controller_cli_turns_a_t2v_folder_into_speed_control(converted, tmp_path):
    import shutil

    from diffusers_wan_ext_cli import main
    from diffusers_wan_ext.demo import make_tiny_motion_controller

    folder = tmp_path / "t2v"
    shutil.copytree(converted("t2v"), folder)
    mc = make_tiny_motion_controller(tmp_path / "model.safetensors")
    assert main(["add-motion-controller", str(folder), str(mc)]) == 0
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_wan_ext", "WanSpeedControlPipeline"]
    assert index["motion_controller"] == ["diffusers_wan_ext", "WanMotionControllerModel"]
    assert (folder / "motion_controller" / "diffusers_wan_ext.py").is_file()
    import diffusers_wan_ext  # noqa: F401
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    assert type(pipe).__name__ == "WanSpeedControlPipeline" and pipe.motion_controller is not None
    # a folder that is not text-to-video is refused, untouched
    other = converted("fun-control")
    before = (other / "model_index.json").read_text()
    assert main(["add-motion-controller", str(other), str(mc)]) == 2
    assert (other / "model_index.json").read_text() == before and not (other / "motion_controller").exists()
