"""The Wan trainer on CPU: tiny models, a tiny dataset of real mp4 / png files written here, real PEFT adapters,
a real ``accelerate launch``, stock Diffusers loading the results."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_wan_ext.demo import make_tiny_dataset, write_video
from diffusers_wan_ext.training import (
    DatasetRowError,
    FlowMatchTrainingSchedule,
    VideoDataset,
    expert_timestep_boundaries,
    parse_args,
    run_training,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "training" / "train.py"
SIZE = ["--height", "32", "--width", "32", "--num_frames", "9"]
COMMON = [*SIZE, "--max_sequence_length", "32", "--dtype", "fp32", "--report_to", "none", "--lora_rank", "4"]

from diffusers_wan_ext.lora import EXPORT_FILE_NAMES, LORA_FORMATS
from helpers import fixed_draws_loss, src_env


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def t2v(converted):
    return converted("t2v")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """2 mp4 clips (9 frames, 32x32) + 1 png, metadata.csv."""
    folder = tmp_path_factory.mktemp("data")
    make_tiny_dataset(folder)
    return folder


@pytest.fixture(scope="module")
def control_data(tmp_path_factory) -> Path:
    """As ``data`` plus control / reference / camera / VACE columns (metadata.csv)."""
    folder = tmp_path_factory.mktemp("control-data")
    meta = make_tiny_dataset(folder, control=True)
    rows = list(csv.DictReader(open(meta)))
    for r in rows:
        r.update(camera_control_direction="Left", vace_video=r["control_video"],
                 vace_reference_image=r["reference_image"])
    with open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


def train(*argv: str) -> Path:
    return run_training(parse_args([str(a) for a in argv]))


def losses(out: Path) -> dict[int, float]:
    lines = (Path(out) / "logs" / "losses.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


@pytest.fixture(scope="module")
def cache(t2v, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache"
    train("--task", "sft:data_process", "--dataset_base_path", data, "--dataset_metadata_path",
          data / "metadata.csv", "--model_path", t2v, *COMMON, "--output_path", out)
    return out


# ------------------------------------------------------------------------------------------- timesteps and loss


def test_schedule_matches_the_reference_formulas():
    s = FlowMatchTrainingSchedule()
    u = 1 - np.arange(1000) / 1000
    sigma = 5 * u / (1 + 4 * u)
    t = 1000 * sigma
    w = np.exp(-2 * ((t - 500) / 1000) ** 2)
    w = (w - w.min()) * 1000 / (w - w.min()).sum()
    np.testing.assert_allclose(s.sigmas.numpy(), sigma, rtol=1e-6)
    np.testing.assert_allclose(s.timesteps.numpy(), t, rtol=1e-6)
    np.testing.assert_allclose(s.weights.numpy(), w, rtol=1e-4, atol=1e-6)
    assert s.weights.argmax() == np.abs(t - 500).argmin()
    # bf16 rounding of t, then sigma / weight at the grid point nearest to the rounded value (first on ties)
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        smp = s.sample(g, timestep_dtype=torch.bfloat16)
        t_b = float(s.timesteps[smp.index].bfloat16())
        k = int(np.argmin(np.abs(s.timesteps.numpy() - t_b)))
        assert float(smp.timestep) == t_b and smp.sigma == float(s.sigmas[k]) and smp.weight == float(s.weights[k])
    # boundaries are index fractions; the Wan2.2 expert split at boundary 0.875 is 0.417 (t >= 875)
    assert expert_timestep_boundaries(0.875, "transformer") == (0.0, 0.417)
    high = FlowMatchTrainingSchedule(max_boundary=0.417)
    idx = [high.sample(g).index for _ in range(200)]
    assert min(idx) >= 0 and max(idx) <= 416 and float(high.timesteps[416]) >= 875 > float(high.timesteps[417])
    with pytest.raises(ValueError, match="0 <= min < max <= 1"):
        FlowMatchTrainingSchedule(min_boundary=0.5, max_boundary=0.5)


# ---------------------------------------------------------------------------------------------------------- data


def test_dataset_reads_mp4_and_png_rows_in_every_metadata_format(data, tmp_path):
    ds = VideoDataset(data, data / "metadata.csv", num_frames=9, height=32, width=32)
    assert len(ds) == 3
    clip, image = ds[0], ds[2]
    assert clip["video"].shape == (9, 32, 32, 3) and clip["video"].dtype == torch.uint8
    assert image["video"].shape == (1, 32, 32, 3)  # an image is a one-frame video
    assert clip["prompt"].startswith("a ")
    for name in ("metadata.json", "metadata.jsonl"):
        make_tiny_dataset(tmp_path / name, metadata=name)
        other = VideoDataset(tmp_path / name, tmp_path / name / name, num_frames=9, height=32, width=32)
        assert torch.equal(other[0]["video"], clip["video"]) and other[1]["prompt"] == ds[1]["prompt"]
    # dynamic resolution: scaled under max_pixels, floored to multiples of 16; crop-resize of a 48x32 clip
    write_video([np.full((32, 48, 3), 0.5)] * 9, tmp_path / "wide" / "v.mp4")
    (tmp_path / "wide" / "m.csv").write_text("video,prompt\nv.mp4,wide\n")
    dyn = VideoDataset(tmp_path / "wide", tmp_path / "wide" / "m.csv", num_frames=5, max_pixels=20 * 30)
    assert dyn[0]["video"].shape == (5, 16, 16, 3)
    assert VideoDataset(tmp_path / "wide", tmp_path / "wide" / "m.csv", num_frames=5,
                        max_pixels=10**6)[0]["video"].shape == (5, 32, 48, 3)


def _bad_dataset(folder: Path, data: Path, kind: str) -> tuple[Path, list[str]]:
    """A copy of ``data`` whose row 1 is bad in one way; returns the metadata and the extra inputs to ask for."""
    shutil.copytree(data, folder)
    rows = list(csv.DictReader(open(folder / "metadata.csv")))
    extra: list[str] = []
    if kind == "missing file":
        rows[1]["video"] = "videos/nope.mp4"
    elif kind == "unreadable video":
        (folder / "videos" / "broken.mp4").write_bytes(b"\x00not a video" * 100)
        rows[1]["video"] = "videos/broken.mp4"
    elif kind == "too few frames":
        write_video([np.zeros((32, 32, 3))] * 5, folder / "videos" / "short.mp4")
        rows[1]["video"] = "videos/short.mp4"
    elif kind == "missing column":
        for i, r in enumerate(rows):
            r["control_video"] = "" if i == 1 else r["video"]
        extra = ["control_video"]
    with open(folder / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder / "metadata.csv", extra


@pytest.mark.parametrize("kind,message", [
    ("missing file", "column 'video': file not found"),
    ("unreadable video", "column 'video': cannot read"),
    ("too few frames", "has 5 frame(s), fewer than --num_frames 9"),
    ("missing column", "column 'control_video' is empty"),
])
def test_bad_rows_raise_an_error_naming_the_row_or_are_skipped_and_counted(data, tmp_path, kind, message):
    meta, extra = _bad_dataset(tmp_path / "d", data, kind)
    kwargs = dict(num_frames=9, height=32, width=32, extra_inputs=extra)
    with pytest.raises(DatasetRowError) as err:
        ds = VideoDataset(tmp_path / "d", meta, **kwargs)
        [ds[i] for i in range(len(ds))]
    assert "metadata.csv row 1 (line 3)" in str(err.value) and message in str(err.value)
    assert "--skip_bad_rows" in str(err.value)
    ds = VideoDataset(tmp_path / "d", meta, skip_bad_rows=True, **kwargs)
    items = [ds[i] for i in range(len(ds))]
    skipped = len(ds.skipped) + sum(len(it["skipped"]) for it in items)
    assert skipped == 1 and all(it["row"] != 1 for it in items)
    if kind == "too few frames":  # DiffSynth-Studio's behaviour on request: cut to 4n+1 frames
        short = VideoDataset(tmp_path / "d", meta, min_num_frames=5, **kwargs)
        assert short[1]["video"].shape[0] == 5


def test_arguments_accept_diffsynth_names_and_reject_bad_combinations():
    base = ["--dataset_base_path", "d", "--dataset_metadata_path", "d/m.csv", "--model_path", "m"]
    args = parse_args(base + ["--lora_base_model", "dit2", "--lora_target_modules", "q,k,v,o,ffn.0,ffn.2",
                              "--fp8_models", "dit,text_encoder", "--num_workers", "2"])
    assert args.lora_base_model == "transformer_2" and args.expert == "transformer_2"
    assert args.lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    assert args.fp8_models == ["transformer", "text_encoder"] and args.dataset_num_workers == 2
    assert parse_args(base + ["--trainable_models", "dit"]).trainable_models == ["transformer"]
    vace = parse_args(base + ["--lora_base_model", "vace2"])
    assert (vace.lora_base_model, vace.lora_scope, vace.expert) == ("transformer_2", "vace", "transformer_2")
    vace = parse_args(base + ["--trainable_models", "vace"])
    assert (vace.trainable_models, vace.trainable_scope) == (["transformer"], "vace")
    for bad in (["--num_frames", "8", "--lora_base_model", "dit"], [],
                ["--trainable_models", "dit,dit2"], ["--trainable_models", "dit", "--fp8_models", "dit"],
                ["--lora_base_model", "vae"]):
        with pytest.raises(SystemExit):
            parse_args(base + bad)


# ------------------------------------------------------------------------------------------------------- training


@pytest.mark.slow  # ~40-60 s on 2 shared cores: accelerate launch + two fresh interpreters
def test_accelerate_launch_trains_a_lora_that_stock_diffusers_loads(t2v, data, tmp_path):
    out = tmp_path / "lora"
    exports = ["--export_format", ",".join(f for f in LORA_FORMATS if f != "diffusers")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", str(TRAIN), "--dataset_base_path", str(data),
           "--dataset_metadata_path", str(data / "metadata.csv"), "--model_path", str(t2v), *COMMON,
           "--lora_base_model", "dit", "--learning_rate", "1e-3", "--max_train_steps", "2", "--output_path", str(out),
           *exports]
    env = src_env(HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(losses(out)) == [1, 2]
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.blocks.") and ".lora_" in k for k in keys)
    assert all((out / EXPORT_FILE_NAMES[f]).is_file() for f in LORA_FORMATS)
    # a fresh interpreter with stock Diffusers only: the LoRA loads and changes the output
    code = f"""
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(t2v)!r}, dtype=torch.float32)
def render():
    return pipe(prompt="a red square", height=32, width=32, num_frames=5, num_inference_steps=2,
                max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0)).frames[0]
