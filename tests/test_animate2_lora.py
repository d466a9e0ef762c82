"""Wan2.2-Animate-2 LoRA interop: DiffSynth-Studio's LoRA target names on the Animate-2 transformer (its module
names are not the Wan DiT's: ``self_attn.q`` -> ``self_attn.to_q``, not ``attn1.to_q``), its full fine-tuning of the
self-attention q / k / v (``--trainable_models dit.blocks.N.block.self_attn.q,...``), and ``diffusers-wan generate
--lora`` reading a DiffSynth-format Animate-2 LoRA file through the pipeline's own loader."""

from __future__ import annotations

import csv
from pathlib import Path

import imageio
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers_wan_ext_cli import main
from diffusers_wan_ext.demo import make_tiny_dataset, make_tiny_release
from diffusers_wan_ext.models import WanAnimate2ExtTransformer3DModel
from diffusers_wan_ext.training import parse_args, run_training
from diffusers_wan_ext.training.modules import add_lora
from diffusers_wan_ext.training.targets import lora_target_modules, trainable_module_parameters
from helpers import ROOT, fixed_draws_loss
from test_training_entry import script_arguments

TINY_CFG = dict(text_len=16, dim=48, ffn_dim=96, freq_dim=32, text_dim=32, num_heads=2, num_layers=2, clip_dim=40)
SELF_QKV = {f"blocks.{i}.self_attn.to_{x}" for i in range(2) for x in "qkv"}
EXTRA_INPUTS = "animate2_prompt_ref,animate2_reference_image,animate2_reference_video"


@pytest.fixture(scope="module")
def a2_folder(tmp_path_factory) -> Path:
    """A tiny Animate-2 release converted by the CLI (fp32)."""
    release = make_tiny_release(tmp_path_factory.mktemp("a2") / "rel", arch="animate2")
    dst = tmp_path_factory.mktemp("a2-converted") / "out"
    assert main(["convert", str(release), str(dst), "--image-encoder-heads", "2", "--dtype", "fp32"]) == 0
    return dst


