"""Wan VAE converter: original <-> Diffusers round trips, config inference, and readable errors (fast, CPU)."""

from __future__ import annotations


import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file

from diffusers_wan_ext.conversion.vae import (
    LATENTS_MEAN_STD,
    convert_vae_state_dict,
    detect_vae_version,
    export_vae_state_dict,
    load_vae_from_original,
    vae_config_from_state_dict,
)
from diffusers_wan_ext.vae import (
    decode_unclamped,
    encode_mean,
    normalize_latents,
    tile_layout,
    tiled_decode,
    tiled_encode,
)
from diffusers_wan_ext.utils import ConversionError
from golden_runners.core import GOLDENS_DIR

GOLDENS = GOLDENS_DIR
VERSION_OF_CASE = {"vae21": "wan2.1", "vae22": "wan2.2"}

# Tiny Diffusers VAEs of both kinds, including a non-release structure (3 stages, 1 res block, other time flags).
TINY_CONFIGS = {
    "wan2.1": dict(base_dim=4, z_dim=16),
    "wan2.1-odd": dict(base_dim=3, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, False],
                       scale_factor_temporal=2, scale_factor_spatial=4),
    "wan2.2": dict(base_dim=4, decoder_base_dim=6, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16, latents_mean=list(LATENTS_MEAN_STD["wan2.2"][0]),
                   latents_std=list(LATENTS_MEAN_STD["wan2.2"][1])),
}


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b), f"key sets differ: only left {sorted(set(a) - set(b))[:5]}, only right {sorted(set(b) - set(a))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _golden_weights(case: str) -> dict:
    path = GOLDENS / case / "weights.safetensors"
    if not path.is_file():
        pytest.skip(f"golden fixture {path} not found (set WAN_GOLDENS_DIR)")
    return load_file(str(path))


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request):
    torch.manual_seed(0)
    model = AutoencoderKLWan(**TINY_CONFIGS[request.param]).eval()
    with torch.no_grad():  # RMS-norm gammas are ones at init: make every tensor distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return request.param, model


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("case", sorted(VERSION_OF_CASE))
def test_golden_round_trip_is_identity(case):
    sd = _golden_weights(case)
    assert detect_vae_version(sd) == VERSION_OF_CASE[case]
    converted = convert_vae_state_dict(sd)
    _assert_same(export_vae_state_dict(converted), sd)
    # and the converted dict loads strictly into the stock model of the inferred config
    AutoencoderKLWan(**vae_config_from_state_dict(sd)).load_state_dict(converted, strict=True)


def test_tiny_round_trip_is_identity(tiny):
    name, model = tiny
    dsd = model.state_dict()
    original = export_vae_state_dict(dsd)
    assert detect_vae_version(original) == name.split("-")[0]
    _assert_same(convert_vae_state_dict(original), dsd)
    _assert_same(export_vae_state_dict(model), original)  # model object accepted too
    cfg = vae_config_from_state_dict(original)
    for k, v in TINY_CONFIGS[name].items():
        assert cfg[k] == v, (k, cfg[k], v)


