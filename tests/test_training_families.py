"""Training reads what the families declare (scopes, extra components, dataset columns, LoRA components): the
speed-control ``motion_controller`` trains and is saved as before, the VACE scope selects the VACE blocks, and no
training module names a family."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_wan_ext.demo import make_tiny_dataset, make_tiny_motion_controller
from diffusers_wan_ext.families.speed_control import add_motion_controller
from diffusers_wan_ext.training import EXTRA_INPUTS, parse_args, run_training

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--height", "32", "--width", "32", "--num_frames", "9", "--max_sequence_length", "32", "--dtype", "fp32",
          "--report_to", "none", "--lora_rank", "4"]


def train(*argv) -> Path:
    return run_training(parse_args([str(a) for a in argv]))


def losses(out: Path) -> dict[int, float]:
    lines = (Path(out) / "logs" / "losses.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


@pytest.fixture(scope="module")
def speed(converted, tmp_path_factory) -> Path:
    """A converted tiny T2V folder with the speed-control motion controller added."""
    folder = tmp_path_factory.mktemp("speed") / "speed"
    shutil.copytree(converted("t2v"), folder)
    mc = make_tiny_motion_controller(tmp_path_factory.mktemp("mc") / "model.safetensors", seed=1)
    return add_motion_controller(folder, mc, dtype="fp32")


@pytest.fixture(scope="module")
def speed_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("speed-data")
    meta = make_tiny_dataset(folder)
    rows = list(csv.DictReader(open(meta)))
    for i, r in enumerate(rows):
        r["motion_bucket_id"] = str(20 + 30 * i)
    with open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


def test_family_declarations_reach_the_trainer():
    assert {"vace_video", "vace_video_mask", "vace_reference_image", "motion_bucket_id"} <= set(EXTRA_INPUTS)
    base = ["--dataset_base_path", "d", "--dataset_metadata_path", "d/m.csv", "--model_path", "m"]
    args = parse_args(base + ["--trainable_models", "motion_controller", "--lora_base_model", "dit"])
    assert args.trainable_models == ["motion_controller"] and args.lora_scope == "dit"
    # no training module names a family (their declarations live in families/<name>.py)
    for path in (ROOT / "src" / "diffusers_wan_ext" / "training").glob("*.py"):
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines()
                         if not line.lstrip().startswith(("#", '"', "``", "*")))
        assert not re.search(r"['\"](vace2?|vace_blocks|motion_controller|motion_bucket_id)['\"]", code), path.name


def test_motion_controller_trains_and_saves_as_its_own_folder(speed, speed_data, tmp_path):
    from diffusers_wan_ext import WanMotionControllerModel

    args = ["--dataset_base_path", speed_data, "--dataset_metadata_path", speed_data / "metadata.csv",
            "--model_path", speed, *COMMON, "--extra_inputs", "motion_bucket_id", "--trainable_models",
            "motion_controller", "--learning_rate", "1e-2", "--max_train_steps", "2", "--save_steps", "2"]
    out = train(*args, "--output_path", tmp_path / "mc")
    assert len(losses(out)) == 2
    tuned = WanMotionControllerModel.from_pretrained(str(out / "motion_controller"))
    base = WanMotionControllerModel.from_pretrained(str(speed / "motion_controller"))
    a, b = tuned.state_dict(), base.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k].float(), b[k].bfloat16().float()) for k in a)
    ckpt = load_file(str(out / "checkpoint-2" / "trainable_weights.safetensors"))
    assert ckpt and all(k.startswith("motion_controller.") for k in ckpt)
    # the cache stores motion_bucket_id under its column name, and training from it gives the same losses
    cache = train("--task", "sft:data_process", *args[:6], *COMMON, "--extra_inputs", "motion_bucket_id",
                  "--output_path", tmp_path / "cache")
    entry = load_file(str(next(iter(sorted(cache.glob("0/*.safetensors"))))))
    assert entry["motion_bucket_id"].shape == (1,)
    cached = train("--task", "sft:train", "--dataset_base_path", cache, *args[4:6], *COMMON, "--extra_inputs",
                   "motion_bucket_id", "--trainable_models", "motion_controller", "--learning_rate", "1e-2",
                   "--max_train_steps", "2", "--output_path", tmp_path / "cached")
    assert losses(cached) == losses(out)


def test_motion_bucket_id_without_a_motion_controller_is_named(converted, speed_data, tmp_path):
    with pytest.raises(ValueError, match="motion_controller"):
        train("--dataset_base_path", speed_data, "--dataset_metadata_path", speed_data / "metadata.csv",
              "--model_path", converted("t2v"), *COMMON, "--lora_base_model", "dit", "--trainable_models",
              "motion_controller", "--output_path", tmp_path / "x")