def test_generate_cli_reads_a_diffsynth_animate2_lora(a2_folder, tmp_path, capsys):
    """``--lora FILE`` with DiffSynth's Animate-2 keys (``blocks.N.block.self_attn.q.lora_A.default.weight``) loads
    and changes the video; a foreign module name is one error line naming the key."""
    rs = np.random.RandomState(0)
    Image.fromarray(rs.randint(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / "ref.png")
    imageio.mimwrite(tmp_path / "drive.mp4", [rs.randint(0, 255, (16, 16, 3), np.uint8) for _ in range(5)], fps=8)
    g = torch.Generator().manual_seed(1)
    lora = {}
    for block in (0, 1):
        for name in ("self_attn.q", "self_attn.v"):
            lora[f"blocks.{block}.block.{name}.lora_A.default.weight"] = torch.randn(4, 48, generator=g)
            lora[f"blocks.{block}.block.{name}.lora_B.default.weight"] = torch.randn(48, 4, generator=g) * 4
    save_file(lora, str(tmp_path / "a2_lora.safetensors"))
    bad = {"blocks.0.block.self_attn.x.lora_A.default.weight": torch.zeros(4, 48),
           "blocks.0.block.self_attn.x.lora_B.default.weight": torch.zeros(48, 4)}
    save_file(bad, str(tmp_path / "bad_lora.safetensors"))

    def generate(out: str, *extra: str) -> int:
        return main(["generate", "--model", str(a2_folder), "--prompt", "a person", "--height", "16", "--width", "16",
                     "--num-frames", "5", "--steps", "1", "--dtype", "fp32", "--image", str(tmp_path / "ref.png"),
                     "--driving-video", str(tmp_path / "drive.mp4"), "--output", str(tmp_path / out), *extra])

    assert generate("base.mp4") == 0
    assert generate("lora.mp4", "--lora", str(tmp_path / "a2_lora.safetensors")) == 0
    assert "loaded LoRA" in capsys.readouterr().err
    base, adapted = (imageio.v3.imread(tmp_path / f).astype(np.float32) for f in ("base.mp4", "lora.mp4"))
    assert base.shape == adapted.shape == (5, 16, 16, 3)
    assert np.abs(adapted - base).max() > 8
    assert generate("bad.mp4", "--lora", str(tmp_path / "bad_lora.safetensors")) == 2
    err = capsys.readouterr().err
    assert "bad_lora.safetensors" in err and "self_attn.x" in err and "Traceback" not in err, err
    assert not (tmp_path / "bad.mp4").exists()


# ------------------------------------------------------------------------------------------------ training


def _script_args(kind: str, tmp_path: Path):
    argv = script_arguments(ROOT / "examples" / "training" / kind / "Wan2.2-Animate-2-14B.sh", tmp_path)
    return parse_args(argv[4:])


def _lora_modules(transformer) -> set[str]:
    return {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}


def test_diffsynth_lora_names_adapt_the_self_attention_qkv(tmp_path):
    """The LoRA script's DiffSynth names (self_attn.q,k,v) adapt exactly the self-attention q / k / v Linears of
    the Animate-2 DiT (the Wan DiT mapping would name attn1, which it has not; to_q would add the cross-attention);
    DiffSynth's short names match its suffixes (q: self- and cross-attention)."""
    args = _script_args("lora", tmp_path)
    assert args.lora_target_names == ["self_attn.q", "self_attn.k", "self_attn.v"]
    transformer = WanAnimate2ExtTransformer3DModel(**TINY_CFG)
    add_lora(transformer, 4, 4, lora_target_modules(transformer, args))
    assert _lora_modules(transformer) == SELF_QKV
    assert all(isinstance(transformer.get_submodule(n).base_layer, torch.nn.Linear) for n in SELF_QKV)
    short = parse_args([*_script_args_argv(tmp_path), "--lora_target_modules", "q,ffn.0"])
    transformer = WanAnimate2ExtTransformer3DModel(**TINY_CFG)
    add_lora(transformer, 4, 4, lora_target_modules(transformer, short))
    assert _lora_modules(transformer) == {f"blocks.{i}.{m}" for i in range(2)
                                          for m in ("self_attn.to_q", "cross_attn.to_q", "ffn.0")}
    bad = parse_args([*_script_args_argv(tmp_path), "--lora_target_modules", "attn1.to_q"])
    with pytest.raises(ValueError, match="attn1.to_q"):
        lora_target_modules(transformer, bad)


def _script_args_argv(tmp_path: Path) -> list[str]:
    return script_arguments(ROOT / "examples" / "training" / "lora" / "Wan2.2-Animate-2-14B.sh", tmp_path)[4:]


def test_diffsynth_trainable_modules_are_the_self_attention_qkv(tmp_path):
    """The full script's --trainable_models is DiffSynth's list (dit.blocks.N.block.self_attn.q/k/v, N < 40); on
    the tiny DiT those paths select exactly the self-attention q / k / v parameters; an unknown path is named."""
    args = _script_args("full", tmp_path)
    assert args.trainable_models == ["transformer"]
    assert args.trainable_modules == [f"blocks.{i}.block.self_attn.{x}" for i in range(40) for x in "qkv"]
    transformer = WanAnimate2ExtTransformer3DModel(**TINY_CFG)
    chosen = trainable_module_parameters(transformer, args.trainable_modules[:6])
    assert set(chosen) == {f"{m}.{p}" for m in SELF_QKV for p in ("weight", "bias")}
    with pytest.raises(ValueError, match="blocks.2.block.self_attn.q"):
        trainable_module_parameters(transformer, args.trainable_modules[:7])


@pytest.fixture(scope="module")
def a2_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("a2-data")
    rs = np.random.RandomState(0)
    make_tiny_dataset(root, num_videos=1, num_images=0, num_frames=5, size=(16, 16))
    Image.fromarray(rs.randint(0, 255, (16, 16, 3), np.uint8)).save(root / "ref.png")
    imageio.mimwrite(root / "drive.mp4", [rs.randint(0, 255, (16, 16, 3), np.uint8)] * 5, fps=8)
    rows = list(csv.DictReader(open(root / "metadata.csv")))
    for r in rows:
        r.update(animate2_reference_image="ref.png", animate2_reference_video="drive.mp4", animate2_prompt_ref="go")
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def _train(a2_folder: Path, data: Path, out: Path, *extra: str) -> Path:
    argv = ["--dataset_base_path", data, "--dataset_metadata_path", data / "metadata.csv", "--model_path", a2_folder,
            "--height", "16", "--width", "16", "--num_frames", "5", "--max_sequence_length", "16", "--dtype", "fp32",
            "--report_to", "none", "--extra_inputs", EXTRA_INPUTS, "--learning_rate", "1e-1", "--max_train_steps",
            "1", "--output_path", out, *extra]
    return run_training(parse_args([str(a) for a in argv]))


def test_training_runs_train_exactly_the_self_attention_qkv(a2_folder, a2_data, tmp_path):
    """A LoRA run with DiffSynth's names saves factors for the self-attention q / k / v only; a full run with
    DiffSynth's module paths changes exactly those weights (the rest of the saved DiT is the original)."""
    out = _train(a2_folder, a2_data, tmp_path / "lora", "--lora_base_model", "dit", "--lora_rank", "4",
                 "--lora_target_modules", "self_attn.q,self_attn.k,self_attn.v")
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in saved}
    assert modules == SELF_QKV, sorted(modules)
    paths = ",".join(f"dit.blocks.{i}.block.self_attn.{x}" for i in range(2) for x in "qkv")
    out = _train(a2_folder, a2_data, tmp_path / "full", "--trainable_models", paths, "--save_dtype", "fp32")
    before = load_file(str(a2_folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k.rsplit(".", 1)[0] for k in changed} == SELF_QKV, sorted(changed)


def _a2_eval_loss(a2_folder: Path, cache: Path, lora: Path | None) -> float:
    """Mean training loss over fixed (entry, timestep, noise) draws of the cached clips, the base DiT (+ the LoRA)."""
    from diffusers import AutoModel

    from diffusers_wan_ext.training.modules import load_lora_into

    transformer = AutoModel.from_pretrained(str(a2_folder), subfolder="transformer").float()
    if lora is not None:
        saved = load_file(str(lora / "pytorch_lora_weights.safetensors"))
        add_lora(transformer, 4, 4, sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in saved}),
                 scope="dit")
        load_lora_into(transformer, saved, "trained")
    return fixed_draws_loss(transformer, cache)


