"""Trainer arguments that depend on the model's family are checked before any model loads: ``--export_format``
with a family whose LoRAs the Wan layouts cannot hold (LongCat-Video), told from a converted folder, an original
release folder or a ``--transformer_path`` of its own layout, or a scoped LoRA whose blocks they cannot name
(``--lora_base_model vap`` / ``animate_adapter``); and ``--frame_rate`` is a run setting a resume compares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from safetensors.torch import load_file
from types import SimpleNamespace

from diffusers_wan_ext.demo import make_tiny_release
from diffusers_wan_ext.families import FAMILIES
from diffusers_wan_ext.families.longcat import make_tiny_longcat_release
from diffusers_wan_ext.lora import LORA_FORMATS, detect_lora_format, export_lora, map_lora_target_modules
from diffusers_wan_ext.lora.convert import peft_lora_state_dict
from diffusers_wan_ext.pipelines import WanAnimate2Pipeline
from diffusers_wan_ext.training import main, parse_args
from diffusers_wan_ext.training.args import DEFAULT_TARGETS
from diffusers_wan_ext.training.checkpoints import CHECKPOINT_FORMAT, STATE_FILE, check_checkpoint, run_fingerprint
from diffusers_wan_ext.training.components import family_of_pipeline, model_family
from diffusers_wan_ext.training.modules import add_lora
from diffusers_wan_ext.training.targets import lora_target_modules
from diffusers_wan_ext.utils.io import ConversionError
from model_cases import WAN_TINY, model_cases

from helpers import randomize_lora


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return make_tiny_longcat_release(tmp_path_factory.mktemp("longcat") / "release")


def _index(folder: Path, class_name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "transformer": ["x", "y"]}))
    return folder


def _run(capsys, model: list[str], tmp_path: Path, exports: str = "original") -> str:
    with pytest.raises(SystemExit) as e:
        main(["--dataset_base_path", str(tmp_path), "--dataset_metadata_path", str(tmp_path / "none.csv"), *model,
              "--lora_base_model", "dit", "--export_format", exports, "--output_path", str(tmp_path / "out")])
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("where", ["converted", "release", "transformer_path"])
def test_longcat_export_format_is_refused_at_start_up(where, release, tmp_path, capsys):
    """One line naming the flag, exit status 2, before the (absent) metadata file or any weights are read."""
    model = {"converted": ["--model_path", str(_index(tmp_path / "lc", "LongCatVideoPipeline"))],
             "release": ["--model_path", str(release)],
             "transformer_path": ["--model_path", str(_index(tmp_path / "wan", "WanPipeline")),
                                  "--transformer_path", str(release / "dit")]}[where]
    err = _run(capsys, model, tmp_path, "kohya,original")
    assert err.count("\n") == 1 and "--export_format kohya,original" in err and "LongCat-Video" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["converted", "release", "transformer_path"])
def test_longcat_own_export_format_passes_the_check(where, release, tmp_path, capsys):
    """``--export_format longcat`` (its own layout, ``lora_longcat.safetensors``) is LongCat-Video's: accepted."""
    model = {"converted": ["--model_path", str(_index(tmp_path / "lc", "LongCatVideoPipeline"))],
             "release": ["--model_path", str(release)],
             "transformer_path": ["--model_path", str(_index(tmp_path / "wan", "WanPipeline")),
                                  "--transformer_path", str(release / "dit")]}[where]
    err = _run(capsys, model, tmp_path, "longcat")
    assert "--export_format" not in err and "none.csv" in err, err


@pytest.mark.parametrize("pipeline_name", ["WanPipeline", "WanAnimate2Pipeline", "WanSpeechToVideoPipeline",
                                           "MovaPipeline"])
def test_longcat_export_format_is_refused_for_other_families(pipeline_name, tmp_path, capsys):
    """Another family's model (a Wan one included) refuses LongCat's layout in one line, before any weights load."""
    err = _run(capsys, ["--model_path", str(_index(tmp_path / "m", pipeline_name))], tmp_path, "kohya,longcat")
    assert err.count("\n") == 1 and "--export_format longcat" in err and "LongCat-Video" in err, err
    assert not (tmp_path / "out").exists()