a = render()
pipe.load_lora_weights({str(out)!r})
b = render()
assert "diffusers_wan_ext" not in sys.modules
print("DIFF", float(abs(a - b).max()))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    diff = float(res.stdout.split("DIFF")[-1])
    assert diff > 1e-6


@pytest.mark.slow  # four processes start (two runs of two ranks)
def test_two_process_ddp_splits_the_data_and_resumes_exactly(t2v, cache, tmp_path):
    """DDP over two CPU ranks (gloo): each rank takes its share of the clips, the logged loss is the mean over the
    ranks, and a mid-epoch checkpoint resumes both ranks exactly."""
    args = ["--task", "sft:train", "--dataset_base_path", str(cache), "--model_path", str(t2v), *COMMON,
            "--lora_base_model", "dit", "--learning_rate", "1e-3", "--num_epochs", "4",
            "--gradient_accumulation_steps", "3", "--save_steps", "1"]
    env = src_env(HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1")

    def run(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(TRAIN),
               *args, "--output_path", str(out), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return out

    full = run(tmp_path / "full")
    assert sorted(losses(full)) == [1, 2]  # 3 clips -> 2 per rank per epoch, 8 micro-steps / 3 = 2 steps
    state = json.loads((full / "checkpoint-1" / "training_state.json").read_text())
    assert state["world_size"] == 2 and state["progress"] == {"step": 1, "micro_step": 3, "epoch": 1, "position": 1}
    resumed = run(tmp_path / "resumed", "--resume_from_checkpoint", str(full / "checkpoint-1"))
    assert losses(resumed) == {2: losses(full)[2]}


def _eval_loss(t2v: Path, cache: Path, lora: Path | None) -> float:
    """Mean training loss over fixed (entry, timestep, noise) draws, base transformer (+ a trained LoRA)."""
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext.training.modules import add_lora, load_lora_into

    transformer = WanTransformer3DModel.from_pretrained(str(t2v), subfolder="transformer")
    if lora is not None:
        add_lora(transformer, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out"])
        load_lora_into(transformer, load_file(str(lora / "pytorch_lora_weights.safetensors")), "trained")
    return fixed_draws_loss(transformer, cache, seeds=6)


def test_lora_training_lowers_the_loss_and_the_lora_loads_into_stock_diffusers(t2v, cache, tmp_path):
    from diffusers import DiffusionPipeline, WanPipeline

    # the tiny random model's head scales its output down (0.02 weights): give the LoRA the head too
    out = train("--task", "sft:train", "--dataset_base_path", cache, "--model_path", t2v, *COMMON,
                "--lora_base_model", "dit", "--lora_target_modules", "q,k,v,o,ffn.0,ffn.2,proj_out",
                "--learning_rate", "1e-2", "--dataset_repeat", "10", "--output_path", tmp_path / "lora")
    assert len(losses(out)) == 30
    before, after = _eval_loss(t2v, cache, None), _eval_loss(t2v, cache, out)
    assert after < 0.95 * before, (before, after)
    pipe = DiffusionPipeline.from_pretrained(str(t2v), dtype=torch.float32)
    assert type(pipe) is WanPipeline

    def render():
        return pipe(prompt="a red square", height=32, width=32, num_frames=5, num_inference_steps=2,
                    max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0)).frames[0]

    plain = render()
    pipe.load_lora_weights(str(out))
    assert float(np.abs(render() - plain).max()) > 1e-4
    # the validation script renders with it
    import importlib.util

    spec = importlib.util.spec_from_file_location("validate", ROOT / "examples" / "training" / "validate.py")
    validate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(validate)
    video = validate.main(["--model_path", str(t2v), "--lora", str(out), "--prompt", "a red square", "--height",
                           "32", "--width", "32", "--num_frames", "5", "--num_inference_steps", "2",
                           "--max_sequence_length", "32", "--dtype", "fp32", "--device", "cpu", "--output",
                           str(tmp_path / "v.mp4")])
    assert video.stat().st_size > 0


def test_cache_mode_gives_the_losses_of_online_training(t2v, data, cache, tmp_path):
    args = ["--model_path", t2v, *COMMON, "--lora_base_model", "dit", "--max_train_steps", "3", "--seed", "7"]
    online = train("--dataset_base_path", data, "--dataset_metadata_path", data / "metadata.csv", *args,
                   "--output_path", tmp_path / "online")
    cached = train("--task", "sft:train", "--dataset_base_path", cache, *args, "--output_path", tmp_path / "cached")
    assert losses(online) == losses(cached) and len(losses(online)) == 3
    a = load_file(str(online / "pytorch_lora_weights.safetensors"))
    b = load_file(str(cached / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in cache.glob("0/*.safetensors")) == [f"{i:08d}.safetensors" for i in range(3)]


def test_resume_from_a_checkpoint_reproduces_the_next_losses_exactly(t2v, cache, tmp_path):
    args = ["--task", "sft:train", "--dataset_base_path", cache, "--model_path", t2v, *COMMON,
            "--lora_base_model", "dit", "--learning_rate", "1e-3", "--num_epochs", "3",
            "--gradient_accumulation_steps", "2", "--save_steps", "2", "--lr_scheduler", "cosine",
            "--lr_warmup_steps", "1"]
    full = train(*args, "--output_path", tmp_path / "full")
    assert sorted(losses(full)) == [1, 2, 3, 4]
    state = json.loads((full / "checkpoint-2" / "training_state.json").read_text())["progress"]
    assert state == {"step": 2, "micro_step": 4, "epoch": 1, "position": 1}  # mid-epoch
    resumed = train(*args, "--output_path", tmp_path / "resumed", "--resume_from_checkpoint", full / "checkpoint-2")
    assert losses(resumed) == {k: v for k, v in losses(full).items() if k > 2}
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exported_formats_continue_training_with_the_same_lora(t2v, cache, tmp_path):
    """--export_format writes every layout; --lora_checkpoint reads any of them back into an adapter that applies the
    same delta (rank 4, alpha 8: the PEFT scale 2 is folded into the saved factors and undone on load)."""
    from diffusers_wan_ext.training.trainer import WanTrainer

    args = ["--task", "sft:train", "--dataset_base_path", cache, "--model_path", t2v, *COMMON, "--lora_alpha", "8",
            "--lora_base_model", "dit", "--learning_rate", "1e-2", "--max_train_steps", "2"]
    out = train(*args, "--export_format", "original,kohya,diffsynth", "--save_steps", "2", "--output_path",
                tmp_path / "a")
    trained = load_file(str(out / "pytorch_lora_weights.safetensors"))
    name = "transformer.blocks.0.attn1.to_q"
    delta = trained[f"{name}.lora_B.weight"] @ trained[f"{name}.lora_A.weight"]
    raw = load_file(str(out / "checkpoint-2" / "trainable_weights.safetensors"))  # the adapter's own factors
    raw_delta = 2.0 * raw[f"{name}.lora_B.default.weight"] @ raw[f"{name}.lora_A.default.weight"]
    assert delta.abs().max() > 0
    torch.testing.assert_close(delta, raw_delta, rtol=1e-5, atol=1e-7)
    for fmt in LORA_FORMATS:
        ckpt = out / EXPORT_FILE_NAMES[fmt]
        trainer = WanTrainer(parse_args([str(a) for a in args] + ["--lora_checkpoint", str(ckpt), "--output_path",
                                                                  str(tmp_path / fmt)]))
        q = trainer.module.transformer.blocks[0].attn1.to_q
        again = q.scaling["default"] * q.lora_B["default"].weight @ q.lora_A["default"].weight
        torch.testing.assert_close(again, delta, rtol=1e-5, atol=1e-7, msg=fmt)


def test_gradient_checkpointing_and_its_offload_do_not_change_the_losses(t2v, cache, tmp_path):
    args = ["--task", "sft:train", "--dataset_base_path", cache, "--model_path", t2v, *COMMON,
            "--lora_base_model", "dit", "--learning_rate", "1e-3", "--max_train_steps", "2"]
    plain = losses(train(*args, "--output_path", tmp_path / "plain"))
    assert losses(train(*args, "--use_gradient_checkpointing", "--output_path", tmp_path / "gc")) == plain
    assert losses(train(*args, "--use_gradient_checkpointing_offload", "--output_path", tmp_path / "off")) == plain


def test_full_finetuning_saves_a_loadable_transformer_folder(t2v, cache, tmp_path):
    from diffusers import DiffusionPipeline, WanTransformer3DModel

    out = train("--task", "sft:train", "--dataset_base_path", cache, "--model_path", t2v, *COMMON,
                "--trainable_models", "dit", "--learning_rate", "1e-3", "--max_train_steps", "2",
                "--output_path", tmp_path / "full")
    tuned = WanTransformer3DModel.from_pretrained(str(out / "transformer"))
    base = WanTransformer3DModel.from_pretrained(str(t2v), subfolder="transformer")
    stored = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert stored["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16  # --save_dtype
    assert stored["scale_shift_table"].dtype == torch.float32  # Diffusers' _keep_in_fp32_modules
    a, b = tuned.state_dict(), base.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k].float(), b[k].bfloat16().float()) for k in a)
    pipe = DiffusionPipeline.from_pretrained(str(t2v), transformer=tuned.float(), dtype=torch.float32)
    frames = pipe(prompt="x", height=32, width=32, num_frames=5, num_inference_steps=1, max_sequence_length=32,
                  output_type="np").frames[0]
    assert np.isfinite(frames).all()


def test_fp8_storage_of_frozen_weights(t2v, data, tmp_path):
    from diffusers_wan_ext.training.trainer import WanTrainer

    args = parse_args(["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
                       "--model_path", str(t2v), *COMMON, "--lora_base_model", "dit", "--max_train_steps", "1",
                       "--fp8_models", "dit,text_encoder", "--output_path", str(tmp_path / "fp8")])
    trainer = WanTrainer(args)
    q = trainer.module.transformer.blocks[0].attn1.to_q
    assert q.base_layer.parametrizations.weight.original.dtype == torch.float8_e4m3fn
    assert q.lora_A["default"].weight.dtype == torch.float32 and q.lora_A["default"].weight.requires_grad
    trainer.train()
    assert math.isfinite(losses(tmp_path / "fp8")[1])


def test_two_expert_model_trains_one_expert_with_its_timesteps(converted, data, tmp_path):
    from diffusers import DiffusionPipeline

    from diffusers_wan_ext.training.trainer import WanTrainer

    folder = converted("t2v", experts=2)
    args = parse_args(["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
                       "--model_path", str(folder), *COMMON, "--lora_base_model", "dit2", "--max_train_steps", "1",
                       "--output_path", str(tmp_path / "low")])
    trainer = WanTrainer(args)
    assert trainer.schedule.index_range == (417, 1000)  # boundary_ratio 0.875: the low-noise expert's t < 875
    out = trainer.train()
    assert all(k.startswith("transformer_2.blocks.") for k in load_file(str(out / "pytorch_lora_weights.safetensors")))
    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights_transformer_2.safetensors",
                           load_into_transformer_2=True)
    assert pipe.transformer_2.peft_config and not getattr(pipe.transformer, "peft_config", None)


