"""Training checkpoints are safe to resume: no pickle is ever loaded, partial writes are ignored, another run's
checkpoint is refused naming what changed, files follow the umask; bad metadata is one error naming the row."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest

from diffusers_wan_ext.demo import make_tiny_dataset
from diffusers_wan_ext.training import DatasetRowError, VideoDataset, main, parse_args, run_training
from diffusers_wan_ext.training import trainer as trainer_module
from diffusers_wan_ext.training.trainer import WanTrainer

COMMON = ["--height", "32", "--width", "32", "--num_frames", "9", "--max_sequence_length", "32", "--dtype", "fp32",
          "--report_to", "none", "--lora_rank", "4"]
MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"dwe-pickle-ran-{os.getpid()}"


class Exploit:
    """Unpickling this writes MARKER (what a crafted checkpoint file could do)."""

    def __reduce__(self):
        return (Path.write_text, (MARKER, "pwned"))


def losses(out: Path) -> dict[int, float]:
    lines = (Path(out) / "logs" / "losses.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt-data")
    make_tiny_dataset(folder)
    return folder


@pytest.fixture(scope="module")
def run_args(converted, data, tmp_path_factory) -> list[str]:
    cache = tmp_path_factory.mktemp("ckpt-cache") / "cache"
    run_training(parse_args(["--task", "sft:data_process", "--dataset_base_path", str(data), "--dataset_metadata_path",
                             str(data / "metadata.csv"), "--model_path", str(converted("t2v")), *COMMON,
                             "--output_path", str(cache)]))
    return ["--task", "sft:train", "--dataset_base_path", str(cache), "--model_path", str(converted("t2v")), *COMMON,
            "--lora_base_model", "dit", "--learning_rate", "1e-3", "--max_train_steps", "2", "--save_steps", "1"]


@pytest.fixture(scope="module")
def full(run_args, tmp_path_factory) -> Path:
    """An uninterrupted 2-step run with a checkpoint per step, written under umask 027."""
    out = tmp_path_factory.mktemp("ckpt-full") / "out"
    old = os.umask(0o027)
    try:
        run_training(parse_args(run_args + ["--output_path", str(out)]))
    finally:
        os.umask(old)
    return out


def trainer(run_args, *extra) -> WanTrainer:
    return WanTrainer(parse_args(run_args + [str(a) for a in extra]))


# ----------------------------------------------------------------------------------------------------- pickles


ACCELERATE_NAMES = ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "scaler.pt",
                    "sampler.bin", "dl_state_dict.bin", "pytorch_model.bin"]
OWN_NAMES = ["training_state.json", "trainable_weights.safetensors", "optimizer.safetensors",
             "rng_state_0.safetensors"]


@pytest.mark.parametrize("name", ACCELERATE_NAMES + OWN_NAMES)
def test_a_crafted_pickle_in_a_checkpoint_never_runs(full, run_args, tmp_path, name):
    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(full / "checkpoint-1", ckpt)
    (ckpt / name).write_bytes(pickle.dumps(Exploit()))
    MARKER.unlink(missing_ok=True)
    with pytest.raises(ValueError) as err:
        trainer(run_args, "--output_path", tmp_path / "out", "--resume_from_checkpoint", ckpt).train()
    assert not MARKER.exists()
    message = str(err.value)
    assert "\n" not in message and str(ckpt) in message, message
    if name in ACCELERATE_NAMES:
        assert "pickle" in message and name in message


def test_the_command_line_prints_one_error_line(full, run_args, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(full / "checkpoint-1", ckpt)
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(SystemExit) as exit_:
        main(run_args + ["--output_path", str(tmp_path / "out"), "--resume_from_checkpoint", str(ckpt)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and not MARKER.exists()


# ------------------------------------------------------------------------------------------- partial, latest


def test_a_checkpoint_killed_while_written_is_ignored_by_latest(full, run_args, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = trainer_module.save_optimizer_state

    def killed_on_step_2(state_dict, path):
        if "checkpoint-2" in str(path):
            raise KeyboardInterrupt  # the process dies while checkpoint-2 is being written
        return real(state_dict, path)

    monkeypatch.setattr(trainer_module, "save_optimizer_state", killed_on_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_training(parse_args(run_args + ["--output_path", str(out)]))
    monkeypatch.undo()
    assert (out / ".checkpoint-2.partial").is_dir() and not (out / "checkpoint-2").exists()
    (out / "checkpoint-7").mkdir()  # an older trainer's half-written folder: no state file
    (out / "checkpoint-8").mkdir()
    (out / "checkpoint-8" / "training_state.json").write_text('{"progress": ')
    t = trainer(run_args, "--output_path", out, "--resume_from_checkpoint", "latest")
    assert t.resume_from == out / "checkpoint-1"
    t.train()
    assert losses(out)[2] == losses(full)[2]  # exact resume: the step-2 loss of the uninterrupted run


def test_latest_refuses_a_checkpoint_of_another_run(full, run_args, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(full, out)
    with pytest.raises(ValueError, match=r"other arguments \(--seed 0 -> 1\)"):
        trainer(run_args, "--output_path", out, "--resume_from_checkpoint", "latest", "--seed", "1")


@pytest.mark.parametrize("change,named", [
    (["--lora_rank", "8"], "--lora_rank 4 -> 8"),
    (["--lora_target_modules", "q,k"], "--lora_target_modules"),
    (["--model_path", "COPY"], "--model_path"),
    (["--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps 1 -> 2"),
])
def test_resuming_with_changed_arguments_names_them(full, run_args, tmp_path, change, named):
    args = list(run_args)
    if change[1] == "COPY":
        shutil.copytree(args[args.index("--model_path") + 1], tmp_path / "model")
        change = ["--model_path", str(tmp_path / "model")]
    i = args.index(change[0]) if change[0] in args else None
    if i is not None:
        args[i + 1] = change[1]
    else:
        args += change
    with pytest.raises(ValueError) as err:
        trainer(args, "--output_path", tmp_path / "o", "--resume_from_checkpoint", full / "checkpoint-1")
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_changed_dataset_is_named(run_args, data, converted, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    args = ["--dataset_base_path", str(copy), "--dataset_metadata_path", str(copy / "metadata.csv"), "--model_path",
            str(converted("t2v")), *COMMON, "--lora_base_model", "dit", "--max_train_steps", "1", "--save_steps", "1"]
    run_training(parse_args(args + ["--output_path", str(tmp_path / "a")]))
    with open(copy / "metadata.csv", "a") as f:
        f.write("videos/clip_0.mp4,one more row\n")
    with pytest.raises(ValueError, match="the dataset metadata content changed"):
        WanTrainer(parse_args(args + ["--output_path", str(tmp_path / "a"), "--resume_from_checkpoint", "latest"]))


# ------------------------------------------------------------------------------------------------------ umask


def test_written_files_follow_the_umask(full):
    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(full / "checkpoint-1") == 0o750
    for p in [*(full / "checkpoint-2").iterdir(), full / "pytorch_lora_weights.safetensors"]:
        assert mode(p) == 0o640, p


# ------------------------------------------------------------------------------------------------ bad metadata


def _rewrite(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


@pytest.mark.parametrize("name,payload,label", [
    ("m.csv", b"video,prompt\nvideos/clip_0.mp4,ok\nvideos/clip_1.mp4,caf\xe9\n", "m.csv row 1 (line 3)"),
    ("m.csv", b"video,prompt\nvideos/clip_0.mp4,ok\nvideos/clip_1.mp4,a,b\n", "m.csv row 1 (line 3)"),
    ("m.json", b'[{"video": "videos/clip_0.mp4", "prompt": "ok"},\n {"video": "x" "prompt": "y"}]', "m.json line 2"),
    ("m.jsonl", b'{"video": "videos/clip_0.mp4", "prompt": "ok"}\n{"video": \n', "m.jsonl row 1 (line 2)"),
    ("m.jsonl", b'{"video": "videos/clip_0.mp4", "prompt": "ok"}\n{"prompt": "\xff"}\n', "m.jsonl line 2"),
])
def test_bad_metadata_is_one_error_naming_the_file_and_row(data, tmp_path, name, payload, label):
    shutil.copytree(data, tmp_path / "d")
    meta = _rewrite(tmp_path / "d" / name, payload)
    with pytest.raises(DatasetRowError) as err:
        VideoDataset(tmp_path / "d", meta, num_frames=9, height=32, width=32)
    assert label in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_bad_metadata_fails_before_the_model_loads(data, tmp_path, capsys):
    shutil.copytree(data, tmp_path / "d")
    rows = list(csv.reader(open(tmp_path / "d" / "metadata.csv")))
    rows[2].append("extra")
    with open(tmp_path / "d" / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(SystemExit) as exit_:  # --model_path does not exist: the metadata is checked first
        main(["--dataset_base_path", str(tmp_path / "d"), "--dataset_metadata_path", str(tmp_path / "d" / "metadata.csv"),
              "--model_path", str(tmp_path / "no-model"), *COMMON, "--lora_base_model", "dit", "--output_path",
              str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "metadata.csv row 1 (line 3)" in err[0]


def test_a_pickled_weights_file_is_refused_for_full_finetuning(run_args, tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(pickle.dumps(Exploit()))
    args = [a for a in run_args if a not in ("--lora_base_model", "dit")] + ["--trainable_models", "dit"]
    with pytest.raises(ValueError, match=r"\.safetensors file"):
        trainer(args, "--output_path", tmp_path / "o", "--resume_from_checkpoint", weights)
    assert not MARKER.exists()


def test_a_missing_file_named_in_a_row_fails_before_the_model_loads(data, tmp_path, capsys):
    shutil.copytree(data, tmp_path / "d")
    meta = tmp_path / "d" / "metadata.csv"
    meta.write_text(meta.read_text().replace("videos/clip_1.mp4", "videos/gone.mp4"))
    with pytest.raises(SystemExit) as exit_:
        main(["--dataset_base_path", str(tmp_path / "d"), "--dataset_metadata_path", str(meta), "--model_path",
              str(tmp_path / "no-model"), *COMMON, "--lora_base_model", "dit", "--output_path", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert "metadata.csv row 1 (line 3)" in err[0] and "gone.mp4" in err[0]