def test_unknown_export_format_names_the_family_layouts(tmp_path, capsys):
    err = _run(capsys, ["--model_path", str(_index(tmp_path / "m", "WanPipeline"))], tmp_path, "comfy")
    assert err.count("\n") == 1 and "unknown ['comfy']" in err and "diffsynth, longcat" in err, err


def test_export_format_of_a_wan_folder_passes_the_check(tmp_path, capsys):
    """A Wan model keeps every layout: the run gets past the check (and stops at the missing metadata file)."""
    folder = _index(tmp_path / "wan", "WanPipeline")
    assert model_family(folder) is None or model_family(folder).lora_export_formats is None
    err = _run(capsys, ["--model_path", str(folder)], tmp_path)
    assert "--export_format" not in err and "none.csv" in err, err


# ------------------------------------------------------------------------------- the families' export declarations
# Each family's ``lora_export_formats`` is what the LoRA exporter can write for a LoRA the trainer puts on its
# transformer (default targets, main blocks): a declared layout round-trips through the pipeline's own loader (what
# ``diffusers-wan generate --lora`` reads) to the same tensors; an undeclared one is refused at start-up and the
# exporter indeed cannot write it.

#: family -> (its pipeline class, the tiny transformer of tests/model_cases.py; MOVA's video DiT is stock Wan's)
FAMILY_MODELS = {"animate": ("WanAnimateExtPipeline", "animate"), "animate2": ("WanAnimate2Pipeline", "animate2"),
                 "dancer": ("WanDancerPipeline", "dancer"), "s2v": ("WanSpeechToVideoPipeline", "s2v"),
                 "video-as-prompt": ("WanVideoAsPromptPipeline", "vap"), "mova": ("MovaPipeline", None)}


def _tiny_transformer(case_name: str | None) -> torch.nn.Module:
    if case_name is None:
        return WanTransformer3DModel(**WAN_TINY, num_layers=2)
    case = next(c for c in model_cases() if c.name == case_name)
    return case.model_class(**case.init_kwargs)