@pytest.mark.parametrize("arch,extra,base,size", [
    ("i2v", "input_image", "dit", 32),
    ("fun-control-ref", "control_video,reference_image,input_image", "dit", 32),
    ("fun-camera", "input_image,camera_control_direction", "dit", 32),
    ("vace", "vace_video,vace_reference_image", "vace", 32),
    ("ti2v", "input_image", "dit", 64),
])
def test_conditioning_variants_train_through_the_pipelines_conditioning(converted, control_data, tmp_path, arch,
                                                                        extra, base, size):
    folder = converted(arch)
    out = train("--dataset_base_path", control_data, "--dataset_metadata_path", control_data / "metadata.csv",
                "--model_path", folder, "--height", size, "--width", size, "--num_frames", "9",
                "--max_sequence_length", "32", "--dtype", "fp32", "--report_to", "none", "--lora_rank", "4",
                "--lora_base_model", base, "--extra_inputs", extra, "--max_train_steps", "2",
                "--output_path", tmp_path / "out")
    assert all(math.isfinite(v) for v in losses(out).values())
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    prefix = "transformer.vace_blocks." if base == "vace" else "transformer.blocks."
    assert keys and all(k.startswith(prefix) for k in keys)


def test_missing_conditioning_input_is_named(converted, control_data, tmp_path):
    with pytest.raises(ValueError, match="needs --extra_inputs control_video"):
        train("--dataset_base_path", control_data, "--dataset_metadata_path", control_data / "metadata.csv",
              "--model_path", converted("fun-control-ref"), *COMMON, "--lora_base_model", "dit",
              "--output_path", tmp_path / "x")


def test_original_release_files_give_the_cache_of_the_converted_folder(tiny_release, t2v, data, cache, tmp_path):
    out = train("--task", "sft:data_process", "--dataset_base_path", data, "--dataset_metadata_path",
                data / "metadata.csv", "--model_path", tiny_release("t2v"), *COMMON, "--output_path", tmp_path / "c")
    for entry in sorted(cache.glob("0/*.safetensors")):
        a, b = load_file(str(entry)), load_file(str(out / "0" / entry.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bench_train_tiny_smoke(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(tmp_path))
    rows = bench.main(["--tiny", "--variants", "lora,lora-fp8,lora-offload"])
    result = json.loads((tmp_path / "bench_train.json").read_text())
    assert result["runs"] == rows and len(rows) == 3
    assert all(r["seconds_per_step"] > 0 and r["losses_finite"] for r in rows)
