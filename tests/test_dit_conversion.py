"""DiT converter: exact round trips, detection, and errors that name the offending keys."""

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
from diffusers_wan_ext.utils import ConversionError, load_state_dict


@pytest.mark.parametrize("arch", ["t2v", "i2v", "flf2v", "ti2v"])
def test_round_trip_original_diffusers_original(tiny_release, arch):
    sd = load_file(str(tiny_release(arch) / "diffusion_pytorch_model.safetensors"))
    back = export_dit_state_dict(convert_dit_state_dict(sd))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_round_trip_through_saved_model(tiny_release, tmp_path):
    """original file -> our converter -> save_pretrained -> export-dit -> same tensors as the original file."""
    from diffusers_wan_ext_cli import main

    rel = tiny_release("i2v")
    model = load_dit_from_original(rel)
    model.save_pretrained(tmp_path / "transformer")
    assert main(["export-dit", str(tmp_path / "transformer"), str(tmp_path / "back.safetensors")]) == 0
    a, b = load_file(str(rel / "diffusion_pytorch_model.safetensors")), load_file(str(tmp_path / "back.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_detection(tiny_release):
    for arch, want in [("t2v", "t2v"), ("i2v", "i2v"), ("flf2v", "flf2v"), ("ti2v", "ti2v"), ("i2v-noclip", "i2v-noclip")]:
        rel = tiny_release(arch)
        sd = load_file(str(rel / "diffusion_pytorch_model.safetensors"))
        info = dit_config_from_state_dict(sd, json.loads((rel / "config.json").read_text()))
        assert info.arch == want


def test_krea_style_prefix_is_stripped(tiny_release):
    sd = load_file(str(tiny_release("t2v") / "diffusion_pytorch_model.safetensors"))
    prefixed = {f"model.{k}": v for k, v in sd.items()}
    assert convert_dit_state_dict(prefixed).keys() == convert_dit_state_dict(sd).keys()


def test_unknown_key_is_named(tiny_release):
    sd = load_file(str(tiny_release("t2v") / "diffusion_pytorch_model.safetensors"))
    sd["blocks.0.mystery.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError, match=r"blocks\.0\.mystery\.weight"):
        convert_dit_state_dict(sd)


def test_extension_keys_are_recognised(tiny_release):
    from diffusers_wan_ext.conversion.dit import dit_config_from_state_dict

    sd = load_file(str(tiny_release("t2v") / "diffusion_pytorch_model.safetensors"))
    sd["face_adapter.fuser_blocks.0.linear1_kv.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError, match=r"incomplete Wan2\.2-Animate adapter: missing key\(s\) .*pose_patch_embedding"):
        dit_config_from_state_dict(sd)


def test_partial_vace_weights_are_named(tiny_release):
    from diffusers_wan_ext.conversion.dit import load_dit_from_original

    sd = load_file(str(tiny_release("t2v") / "diffusion_pytorch_model.safetensors"))
    sd["vace_blocks.0.before_proj.weight"] = torch.zeros(48, 48)  # VACE block without vace_patch_embedding
    with pytest.raises(ConversionError, match=r"vace_blocks\.0\.proj_in\.weight"):
        load_dit_from_original(sd)


def test_inconsistent_blocks_are_named(tiny_release):
    sd = load_file(str(tiny_release("t2v") / "diffusion_pytorch_model.safetensors"))
    del sd["blocks.1.ffn.2.bias"]
    with pytest.raises(ConversionError, match=r"blocks\.1\.ffn\.2\.bias"):
        dit_config_from_state_dict(sd)


def test_wrong_shape_is_named(tiny_release):
    sd = load_file(str(tiny_release("t2v") / "diffusion_pytorch_model.safetensors"))
    sd["blocks.1.self_attn.q.weight"] = torch.zeros(48, 47)
    with pytest.raises(ConversionError, match=r"blocks\.1\.attn1\.to_q\.weight"):
        load_dit_from_original(sd, {"num_heads": 2})


def test_config_disagreeing_with_weights(tiny_release):
    sd = load_file(str(tiny_release("t2v") / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError, match="num_layers"):
        dit_config_from_state_dict(sd, {"num_layers": 30, "num_heads": 2})


def test_truncated_safetensors(tiny_release, tmp_path):
    data = (tiny_release("t2v") / "diffusion_pytorch_model.safetensors").read_bytes()
    bad = tmp_path / "diffusion_pytorch_model.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        load_state_dict(bad)


def test_not_a_dit(tmp_path):
    save_file({"encoder.conv1.weight": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ConversionError, match="patch_embedding.weight"):
        dit_config_from_state_dict(load_state_dict(tmp_path / "x.safetensors"))


def test_text_len_other_than_512_uses_ext_class(tiny_release):
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext import WanExtTransformer3DModel

    assert type(load_dit_from_original(tiny_release("i2v", text_len=512))) is WanTransformer3DModel
    m = load_dit_from_original(tiny_release("i2v", text_len=16))
    assert type(m) is WanExtTransformer3DModel and m.config.text_len == 16
    assert type(load_dit_from_original(tiny_release("t2v"))) is WanTransformer3DModel