def test_lora_lowers_the_loss_and_full_finetuning_saves_a_loadable_folder(a2_folder, a2_data, tmp_path):
    """Issue 22's per-family check for Animate-2: a dozen LoRA steps from the cache lower the loss on fixed draws;
    a full fine-tuning step saves a transformer folder that ``from_pretrained`` loads as the same class."""
    from diffusers import AutoModel

    cache = _train(a2_folder, a2_data, tmp_path / "cache", "--task", "sft:data_process")

    def cached(out: Path, *extra) -> Path:
        return run_training(parse_args([str(a) for a in [
            "--task", "sft:train", "--dataset_base_path", cache, "--model_path", a2_folder, "--height", "16",
            "--width", "16", "--num_frames", "5", "--max_sequence_length", "16", "--dtype", "fp32", "--report_to",
            "none", "--extra_inputs", EXTRA_INPUTS, "--output_path", out, *extra]]))

    # the default targets (q,k,v,o,ffn.0,ffn.2: mapped to Animate-2's module names)
    out = cached(tmp_path / "lora", "--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "5e-2",
                 "--dataset_repeat", "12")
    assert len((out / "logs" / "losses.jsonl").read_text().splitlines()) == 12
    before, after = _a2_eval_loss(a2_folder, cache, None), _a2_eval_loss(a2_folder, cache, out)
    assert after < 0.97 * before, (before, after)  # 1.080 -> 1.031 here (the tiny model's floor is near 1)
    full = cached(tmp_path / "full", "--trainable_models", "dit", "--learning_rate", "1e-3", "--max_train_steps", "1",
                  "--save_dtype", "fp32")
    tuned = AutoModel.from_pretrained(str(full / "transformer"))
    base = AutoModel.from_pretrained(str(a2_folder), subfolder="transformer")
    assert type(tuned) is type(base) is WanAnimate2ExtTransformer3DModel
    a, b = tuned.state_dict(), base.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
