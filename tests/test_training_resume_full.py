"""Exact resume of full fine-tuning (the LoRA modes' resume tests are in test_training, test_training_modes and
test_training_mova): a run resumed from its step-1 checkpoint logs the uninterrupted run's next losses bit for bit and
saves the same transformer folder, plain and with layer offload (model + optimizer in CPU memory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_wan_ext.demo import make_tiny_dataset
from diffusers_wan_ext.training import parse_args, run_training

COMMON = ["--height", "32", "--width", "32", "--num_frames", "9", "--max_sequence_length", "32", "--dtype", "fp32",
          "--report_to", "none", "--learning_rate", "1e-3", "--trainable_models", "dit", "--save_dtype", "fp32"]
MODES = {"plain": [], "layer-offload": ["--enable_model_cpu_offload", "--enable_optimizer_cpu_offload",
                                        "--use_gradient_checkpointing"]}


@pytest.fixture(scope="module")
def cache(converted, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny T2V folder and a cache of 3 encoded clips (``--task sft:data_process``)."""
    model = converted("t2v")
    data = tmp_path_factory.mktemp("resume-full-data")
    make_tiny_dataset(data)
    out = tmp_path_factory.mktemp("resume-full-cache") / "cache"
    run_training(parse_args([str(a) for a in [
        "--task", "sft:data_process", "--dataset_base_path", data, "--dataset_metadata_path", data / "metadata.csv",
        "--model_path", model, *COMMON, "--output_path", out]]))
    return model, out


def _run(model: Path, cache: Path, out: Path, *extra: str) -> dict[int, float]:
    run_training(parse_args([str(a) for a in [
        "--task", "sft:train", "--dataset_base_path", cache, "--model_path", model, *COMMON, "--max_train_steps", "3",
        "--save_steps", "1", "--output_path", out, *extra]]))
    lines = (out / "logs" / "losses.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


@pytest.mark.parametrize("mode", list(MODES))
def test_full_finetuning_resumes_exactly(mode, cache, tmp_path):
    model, cached = cache
    whole = _run(model, cached, tmp_path / "whole", *MODES[mode])
    assert sorted(whole) == [1, 2, 3]
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoint-1", resumed_dir / "checkpoint-1")
    resumed = _run(model, cached, resumed_dir, *MODES[mode], "--resume_from_checkpoint", "latest")
    assert resumed == {k: v for k, v in whole.items() if k > 1}
    a, b = (load_file(str(d / "transformer" / "diffusion_pytorch_model.safetensors"))
            for d in (tmp_path / "whole", resumed_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(model / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], base[k].to(a[k].dtype)) for k in a)  # it did train