def _trained_lora(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA a ``--lora_base_model dit`` run with the default targets puts on ``transformer`` (random factors)."""
    args = SimpleNamespace(lora_target_names=DEFAULT_TARGETS.split(","),
                           lora_target_modules=map_lora_target_modules(DEFAULT_TARGETS))
    add_lora(transformer, 4, 4, lora_target_modules(transformer, args), scope="dit")
    randomize_lora(transformer)
    return peft_lora_state_dict(transformer)


def test_every_family_declares_its_export_formats():
    assert {f.name for f in FAMILIES} >= set(FAMILY_MODELS)
    assert family_of_pipeline("WanAnimate2Pipeline").lora_export_formats == ()


@pytest.mark.parametrize("family_name", sorted(FAMILY_MODELS))
def test_declared_export_formats_round_trip_the_others_cannot_be_written(family_name, tmp_path):
    pipeline_name, case_name = FAMILY_MODELS[family_name]
    family = family_of_pipeline(pipeline_name)
    assert family is not None and family.name == family_name
    lora = _trained_lora(_tiny_transformer(case_name))
    assert lora and all(k.startswith("transformer.") for k in lora)
    allowed = LORA_FORMATS[1:] if family.lora_export_formats is None else family.lora_export_formats
    loader = family.generate_pipeline.get(pipeline_name) or next(
        c for c in family.pipeline_classes if c.__name__ == pipeline_name)
    for fmt in LORA_FORMATS[1:]:
        if fmt not in allowed:
            with pytest.raises(ConversionError, match="no name in the"):
                export_lora(lora, tmp_path / fmt, formats=(fmt,))
            continue
        path = export_lora(lora, tmp_path / fmt, formats=(fmt,))[fmt]
        written = load_file(str(path))
        assert detect_lora_format(written) == fmt, (fmt, sorted(written)[:4])
        back = loader.lora_state_dict(str(path))
        assert set(back) == set(lora), (fmt, sorted(set(back) ^ set(lora))[:6])
        for k, v in lora.items():
            torch.testing.assert_close(back[k], v, msg=f"{fmt}: {k}")


def test_animate2_diffsynth_layout_is_read_not_written(tmp_path):
    """The Animate-2 pipeline reads DiffSynth's ``blocks.N.block.*`` LoRAs (``generate --lora``); our Diffusers file
    of the trained LoRA loads back through the same loader to the same tensors (the layout it is written in)."""
    lora = _trained_lora(_tiny_transformer("animate2"))
    path = export_lora(lora, tmp_path, formats=("diffusers",))["diffusers"]
    back = WanAnimate2Pipeline.lora_state_dict(str(path))
    assert set(back) == set(lora) and all(torch.equal(back[k], v) for k, v in lora.items())


@pytest.mark.parametrize("where", ["converted", "release"])
def test_animate2_export_format_is_refused_at_start_up(where, tmp_path, capsys):
    """One line naming the flag and the family, exit status 2, before the (absent) metadata file is read."""
    folder = (_index(tmp_path / "a2", "WanAnimate2Pipeline") if where == "converted"
              else make_tiny_release(tmp_path / "a2-release", arch="animate2"))
    err = _run(capsys, ["--model_path", str(folder)], tmp_path, "diffsynth")
    assert err.count("\n") == 1 and "--export_format diffsynth" in err and "Wan2.2-Animate-2" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pipeline_name", ["WanDancerPipeline", "MovaPipeline", "WanSpeechToVideoPipeline"])
def test_accepted_export_formats_pass_the_check(pipeline_name, tmp_path, capsys):
    err = _run(capsys, ["--model_path", str(_index(tmp_path / "m", pipeline_name))], tmp_path,
               "original,kohya,diffsynth")
    assert "--export_format" not in err and "none.csv" in err, err


# ------------------------------------------------------------------------------- the scopes' export declarations
# A scoped LoRA (``--lora_base_model vap`` / ``animate_adapter`` / ``vace``) sits on its scope's blocks only: its
# ``TrainingScope.lora_export_formats`` (``None``: the family's) is what the exporter can write for it.

#: scope -> its family and a tiny transformer with the scope's blocks
SCOPE_MODELS = {
    "vap": ("video-as-prompt", lambda: _tiny_transformer("vap")),
    "animate_adapter": ("animate", lambda: _tiny_transformer("animate")),
    "vace": ("vace", lambda: WanVACETransformer3DModel(**WAN_TINY, num_layers=2, vace_layers=[0, 1],
                                                       vace_in_channels=8)),
}


def _scope(name: str):
    family_name = SCOPE_MODELS[name][0]
    family = next(f for f in FAMILIES if f.name == family_name)
    return family, next(s for s in family.training_scopes if s.name == name)


def _trained_scoped_lora(transformer: torch.nn.Module, scope: str) -> dict[str, torch.Tensor]:
    args = SimpleNamespace(lora_target_names=DEFAULT_TARGETS.split(","),
                           lora_target_modules=map_lora_target_modules(DEFAULT_TARGETS))
    add_lora(transformer, 4, 4, lora_target_modules(transformer, args), scope=scope)
    return peft_lora_state_dict(transformer)


@pytest.mark.parametrize("scope_name", sorted(SCOPE_MODELS))
def test_scope_export_formats_match_the_exporter(scope_name, tmp_path):
    family, scope = _scope(scope_name)
    lora = _trained_scoped_lora(SCOPE_MODELS[scope_name][1](), scope_name)
    assert lora and all(".blocks." not in k for k in lora), sorted(lora)[:4]  # the scope's blocks only
    declared = scope.lora_export_formats if scope.lora_export_formats is not None else family.lora_export_formats
    allowed = LORA_FORMATS[1:] if declared is None else declared
    assert (scope_name == "vace") == (len(allowed) == 3), (scope_name, allowed)
    for fmt in LORA_FORMATS[1:]:
        if fmt in allowed:
            path = export_lora(lora, tmp_path / fmt, formats=(fmt,))[fmt]
            assert detect_lora_format(load_file(str(path))) == fmt
        else:
            with pytest.raises(ConversionError, match="no name in the"):
                export_lora(lora, tmp_path / fmt, formats=(fmt,))


def _run_scoped(capsys, tmp_path: Path, pipeline_name: str, scope: str, exports: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(["--dataset_base_path", str(tmp_path), "--dataset_metadata_path", str(tmp_path / "none.csv"),
              "--model_path", str(_index(tmp_path / "m", pipeline_name)), "--lora_base_model", scope,
              "--export_format", exports, "--output_path", str(tmp_path / "out")])
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("pipeline_name,scope", [("WanVideoAsPromptPipeline", "vap"),
                                                 ("WanAnimateExtPipeline", "animate_adapter")])
def test_scoped_export_format_is_refused_at_start_up(pipeline_name, scope, tmp_path, capsys):
    """One line naming the flag and the scope, exit status 2, before the (absent) metadata file is read (and
    although the family itself writes every layout for a ``dit`` LoRA)."""
    family = family_of_pipeline(pipeline_name)
    assert family.lora_export_formats is None or "kohya" in family.lora_export_formats
    err = _run_scoped(capsys, tmp_path, pipeline_name, scope, "kohya")
    assert err.count("\n") == 1 and "--export_format kohya" in err and f"--lora_base_model {scope}" in err, err
    assert not (tmp_path / "out").exists()


def test_vace_scoped_export_format_passes_the_check(tmp_path, capsys):
    err = _run_scoped(capsys, tmp_path, "WanVACEPipeline", "vace", "original,kohya,diffsynth")
    assert "--export_format" not in err and "none.csv" in err, err


# ------------------------------------------------------------------------------- --frame_rate is a run setting
def test_resuming_with_another_frame_rate_is_refused(tmp_path):
    """``--frame_rate`` (MOVA) is among the run arguments a checkpoint records: resuming with another rate is one
    line naming it; the same rate gets past the comparison (to the checkpoint's absent weights)."""
    folder = _index(tmp_path / "mova", "MovaPipeline")
    (folder / "metadata.csv").write_text("video,prompt\n")

    def args(*extra: str):
        return parse_args(["--dataset_base_path", str(folder), "--dataset_metadata_path", str(folder / "metadata.csv"),
                           "--model_path", str(folder), "--lora_base_model", "dit", "--output_path",
                           str(tmp_path / "out"), *extra])

    ckpt = tmp_path / "out" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, "world_size": 1, "deepspeed": False,
                                               "fingerprint": run_fingerprint(args("--frame_rate", "24"))}))
    with pytest.raises(ValueError) as err:
        check_checkpoint(ckpt, args("--frame_rate", "30"), 1, False)
    assert "--frame_rate 24.0 -> 30.0" in str(err.value) and "\n" not in str(err.value), err.value
    with pytest.raises(ValueError, match="is missing; the checkpoint is incomplete"):
        check_checkpoint(ckpt, args("--frame_rate", "24"), 1, False)
    # a checkpoint of an earlier version (no frame_rate recorded) resumes without --frame_rate, not with one
    old = run_fingerprint(args())
    del old["frame_rate"]
    (ckpt / STATE_FILE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, "world_size": 1, "deepspeed": False,
                                               "fingerprint": old}))
    with pytest.raises(ValueError, match="is missing; the checkpoint is incomplete"):
        check_checkpoint(ckpt, args(), 1, False)
    with pytest.raises(ValueError, match=r"--frame_rate None -> 30\.0"):
        check_checkpoint(ckpt, args("--frame_rate", "30"), 1, False)
