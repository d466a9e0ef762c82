"""Trainer arguments that depend on the model's family are checked before any model loads: ``--export_format``
with a family whose LoRAs the Wan layouts cannot hold (LongCat-Video), told from a converted folder, an original
release folder or a ``--transformer_path`` of its own layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffusers_wan_ext.families.longcat import make_tiny_longcat_release
from diffusers_wan_ext.training import main
from diffusers_wan_ext.training.components import model_family


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


def test_export_format_of_a_wan_folder_passes_the_check(tmp_path, capsys):
    """A Wan model keeps every layout: the run gets past the check (and stops at the missing metadata file)."""
    folder = _index(tmp_path / "wan", "WanPipeline")
    assert model_family(folder) is None or model_family(folder).lora_export_formats is None
    err = _run(capsys, ["--model_path", str(folder)], tmp_path)
    assert "--export_format" not in err and "none.csv" in err, err