def test_tiny_loaded_model_matches(tiny, tmp_path):
    name, model = tiny
    original = export_vae_state_dict(model)
    torch.save(original, tmp_path / "vae.pth")
    torch.save({"model_state": original}, tmp_path / "wrapped.pth")
    f = model.config.scale_factor_spatial
    video = torch.rand(1, 3, 5, f, 2 * f) * 2 - 1
    for src in (str(tmp_path / "wrapped.pth"), {"model." + k: v for k, v in original.items()}):
        _assert_same(load_vae_from_original(src).state_dict(), model.state_dict())
    ours = load_vae_from_original(tmp_path / "vae.pth")
    assert {k: v for k, v in ours.config.items() if k in TINY_CONFIGS[name]} == TINY_CONFIGS[name]
    with torch.no_grad():
        want = model.encode(video).latent_dist.mode()
        assert torch.equal(ours.encode(video).latent_dist.mode(), want)
        assert torch.equal(ours.decode(want).sample, model.decode(want).sample)
    half = load_vae_from_original(tmp_path / "vae.pth", torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_wan21_matches_stock_single_file_converter():
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = _golden_weights("vae21")
    _assert_same(convert_vae_state_dict(sd), convert_wan_vae_to_diffusers(dict(sd)))


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("case", sorted(VERSION_OF_CASE))
def test_config_matches_manifest(case):
    import json

    sd = _golden_weights(case)
    m = json.loads((GOLDENS / case / "manifest.json").read_text())
    oc, cfg = m.get("original_config", {}), vae_config_from_state_dict(sd)
    # every field the manifest states must match the config inferred from the weights (a set may omit some)
    stated = {"dim": "base_dim", "z_dim": "z_dim", "dim_mult": "dim_mult", "num_res_blocks": "num_res_blocks",
              "attn_scales": "attn_scales", "temperal_downsample": "temperal_downsample",
              "spatial_factor": "scale_factor_spatial", "temporal_factor": "scale_factor_temporal"}
    checked = [k for k in stated if k in oc]
    for k in checked:
        assert cfg[stated[k]] == oc[k], k
    if "dim" in oc or "dec_dim" in oc:
        assert (cfg["decoder_base_dim"] or cfg["base_dim"]) == oc.get("dec_dim", oc.get("dim"))
    assert cfg["is_residual"] == (VERSION_OF_CASE[case] == "wan2.2")
    norm = m.get("latent_normalization", {})
    if "mean" in norm:
        torch.testing.assert_close(torch.tensor(cfg["latents_mean"]), torch.tensor(norm["mean"]), rtol=0, atol=1e-6)
    if "std" in norm:
        torch.testing.assert_close(torch.tensor(cfg["latents_std"]), torch.tensor(norm["std"]), rtol=0, atol=1e-6)
    if not checked and not norm:
        pytest.skip(f"{case}: the manifest states no VAE config or latent normalisation to check")


def test_wan21_constants_are_stock_defaults():
    import inspect

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    mean, std = LATENTS_MEAN_STD["wan2.1"]
    assert list(mean) == params["latents_mean"].default and list(std) == params["latents_std"].default


# ------------------------------------------------------------------------------------------------ errors


def _tiny_original(version="wan2.1"):
    torch.manual_seed(0)
    return export_vae_state_dict(AutoencoderKLWan(**TINY_CONFIGS[version]))


@pytest.mark.parametrize("version", ["wan2.1", "wan2.2"])
def test_unknown_key_is_named(version):
    sd = _tiny_original(version)
    sd["encoder.downsamples.bogus_layer.weight"] = torch.zeros(1)
    for fn in (detect_vae_version, convert_vae_state_dict, load_vae_from_original):
        with pytest.raises(ConversionError, match="encoder.downsamples.bogus_layer.weight"):
            fn(sd)


def test_extra_structural_key_is_named():
    sd = _tiny_original()
    # a shortcut on a block that has none: a known key family, but not a parameter of this model
    sd["encoder.downsamples.0.shortcut.weight"] = torch.zeros(4, 4, 1, 1, 1)
    with pytest.raises(ConversionError, match=r"unexpected keys.*encoder\.downsamples\.0\.shortcut\.weight"):
        convert_vae_state_dict(sd)


def test_missing_key_is_named():
    sd = _tiny_original("wan2.2")
    del sd["decoder.upsamples.1.upsamples.2.residual.6.bias"]
    with pytest.raises(ConversionError, match=r"missing keys.*decoder\.upsamples\.1\.upsamples\.2\.residual\.6\.bias"):
        convert_vae_state_dict(sd)
    del sd["conv2.weight"]
    with pytest.raises(ConversionError, match=r"missing keys.*conv2\.weight"):
        detect_vae_version(sd)


@pytest.mark.parametrize("version", ["wan2.1", "wan2.2"])
def test_wrong_shape_is_named(version):
    sd = _tiny_original(version)
    key = "decoder.middle.1.to_qkv.weight"
    sd[key] = torch.zeros(sd[key].shape[0] + 3, *sd[key].shape[1:])
    with pytest.raises(ConversionError, match=r"shape mismatch.*decoder\.middle\.1\.to_qkv\.weight"):
        convert_vae_state_dict(sd)
    dsd = convert_vae_state_dict(_tiny_original(version))
    dsd["encoder.conv_out.bias"] = torch.zeros(7)
    with pytest.raises(ConversionError, match=r"encoder\.conv_out\.bias"):
        export_vae_state_dict(dsd)


def test_diffusers_layout_and_mixed_layouts_are_rejected():
    dsd = convert_vae_state_dict(_tiny_original())
    with pytest.raises(ConversionError, match="Diffusers AutoencoderKLWan layout"):
        convert_vae_state_dict(dsd)
    mixed = _tiny_original("wan2.2")
    mixed["encoder.downsamples.3.residual.0.gamma"] = torch.ones(4, 1, 1, 1)
    with pytest.raises(ConversionError, match=r"encoder\.downsamples\.3\.residual\.0\.gamma"):
        detect_vae_version(mixed)
    with pytest.raises(ConversionError, match="unexpected keys.*decoder.upsamples.bogus"):
        export_vae_state_dict({**dsd, "decoder.upsamples.bogus": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------ tiling helpers


def test_tile_layout_rule():
    # starts every stride; a start is skipped once the previous tile reaches the end; tiles may pass the edge
    assert tile_layout(4, 5, (3, 3), (1, 2)) == [(0, 3, 0, 3), (0, 3, 2, 5), (1, 4, 0, 3), (1, 4, 2, 5)]
    assert tile_layout(10, 4, (4, 8), (3, 8)) == [(0, 4, 0, 8), (3, 7, 0, 8), (6, 10, 0, 8)]


def test_single_tile_equals_untiled(tiny):
    _, model = tiny
    f = model.config.scale_factor_spatial
    torch.manual_seed(1)
    video = torch.rand(1, 3, 5, 2 * f, 3 * f) * 2 - 1
    with torch.no_grad():
        mu = encode_mean(model, video)
        assert torch.equal(mu, model.encode(video).latent_dist.mode())
        whole = (video.shape[-2] // f, video.shape[-1] // f)
        assert torch.equal(tiled_encode(model, video, whole, whole), normalize_latents(model, mu))
        raw = decode_unclamped(model, mu)
        assert torch.equal(raw.clamp(-1, 1), model.decode(mu).sample)
        assert torch.equal(tiled_decode(model, mu, whole, whole, normalized=False, clamp=False), raw)
