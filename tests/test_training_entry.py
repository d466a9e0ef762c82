"""How the trainer is reached and DiffSynth-Studio's remaining flags: ``diffusers-wan train`` / ``python -m
diffusers_wan_ext.training`` (also from a built wheel), every example script's arguments, ``--preset_lora_path``
(differential LoRA), ``--remove_prefix_in_ckpt``, ``--find_unused_parameters``, ``--tokenizer_path``,
``--audio_processor_path``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_wan_ext_cli import main as cli_main
from diffusers_wan_ext.demo import make_tiny_dataset
from diffusers_wan_ext.lora import convert_lora_state_dict, load_lora_file, save_lora_file
from diffusers_wan_ext.training import parse_args, run_training
from diffusers_wan_ext.training.checkpoints import TRAINABLE_WEIGHTS
from diffusers_wan_ext.training.components import load_training_components
from diffusers_wan_ext.training.trainer import WanTrainer
from helpers import src_env

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--height", "32", "--width", "32", "--num_frames", "9", "--max_sequence_length", "32", "--dtype", "fp32",
          "--report_to", "none", "--lora_rank", "4", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def t2v(converted):
    return converted("t2v")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("entry-data")
    make_tiny_dataset(folder)
    return folder


def run_args(t2v: Path, data: Path, out: Path, *extra) -> list[str]:
    return ["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
            "--model_path", str(t2v), *COMMON, "--lora_base_model", "dit", "--output_path", str(out),
            *[str(a) for a in extra]]


def losses(out: Path) -> list[float]:
    lines = (out / "logs" / "losses.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


# ------------------------------------------------------------------------------------------------ entry points


def test_diffusers_wan_train_help_is_the_trainers():
    out = subprocess.run([sys.executable, "-m", "diffusers_wan_ext_cli", "train", "--help"], capture_output=True,
                         text=True, timeout=300, env=src_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "usage: diffusers-wan train" in out.stdout
    for flag in ("--dataset_base_path", "--lora_base_model", "--preset_lora_path", "--remove_prefix_in_ckpt",
                 "--tokenizer_path", "--audio_processor_path", "--find_unused_parameters", "direct_distill:train",
                 "--enable_model_cpu_offload", "--enable_optimizer_cpu_offload", "--quant_options",
                 "--model_id_with_origin_paths"):
        assert flag in out.stdout
    top = subprocess.run([sys.executable, "-m", "diffusers_wan_ext_cli", "--help"], capture_output=True, text=True,
                         timeout=120, env=src_env(), cwd=ROOT)
    assert top.returncode == 0 and "train" in top.stdout


def test_diffusers_wan_train_reports_argument_errors_with_exit_status_2(capsys):
    assert cli_main(["train", "--dataset_base_path", "d"]) == 2
    assert "diffusers-wan train" in capsys.readouterr().err
    assert cli_main(["train", "--dataset_base_path", "d", "--dataset_metadata_path", "d/m.csv", "--model_path", "m",
                     "--lora_base_model", "nope"]) == 2
    assert "--lora_base_model" in capsys.readouterr().err


def test_train_verb_and_python_m_train_a_tiny_lora(t2v, data, tmp_path):
    assert cli_main(["train", *run_args(t2v, data, tmp_path / "verb", "--max_train_steps", "1")]) == 0
    assert (tmp_path / "verb" / "pytorch_lora_weights.safetensors").is_file()
    out = subprocess.run([sys.executable, "-m", "diffusers_wan_ext.training",
                          *run_args(t2v, data, tmp_path / "module", "--max_train_steps", "1")],
                         capture_output=True, text=True, timeout=600, env=src_env(HF_HUB_OFFLINE="1"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "module" / "pytorch_lora_weights.safetensors").is_file()
    assert losses(tmp_path / "module") == losses(tmp_path / "verb")


def test_a_built_wheel_holds_the_entry_points_and_answers_train_help(built_dists, tmp_path):
    """A non-editable install: the wheel built from the sources (the sdist of a copy of the checkout, shared with
    test_first_run), installed into a folder of its own."""
    wheel = built_dists[1]
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("diffusers_wan_ext/training/__main__.py", "diffusers_wan_ext/training/args.py",
                 "diffusers_wan_ext_cli/__init__.py", "diffusers_wan_ext_cli/__main__.py",
                 "diffusers_wan_ext_cli/parser.py", "diffusers_wan_ext_cli/manifest.json"):
        assert name in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "diffusers-wan = diffusers_wan_ext_cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(site))
    # one interpreter for both entry points (each pays the package import): ``diffusers-wan train --help``, then
    # ``python -m diffusers_wan_ext.training --help`` through runpy.run_module(alter_sys=True), what ``-m`` runs
    probe = ("import runpy, sys, diffusers_wan_ext_cli; print(diffusers_wan_ext_cli.__file__)\n"
             "sys.argv = ['diffusers-wan', 'train', '--help']\n"
             "try:\n    diffusers_wan_ext_cli.main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
             "print('=== python -m', flush=True)\n"
             "sys.argv = ['diffusers_wan_ext.training', '--help']\n"
             "runpy.run_module('diffusers_wan_ext.training', run_name='__main__', alter_sys=True)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "=== python -m" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    train_help, module_help = out.stdout.split("=== python -m")
    assert train_help.splitlines()[0].startswith(str(site))
    assert "--preset_lora_path" in train_help
    # python -m diffusers_wan_ext.training from the installed wheel (not the checkout: PYTHONPATH is the wheel's)
    assert "usage: python -m diffusers_wan_ext.training" in module_help
    for flag in ("direct_distill", "--enable_model_cpu_offload", "--quant_options", "--model_id_with_origin_paths"):
        assert flag in module_help


# ------------------------------------------------------------------------------------------- example scripts


def script_arguments(script: Path, tmp_path: Path) -> list[str]:
    """What ``script`` hands to ``accelerate launch``: a fake ``$PYTHON`` records ``-m accelerate.commands.launch
    ARGS`` as ``launch ARGS`` (and fails on any other call)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "python").write_text('#!/bin/sh\n[ "$1 $2" = "-m accelerate.commands.launch" ] || '
                                 '{ echo "not accelerate launch: $*" >&2; exit 9; }\n'
                                 'shift 2\nprintf "%s\\0" launch "$@" > "$ARGS_OUT"\n')
    (fake / "python").chmod(0o755)
    record = tmp_path / f"{script.parent.name}-{script.stem}.args"
    env = dict(os.environ, PYTHON=str(fake / "python"), ARGS_OUT=str(record))
    out = subprocess.run(["bash", str(script), "--max_train_steps", "3"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, f"{script}: {out.stderr}"
    return record.read_text().split("\0")[:-1]


def test_every_example_script_parses_with_the_trainers_parser(tmp_path):
    scripts = sorted((ROOT / "examples" / "training").glob("*/*.sh"))
    names = {s.relative_to(ROOT / "examples" / "training").as_posix() for s in scripts}
    for model in ("Wan2.1-VACE-1.3B-Preview", "Wan2.1-Fun-V1.1-14B-InP", "Wan2.1-T2V-1.3B", "Wan2.2-S2V-14B",
                  "Wan2.2-Animate-14B", "Video-As-Prompt-Wan2.1-14B", "LongCat-Video"):
        assert {f"lora/{model}.sh", f"full/{model}.sh"} <= names
    # every model of the table has both: a LoRA script and a full fine-tuning one
    lora, full = ({n[len(kind) + 1:] for n in names if n.startswith(f"{kind}/")} for kind in ("lora", "full"))
    assert lora == full and len(lora) >= 30, sorted(lora ^ full)
    assert "direct_distill/Wan2.1-T2V-1.3B.sh" in names
    for script in scripts:
        argv = script_arguments(script, tmp_path)
        assert argv[:2] == ["launch", "--config_file"], (script, argv[:3])
        assert Path(argv[2]).is_file() and Path(argv[3]).name == "train.py", (script, argv[:4])
        args = parse_args(argv[4:])  # SystemExit (argparse) names the script's bad argument
        assert args.max_train_steps == 3, script
        assert args.lora_base_model is not None or args.trainable_models, script
        if "VACE-1.3B-Preview" in script.name:
            assert args.extra_inputs == ["vace_video", "vace_reference_image"]
            assert args.lora_scope == "vace" or args.trainable_scope == "vace"
        if "Fun-V1.1-14B-InP" in script.name:
            assert args.extra_inputs == ["input_image", "end_image"]
        if script.parent.name == "direct_distill":
            assert args.task == "direct_distill" and args.trainable_models == ["transformer"], script
            assert args.distill_inputs == ["seed", "rand_device", "num_inference_steps", "cfg_scale"], script
            assert args.dataset_base_path.endswith("Wan2.1-T2V-1.3B_direct_distill"), args.dataset_base_path


# ------------------------------------------------------------------------------------------- preset LoRA


def preset_lora(transformer, rank: int = 2, seed: int = 7) -> dict[str, torch.Tensor]:
    """A random Diffusers-layout LoRA on every block's to_q / ffn.net.2 (``transformer.`` keys)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in transformer.named_modules():
        if name.endswith(("attn1.to_q", "ffn.net.2")):
            out_f, in_f = module.weight.shape
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
    return sd


def test_preset_lora_is_fused_before_training_and_the_saved_lora_is_the_difference(t2v, data, tmp_path):
    base = load_training_components(t2v, dtype=torch.float32, load_encoders=False).transformer
    # the preset given in ComfyUI's layout: any layout the LoRA loader reads
    preset_file = tmp_path / "preset_comfy.safetensors"
    save_lora_file(convert_lora_state_dict(preset_lora(base), "original"), preset_file)
    preset = convert_lora_state_dict(load_lora_file(preset_file), "diffusers")
    fused = {}
    for key, a in preset.items():
        if key.endswith("lora_A.weight"):
            name = key[len("transformer."):-len(".lora_A.weight")]
            b = preset[key.replace("lora_A", "lora_B")]
            fused[name] = base.get_submodule(name).weight.detach().float() + b.float() @ a.float()
    assert len(fused) == 4
    with torch.no_grad():
        for name, w in fused.items():
            base.get_submodule(name).weight.copy_(w)
    base.save_pretrained(tmp_path / "fused_transformer")

    args = parse_args(run_args(t2v, data, tmp_path / "preset", "--max_train_steps", "2", "--preset_lora_path",
                               preset_file, "--preset_lora_model", "dit", "--find_unused_parameters"))
    trainer = WanTrainer(args)
    assert trainer.accelerator.ddp_handler.find_unused_parameters is True
    transformer = trainer.module.transformer
    for name, w in fused.items():  # the LoRA's base layers hold base + preset
        torch.testing.assert_close(transformer.get_submodule(name).base_layer.weight, w, rtol=0, atol=0)
    trainer.train()
    # the same run on a transformer folder that already holds base + preset: same losses, same LoRA
    run_training(parse_args(run_args(t2v, data, tmp_path / "prefused", "--max_train_steps", "2",
                                     "--transformer_path", tmp_path / "fused_transformer")))
    assert losses(tmp_path / "preset") == losses(tmp_path / "prefused")
    saved = load_file(str(tmp_path / "preset" / "pytorch_lora_weights.safetensors"))
    reference = load_file(str(tmp_path / "prefused" / "pytorch_lora_weights.safetensors"))
    assert saved.keys() == reference.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], reference[key], rtol=0, atol=0)
    # the saved adapter is the trained difference only: rank 4, and its delta is tiny next to the preset's
    assert all(v.shape[0] == 4 for k, v in saved.items() if "lora_A" in k)
    for key in (k for k in preset if k.endswith("lora_A.weight")):
        trained = saved[key.replace("lora_A", "lora_B")] @ saved[key]
        preset_delta = preset[key.replace("lora_A", "lora_B")] @ preset[key]
        assert trained.norm() < 0.1 * preset_delta.norm(), key


def test_preset_lora_arguments_are_checked_before_loading(t2v, data, tmp_path, capsys):
    base = run_args(t2v, data, tmp_path / "o")
    with pytest.raises(SystemExit):
        parse_args(base + ["--preset_lora_path", str(tmp_path / "missing.safetensors")])
    assert "--preset_lora_path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(base + ["--preset_lora_model", "dit"])
    assert "--preset_lora_model needs --preset_lora_path" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    save_file({"transformer.nothing.lora_A.weight": torch.ones(2, 4),
               "transformer.nothing.lora_B.weight": torch.ones(4, 2)}, str(other))
    with pytest.raises(SystemExit):
        parse_args(base + ["--preset_lora_path", str(other), "--preset_lora_model", "dit2"])
    assert "this run trains transformer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- remove_prefix_in_ckpt


def test_remove_prefix_in_ckpt_strips_the_checkpoint_keys_and_resume_puts_it_back(t2v, data, tmp_path):
    whole = tmp_path / "whole"
    run_training(parse_args(run_args(t2v, data, whole, "--max_train_steps", "2", "--save_steps", "1")))
    out = tmp_path / "stripped"
    run_training(parse_args(run_args(t2v, data, out, "--max_train_steps", "1", "--save_steps", "1",
                                     "--remove_prefix_in_ckpt", "pipe.dit.")))
    keys = list(load_file(str(out / "checkpoint-1" / TRAINABLE_WEIGHTS)))
    assert keys and not any(k.startswith("transformer.") for k in keys)
    assert any(k.startswith("blocks.0.") for k in keys)
    unstripped = load_file(str(whole / "checkpoint-1" / TRAINABLE_WEIGHTS))
    assert sorted("transformer." + k for k in keys) == sorted(unstripped)
    run_training(parse_args(run_args(t2v, data, out, "--max_train_steps", "2", "--save_steps", "1",
                                     "--remove_prefix_in_ckpt", "pipe.dit.", "--resume_from_checkpoint", "latest")))
    assert losses(out) == losses(whole)


# ------------------------------------------------------------------------------------- component overrides


def test_tokenizer_and_audio_processor_paths(t2v, data, tmp_path, capsys):
    tokenizer = tmp_path / "my_tokenizer"
    shutil.copytree(Path(t2v) / "tokenizer", tokenizer)
    c = load_training_components(t2v, dtype=torch.float32, tokenizer_path=tokenizer)
    assert Path(c.tokenizer.name_or_path) == tokenizer
    base = run_args(t2v, data, tmp_path / "o")
    for flag in ("--tokenizer_path", "--audio_processor_path"):
        with pytest.raises(SystemExit):
            parse_args(base + [flag, str(tmp_path / "absent")])
        assert f"{flag} {tmp_path / 'absent'}: no such folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--audio_processor_path: .* has no audio processor"):
        load_training_components(t2v, dtype=torch.float32, audio_processor_path=tokenizer)
