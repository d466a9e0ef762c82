"""DiffSynth-Studio's MOVA training spellings: ``--lora_base_model`` / ``--trainable_models`` ``video_dit`` and
``video_dit2`` (its pipeline's high- and low-noise video experts) are our ``transformer`` / ``transformer_2``, and
``--frame_rate`` overrides the 24 fps MOVA declares: the clips are resampled to it and the audio column is cut to
``num_frames / frame_rate`` seconds, as DiffSynth-Studio's audio loader does; a model whose family reads clips as
they are refuses it in one line before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusers_wan_ext.families.mova import MOVA_TRAINING_FRAME_RATE, convert_mova_release, make_tiny_mova_release
from diffusers_wan_ext.pipelines.pipeline_mova import mova_audio_length
from diffusers_wan_ext.training import main, parse_args, run_training
from diffusers_wan_ext.training.trainer import CachedDataset
from test_training_mova import COMMON, make_mova_dataset


def _folder(path: Path, pipeline: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "transformer": ["x", "y"]}))
    (path / "metadata.csv").write_text("video,prompt\n")
    return path


def _args(folder: Path, *extra: str):
    return parse_args(["--dataset_base_path", str(folder), "--dataset_metadata_path", str(folder / "metadata.csv"),
                       "--model_path", str(folder), "--output_path", str(folder / "out"), *extra])


def test_diffsynth_video_dit_names(tmp_path):
    folder = _folder(tmp_path / "mova", "MovaPipeline")
    assert _args(folder, "--lora_base_model", "video_dit").lora_base_model == "transformer"
    high = _args(folder, "--lora_base_model", "video_dit", "--remove_prefix_in_ckpt", "pipe.video_dit.")
    assert (high.expert, high.remove_prefix_in_ckpt) == ("transformer", "transformer.")
    low = _args(folder, "--lora_base_model", "video_dit2")
    assert (low.lora_base_model, low.expert) == ("transformer_2", "transformer_2")
    assert _args(folder, "--trainable_models", "video_dit2").trainable_models == ["transformer_2"]


MOVA_ONLY = {"audio_dit": "audio_transformer", "audio_transformer": "audio_transformer", "bridge": "bridge",
             "dual_tower_bridge": "bridge"}


def test_mova_components_are_mova_names_only(tmp_path, capsys):
    """MOVA's own components (``family_only``) resolve for a MOVA folder; any other model refuses them in one line
    naming MOVA and listing only its own components, before anything is written."""
    mova = _folder(tmp_path / "mova", "MovaPipeline")
    for name, ours in MOVA_ONLY.items():
        assert _args(mova, "--lora_base_model", name).lora_base_model == ours
        assert _args(mova, "--trainable_models", name).trainable_models == [ours]
    assert _args(mova, "--trainable_models", "audio_vae").trainable_models == ["audio_vae"]
    mova_names = {*MOVA_ONLY, "audio_vae", "video_dit", "video_dit2"}
    for pipeline in ("WanPipeline", "WanSpeedControlPipeline"):
        folder = _folder(tmp_path / pipeline, pipeline)
        for option in ("--lora_base_model", "--trainable_models"):
            for name, ours in (*MOVA_ONLY.items(), ("audio_vae", "audio_vae")):
                with pytest.raises(SystemExit) as e:
                    main(["--dataset_base_path", str(folder), "--dataset_metadata_path", str(folder / "metadata.csv"),
                          "--model_path", str(folder), option, name, "--output_path", str(folder / "out")])
                err = capsys.readouterr().err
                assert e.value.code == 2 and err.count("\n") == 1, err
                hint = (f"'{name}' is MOVA's name of {ours}" if name != ours else
                        f"'{name}' is a component of MOVA models only")
                assert f"{option}: unknown or unsupported component '{name}' ({hint}); accepted: " in err, err
                accepted = set(err.split("accepted: ")[1].split(" (see")[0].strip().split(", "))
                assert {"dit", "transformer"} <= accepted and not accepted & mova_names, err
                assert not (folder / "out").exists()


def test_frame_rate_overrides_the_declaration_only_where_there_is_one(tmp_path, capsys):
    mova = _folder(tmp_path / "mova", "MovaPipeline")
    assert _args(mova, "--lora_base_model", "dit").frame_rate is None  # the family's 24 fps
    assert _args(mova, "--lora_base_model", "dit", "--frame_rate", "30").frame_rate == 30.0
    wan = _folder(tmp_path / "wan", "WanPipeline")
    for folder, value, message in [(wan, "16", "--frame_rate 16: this model's clips are read at their own frame rate"),
                                   (mova, "0", "--frame_rate must be a finite number > 0"),
                                   (mova, "nan", "--frame_rate must be a finite number > 0")]:
        with pytest.raises(SystemExit) as e:
            main(["--dataset_base_path", str(folder), "--dataset_metadata_path", str(folder / "metadata.csv"),
                  "--model_path", str(folder), "--lora_base_model", "dit", "--frame_rate", value,
                  "--output_path", str(folder / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
        assert not (folder / "out").exists()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One mp4 clip (9 frames, 32x32) with a 1 s wav in ``input_audio``."""
    return make_mova_dataset(tmp_path_factory.mktemp("mova-fps-data"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mova-fps")
    return convert_mova_release(make_tiny_mova_release(root / "MOVA-360p"), root / "converted", dtype="fp32",
                                progress=False)


def test_frame_rate_sets_the_audio_span_of_the_cached_clip(model, data, tmp_path):
    """The cache of a 9-frame clip holds the DAC latents of 9 / frame_rate seconds of audio (the tiny DAC: 8 kHz,
    hop 160): 19 at the declared 24 fps, 10 with --frame_rate 48; a training step runs on the latter."""
    def cache(out: Path, *extra: str) -> Path:
        return run_training(parse_args([str(a) for a in (
            "--task", "sft:data_process", "--dataset_base_path", data, "--dataset_metadata_path",
            data / "metadata.csv", "--model_path", model, *COMMON, "--extra_inputs", "input_image,input_audio",
            "--lora_base_model", "video_dit", "--output_path", out, *extra)]))

    declared = CachedDataset(cache(tmp_path / "c24"))[0]["cached"]["joint.audio"].shape[-1]
    assert declared == mova_audio_length(9, MOVA_TRAINING_FRAME_RATE, 8000, 160) == 19
    fast = cache(tmp_path / "c48", "--frame_rate", "48")
    assert CachedDataset(fast)[0]["cached"]["joint.audio"].shape[-1] == mova_audio_length(9, 48.0, 8000, 160) == 10
    out = run_training(parse_args([str(a) for a in (
        "--task", "sft:train", "--dataset_base_path", fast, "--model_path", model, *COMMON, "--extra_inputs",
        "input_image,input_audio", "--lora_base_model", "video_dit", "--max_train_steps", "1",
        "--output_path", tmp_path / "lora")]))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
