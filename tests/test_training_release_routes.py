"""``--model_path`` is routed from the family declarations, not from the mere presence of ``model_index.json``: a
MOVA release (whose own ``model_index.json`` names OpenMOSS's ``MOVA`` class) trains from the release files, a converted
folder of each family keeps the converted route, a release each family's detector claims takes that family's route,
and a folder with an index of an unknown class and no release layout is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_wan_ext.demo import make_tiny_dataset, make_tiny_release
from diffusers_wan_ext.families.longcat import make_tiny_longcat_release
from diffusers_wan_ext.families.mova import convert_mova_release, make_tiny_mova_release
from diffusers_wan_ext.pipelines import MovaPipeline
from diffusers_wan_ext.release_converter import convert_release
from diffusers_wan_ext.training import main, parse_args, run_training
from diffusers_wan_ext.training.components import load_training_components, model_family, model_folder

from helpers import edit_metadata_rows, write_pcm16_wav

COMMON = ["--height", "32", "--width", "32", "--num_frames", "9", "--max_sequence_length", "16", "--dtype", "fp32",
          "--report_to", "none", "--lora_rank", "4", "--lora_target_modules", "q,k,v,o,ffn.0,ffn.2",
          "--extra_inputs", "input_image,input_audio", "--lora_base_model", "dit", "--learning_rate", "1e-2",
          "--max_train_steps", "2", "--dataset_repeat", "2"]


@pytest.fixture(scope="module")
def mova(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny MOVA release (OpenMOSS layout, its own ``model_index.json``) and its converted folder."""
    root = tmp_path_factory.mktemp("mova-routes")
    release = make_tiny_mova_release(root / "MOVA-360p")
    assert json.loads((release / "model_index.json").read_text())["_class_name"] == "MOVA"
    return release, convert_mova_release(release, root / "MOVA-360p-diffusers", dtype="fp32", progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One 9-frame clip with a wav in ``input_audio``."""
    folder = tmp_path_factory.mktemp("mova-routes-data")
    meta = make_tiny_dataset(folder, num_videos=1, num_images=0)
    t = np.arange(16000) / 16000
    write_pcm16_wav(folder / "audio.wav", np.round(0.4 * np.sin(2 * np.pi * 330 * t) * 32767).astype("<i2"), 16000)
    edit_metadata_rows(meta, lambda i, row: row.update(input_audio="audio.wav"))
    return folder


def train(model: Path, data: Path, out: Path) -> Path:
    return run_training(parse_args([str(a) for a in ["--dataset_base_path", data, "--dataset_metadata_path",
                                                     data / "metadata.csv", "--model_path", model, *COMMON,
                                                     "--output_path", out]]))


def test_mova_release_trains_as_its_converted_folder(mova, data, tmp_path):
    """The raw release trains (converted in a temporary folder, removed after loading): the same losses and LoRA as
    training from the converted folder, and the LoRA loads into the converted pipeline and changes its output."""
    release, converted = mova
    assert model_folder(release).kind == "family_release" and model_family(release).name == "mova"
    assert model_folder(converted).kind == "converted" and model_family(converted).name == "mova"
    outs = {name: train(model, data, tmp_path / name) for name, model in (("release", release),
                                                                          ("converted", converted))}
    losses = {name: [json.loads(line)["loss"] for line in (out / "logs" / "losses.jsonl").read_text().splitlines()]
              for name, out in outs.items()}
    assert len(losses["release"]) == 2 and losses["release"] == losses["converted"], losses
    loras = {name: load_file(str(out / "pytorch_lora_weights.safetensors")) for name, out in outs.items()}
    assert loras["release"] and all(k.startswith("transformer.") for k in loras["release"])
    assert loras["release"].keys() == loras["converted"].keys()
    assert all(torch.equal(v, loras["converted"][k]) for k, v in loras["release"].items())

    pipe = MovaPipeline.from_pretrained(converted, torch_dtype=torch.float32)
    kw = dict(image=np.full((32, 32, 3), 128, np.uint8), prompt="a tone", height=32, width=32, num_frames=9,
              num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    pipe.load_lora_weights(str(outs["release"] / "pytorch_lora_weights.safetensors"))
    tuned = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    assert float((tuned - plain).abs().max()) > 1e-6


def test_index_of_an_unknown_class_is_one_error_line(data, tmp_path, capsys):
    """Neither a Diffusers pipeline class nor a release layout: one line naming the folder and what was expected,
    exit status 2, before anything loads."""
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model_index.json").write_text(json.dumps({"_class_name": "SomeOtherPipeline", "unet": ["x", "y"]}))
    with pytest.raises(ValueError, match="SomeOtherPipeline"):
        model_folder(junk)
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in ["--dataset_base_path", data, "--dataset_metadata_path", data / "metadata.csv",
                               "--model_path", junk, *COMMON, "--output_path", tmp_path / "out"]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(junk) in err and "expected a converted Diffusers folder" in err, err
    assert "SomeOtherPipeline" in err and not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def _vap_like_release(folder: Path) -> Path:
    """The Video-As-Prompt release's top files (its own ``model_index.json`` and the MoT transformer config): only
    the routing is checked here (tests/test_video_as_prompt.py converts a full tiny release)."""
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DMOTModel"}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoMOTPipeline"}))
    return folder


#: release maker -> the family whose route it takes (``None``: the core Wan release loader)
RELEASES = {
    "wan-t2v": (lambda d: make_tiny_release(d / "Wan2.1-T2V-1.3B"), None),
    "animate2": (lambda d: make_tiny_release(d / "Wan2.2-Animate-2", arch="animate2"), "animate2"),
    "dancer": (lambda d: make_tiny_release(d / "Wan-Dancer-14B", arch="dancer"), "dancer"),
    "longcat": (lambda d: make_tiny_longcat_release(d / "LongCat-Video"), "longcat"),
    "longcat-wan": (lambda d: make_tiny_longcat_release(d / "LongCat-Video", layout="wan"), "longcat"),
    "video-as-prompt": (lambda d: _vap_like_release(d / "Video-As-Prompt"), "video-as-prompt"),
}


@pytest.mark.parametrize("name", RELEASES)
def test_each_family_release_takes_its_route(name, tmp_path):
    """Release layouts with a ``config.json`` (Wan-AI, Animate-2, Wan-Dancer: beside the DiT) or their own
    ``model_index.json`` (Video-As-Prompt, MOVA above) at the top take their family's route, the Wan-AI release the
    core loader's."""
    make, family = RELEASES[name]
    release = make(tmp_path)
    routed = model_folder(release)
    assert routed.kind == ("release" if family is None else "family_release"), routed
    assert (routed.family.name if routed.family else None) == family
    assert (model_family(release).name if model_family(release) else None) == family


@pytest.mark.parametrize("name", ["wan-t2v", "animate2", "dancer", "longcat"])
def test_converted_folder_of_each_family_takes_the_converted_route(name, tmp_path):
    """The converted folder is routed as converted, and the trainer loads the same pipeline and transformer from
    the release as from it."""
    make, family = RELEASES[name]
    release = make(tmp_path)
    converted = convert_release(release, tmp_path / "converted", dtype="fp32", image_encoder_heads=2, progress=False)
    routed = model_folder(converted)
    assert routed.kind == "converted" and routed.pipeline_class, routed
    assert (routed.family.name if routed.family else None) == family
    a, b = (load_training_components(m, dtype=torch.float32, load_encoders=False, image_encoder_heads=2)
            for m in (release, converted))
    assert a.pipeline_class == b.pipeline_class == routed.pipeline_class
    sd_a, sd_b = a.transformer.state_dict(), b.transformer.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
