"""DiffSynth-Studio's training modes in our trainer: direct distillation (``--task direct_distill`` and its split
stages), layer-level CPU offload training, quantized frozen bases (bitsandbytes / torchao where installed, GGUF /
fp8 single files) and ``--model_id_with_origin_paths``; each keeps resume exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from diffusers_wan_ext.demo import make_tiny_dataset
from diffusers_wan_ext.training import parse_args, run_training
from diffusers_wan_ext.training.dataset import ResumableSampler
from diffusers_wan_ext.training.distill import DistillSettings, direct_distill_loss
from diffusers_wan_ext.training.inputs import ModelInputs
from diffusers_wan_ext.training.modules import WanTrainingModule
from diffusers_wan_ext.training.offload import LayerOffloadManager
from diffusers_wan_ext.training.quantized_base import quant_package_missing
from diffusers_wan_ext.training.trainer import CachedDataset, WanTrainer

from helpers import edit_metadata_rows

COMMON = ["--height", "32", "--width", "32", "--num_frames", "9", "--max_sequence_length", "32", "--dtype", "fp32",
          "--report_to", "none", "--lora_rank", "4", "--learning_rate", "1e-3"]
DISTILL_COLUMNS = "seed,rand_device,num_inference_steps,cfg_scale"


@pytest.fixture(scope="module")
def t2v(converted):
    return converted("t2v")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("modes-data")
    make_tiny_dataset(folder)
    return folder


@pytest.fixture(scope="module")
def distill_data(tmp_path_factory) -> Path:
    """The tiny clips as a teacher's samples: DiffSynth-Studio's distillation columns added (2 student steps)."""
    folder = tmp_path_factory.mktemp("distill-data")
    meta = make_tiny_dataset(folder)
    edit_metadata_rows(meta, lambda i, row: row.update(seed=str(11 + i), rand_device="cpu", num_inference_steps="2",
                                                       cfg_scale="5"))
    return folder


@pytest.fixture(scope="module")
def cache(t2v, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("modes-cache") / "cache"
    run_training(parse_args(run_args(t2v, data, out, "--task", "sft:data_process")))
    return out


@pytest.fixture(scope="module")
def plain(t2v, cache, tmp_path_factory) -> Path:
    """A plain 3-step LoRA run from the cache, a checkpoint per step."""
    out = tmp_path_factory.mktemp("modes-plain") / "plain"
    run_training(parse_args(cached_args(t2v, cache, out, "--max_train_steps", "3", "--save_steps", "1")))
    return out


def cached_args(model: Path, cache: Path, out: Path, *extra, lora: bool = True) -> list[str]:
    return ["--dataset_base_path", str(cache), "--model_path", str(model), *COMMON,
            *(["--lora_base_model", "dit"] if lora else []), "--task", "sft:train", "--output_path", str(out),
            *[str(a) for a in extra]]


def run_args(model: Path, data: Path, out: Path, *extra) -> list[str]:
    return ["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
            "--model_path", str(model), *COMMON, "--lora_base_model", "dit", "--output_path", str(out),
            *[str(a) for a in extra]]


def distill_args(model: Path, data: Path, out: Path, *extra) -> list[str]:
    return run_args(model, data, out, "--task", "direct_distill", "--extra_inputs", DISTILL_COLUMNS,
                    "--dataset_repeat", "2", *extra)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "logs" / "losses.jsonl").read_text().splitlines()]


def tiny_transformer(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2).eval()


def velocity(model, x, t, context):
    return model(x, torch.tensor([t], dtype=torch.float32), context, return_dict=False)[0]


# -------------------------------------------------------------------------------------------- direct distillation


def test_direct_distill_loss_follows_the_reference_formula_on_a_tiny_teacher_student_pair():
    """DiffSynth-Studio's ``DirectDistillLoss``: the student samples the row's seeded noise in N Euler steps on the
    shifted Wan grid (gradients through every step) and is compared with the teacher's many-step CFG sample."""
    teacher, student = tiny_transformer(1), tiny_transformer(2)
    g = torch.Generator().manual_seed(0)
    context, negative = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    shape = (1, 4, 3, 4, 4)
    seed = 7

    def euler(model, x, steps, cfg):
        sig = [5 * u / (1 + 4 * u) for u in (1 - i / steps for i in range(steps))] + [0.0]
        for i in range(steps):
            v = velocity(model, x, 1000 * sig[i], context)
            if cfg != 1:
                v = velocity(model, x, 1000 * sig[i], negative) + cfg * (v - velocity(model, x, 1000 * sig[i], negative))
            x = x + v * (sig[i + 1] - sig[i])
        return x

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # what the teacher produces: its 8-step, guided sample of the same noise
        target = euler(teacher, noise, 8, 4.0)
    inputs = ModelInputs(latents=target, prompt_embeds=context)
    module = WanTrainingModule(student)
    settings = DistillSettings(num_inference_steps=2, seed=seed, rand_device="cpu", cfg_scale=4.0)
    loss = direct_distill_loss(module, inputs, settings, torch.Generator().manual_seed(99), torch.float32)
    # independently: sigmas 1 and 5*0.5/(1+4*0.5) = 5/6, then 0; no guidance for the student, plain MSE
    x1 = noise + velocity(student, noise, 1000.0, context) * (5 / 6 - 1)
    x2 = x1 + velocity(student, x1, 1000 * 5 / 6, context) * (0 - 5 / 6)
    expected = ((x2 - target) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert float(loss.detach()) > 0
    # the gradient goes through both student steps: the same as the formula's
    student.requires_grad_(True)
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    loss2 = direct_distill_loss(module, inputs, settings, torch.Generator(), torch.float32)
    x1 = noise + velocity(student, noise, 1000.0, context) * (5 / 6 - 1)
    x2 = x1 + velocity(student, x1, 1000 * 5 / 6, context) * (0 - 5 / 6)
    ref = torch.autograd.grad(((x2 - target) ** 2).mean(), list(student.parameters()), allow_unused=True)
    assert float(loss2.detach()) == float(loss.detach())
    for a, b in zip(grads, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # a student that is the teacher, sampled as the teacher sampled (same steps, no guidance), has nothing to learn
    with torch.no_grad():
        own = euler(teacher, noise, 3, 1.0)
    zero = direct_distill_loss(WanTrainingModule(teacher), ModelInputs(latents=own, prompt_embeds=context),
                               DistillSettings(num_inference_steps=3, seed=seed), torch.Generator(), torch.float32)
    assert float(zero.detach()) < 1e-10  # float32 vs float64 grid points only


def test_direct_distill_trains_resumes_exactly_and_its_split_stages_give_the_same_losses(t2v, distill_data, tmp_path):
    whole = tmp_path / "whole"
    trainer = WanTrainer(parse_args(distill_args(t2v, distill_data, whole, "--max_train_steps", "4",
                                                 "--save_steps", "2")))
    base = trainer.module.transformer  # the LoRA starts at zero: step 1's loss is the base model's
    trainer.train()
    full = losses(whole)
    assert len(full) == 4 and all(v > 0 for v in full)

    # the split stages: cache (with each row's sampling settings), then train from the cache
    cache = tmp_path / "cache"
    run_training(parse_args(distill_args(t2v, distill_data, cache, "--task", "direct_distill:data_process")))
    entries = CachedDataset(cache)
    assert all("distill" in entries[i] for i in range(len(entries)))
    split = tmp_path / "split"
    run_training(parse_args(["--dataset_base_path", str(cache), "--model_path", str(t2v), *COMMON,
                             "--lora_base_model", "dit", "--output_path", str(split), "--task", "direct_distill:train",
                             "--max_train_steps", "4", "--dataset_repeat", "2"]))
    assert losses(split) == pytest.approx(full, rel=1e-5, abs=1e-7)
    # the student's steps through offloaded layers and gradient checkpointing: the same losses
    offload = tmp_path / "split-offload"
    run_training(parse_args(["--dataset_base_path", str(cache), "--model_path", str(t2v), *COMMON,
                             "--lora_base_model", "dit", "--output_path", str(offload), "--task", "direct_distill:train",
                             "--max_train_steps", "2", "--dataset_repeat", "2", "--enable_model_cpu_offload",
                             "--enable_optimizer_cpu_offload", "--use_gradient_checkpointing"]))
    assert losses(offload) == losses(split)[:2]

    # step 1 from the formula, on the cached inputs of the row the sampler draws first
    first = ResumableSampler(2 * len(entries), shuffle=True, seed=0).epoch_indices(0)[0]
    sample = entries[first % len(entries)]
    settings = DistillSettings.from_json(sample["distill"])
    assert settings == DistillSettings(num_inference_steps=2, seed=11 + sample["row"], rand_device="cpu",
                                       cfg_scale=5.0)
    x0 = sample["cached"]["latents"]
    context = sample["cached"]["prompt_embeds"]
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(settings.seed))
    base.disable_adapters()  # the base weights: what the zero-initialized LoRA computed at step 1
    with torch.no_grad():
        for s, s_next in ((1.0, 5 / 6), (5 / 6, 0.0)):
            v = base(x, torch.tensor([1000 * s]), context, return_dict=False)[0]
            x = x + v * (s_next - s)
    assert full[0] == pytest.approx(float(((x - x0) ** 2).mean()), rel=1e-4)

    # resume from checkpoint-2: the last two losses again, exactly
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    run_training(parse_args(distill_args(t2v, distill_data, resumed, "--max_train_steps", "4", "--save_steps", "2",
                                         "--resume_from_checkpoint", "latest")))
    assert losses(resumed) == full[2:]


def test_direct_distill_arguments_and_rows_are_checked_before_loading(t2v, data, distill_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(run_args(t2v, distill_data, tmp_path / "o", "--task", "direct_distill", "--extra_inputs", "seed"))
    assert "add num_inference_steps to --extra_inputs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(run_args(t2v, distill_data, tmp_path / "o", "--extra_inputs", DISTILL_COLUMNS))
    assert "columns of --task direct_distill" in capsys.readouterr().err
    # a bad value names the file's row and column, before any model loads (the model path does not exist)
    bad = tmp_path / "bad"
    shutil.copytree(distill_data, bad)
    edit_metadata_rows(bad / "metadata.csv", lambda i, row: row.update(num_inference_steps="two") if i == 1 else None)
    named = r"metadata.csv row 1 \(line 3\): column 'num_inference_steps' must be an integer"
    with pytest.raises(ValueError, match=named):
        WanTrainer(parse_args(distill_args(tmp_path / "no-model", bad, tmp_path / "o")))
    # an sft cache has no sampling settings: direct_distill:train names an entry
    cache = tmp_path / "sft-cache"
    run_training(parse_args(run_args(t2v, data, cache, "--task", "sft:data_process")))
    with pytest.raises(ValueError, match="without direct-distillation settings"):
        WanTrainer(parse_args(["--dataset_base_path", str(cache), "--model_path", str(t2v), *COMMON,
                               "--lora_base_model", "dit", "--output_path", str(tmp_path / "o"),
                               "--task", "direct_distill:train"]))


# ------------------------------------------------------------------------------------------------ layer offload


@pytest.mark.parametrize("flags", [["--enable_model_cpu_offload"],
                                   ["--enable_model_cpu_offload", "--enable_optimizer_cpu_offload"]],
                         ids=["model", "model+optimizer"])
def test_layer_offload_gives_the_plain_losses_and_resumes_exactly(t2v, cache, plain, tmp_path, flags):
    out = tmp_path / "offload"
    trainer = WanTrainer(parse_args(cached_args(t2v, cache, out, "--max_train_steps", "3", "--save_steps", "1",
                                                "--use_gradient_checkpointing", *flags)))
    seen = []
    probe = trainer.module.transformer.blocks[0].attn1.to_q.base_layer  # a frozen unit under a LoRA
    forward = probe.forward

    def during_forward(x):  # runs after the manager's pre-hook: a fresh copy, not the CPU weight
        seen.append(probe.weight.data_ptr() != trainer.offload.frozen[id(probe.weight)].data_ptr())
        return forward(x)

    probe.forward = during_forward
    trainer.train()
    manager = trainer.offload
    assert manager is not None and manager.optimizer_on_cpu == ("--enable_optimizer_cpu_offload" in flags)
    assert probe in manager.units and all(unit._forward_pre_hooks for unit in manager.units)
    assert all(unit._backward_pre_hooks for unit in manager.units)
    assert seen and all(seen)
    assert manager.onloads > 2 * 3 * len(manager.units) // 2  # forward and backward of most units, every step
    module = trainer.module
    assert module is trainer._unwrapped()  # not wrapped: the hooks place the weights
    frozen = [p for p in module.parameters() if id(p) in manager.frozen]
    assert frozen and all(p.data_ptr() == manager.frozen[id(p)].data_ptr() for p in frozen)  # back to the CPU copy
    states = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    assert states and all(t.device.type == "cpu" for t in states)
    assert losses(out) == losses(plain)
    # resuming the plain run's checkpoint with offload continues with its losses, exactly
    resumed = tmp_path / "resumed"
    shutil.copytree(plain / "checkpoint-1", resumed / "checkpoint-1")
    run_training(parse_args(cached_args(t2v, cache, resumed, "--max_train_steps", "3", "--save_steps", "1",
                                        "--resume_from_checkpoint", "latest", *flags)))
    assert losses(resumed) == losses(plain)[1:]


def test_optimizer_offload_needs_model_offload(t2v, data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(run_args(t2v, data, tmp_path / "o", "--enable_optimizer_cpu_offload"))
    assert "pass both" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ quantized frozen bases


@pytest.fixture(scope="module")
def quantized_dits(tiny_release, tmp_path_factory) -> Path:
    """The tiny release's DiT as a Q8_0 GGUF file (the real ``gguf`` writer) and as an fp8 safetensors file."""
    from safetensors.torch import load_file, save_file

    from diffusers_wan_ext.utils.gguf_files import write_gguf

    folder = tmp_path_factory.mktemp("quantized-dits")
    sd = load_file(str(Path(tiny_release("t2v")) / "diffusion_pytorch_model.safetensors"))
    stored = write_gguf(folder / "dit-Q8_0.gguf", sd, "Q8_0")
    assert stored["blocks.0.ffn.2.weight"] == "Q8_0"
    save_file({k: v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and v.ndim == 2 else v for k, v in sd.items()},
              str(folder / "dit-fp8.safetensors"))
    return folder


@pytest.mark.parametrize("kind", ["gguf", "fp8"])
def test_lora_trains_on_a_base_that_stays_quantized_and_resumes_exactly(t2v, cache, plain, quantized_dits, tmp_path,
                                                                       kind):
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from diffusers_wan_ext.models.quantized_linear import Fp8Linear

    path = quantized_dits / ("dit-Q8_0.gguf" if kind == "gguf" else "dit-fp8.safetensors")
    out = tmp_path / kind
    trainer = WanTrainer(parse_args(cached_args(t2v, cache, out, "--transformer_path", path, "--max_train_steps", "3",
                                                "--save_steps", "1")))
    layer = trainer.module.transformer.blocks[0].ffn.net[2]
    assert hasattr(layer, "lora_A")  # PEFT wrapped the quantized layer
    base = layer.base_layer
    if kind == "gguf":
        assert isinstance(base, GGUFLinear) and base.weight.dtype == torch.uint8
        assert base.weight.quant_type.name == "Q8_0"
    else:
        assert isinstance(base, Fp8Linear) and base.weight.dtype == torch.float8_e4m3fn
    packed = base.weight.detach().clone()
    trainer.train()
    assert base.weight.dtype == packed.dtype and torch.equal(base.weight.detach(), packed)  # never dequantized
    assert losses(out) == pytest.approx(losses(plain), rel=5e-2)  # 8-bit weights: about the plain run's losses
    saved = load_file_keys(out / "pytorch_lora_weights.safetensors")
    assert "transformer.blocks.0.ffn.net.2.lora_A.weight" in saved
    resumed = tmp_path / f"{kind}-resumed"
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    run_training(parse_args(cached_args(t2v, cache, resumed, "--transformer_path", path, "--max_train_steps", "3",
                                        "--save_steps", "1", "--resume_from_checkpoint", "latest")))
    assert losses(resumed) == losses(out)[1:]


def load_file_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_a_quantized_base_refuses_fp8_storage_and_a_preset(t2v, cache, quantized_dits, tmp_path):
    path = quantized_dits / "dit-Q8_0.gguf"
    with pytest.raises(ValueError, match="quantized already; leave --fp8_models"):
        WanTrainer(parse_args(cached_args(t2v, cache, tmp_path / "o", "--transformer_path", path, "--fp8_models",
                                          "dit")))
    with pytest.raises(ValueError, match="a preset LoRA cannot be fused into quantized weights"):
        WanTrainer(parse_args(cached_args(t2v, cache, tmp_path / "o", "--transformer_path", path,
                                          "--preset_lora_path", path)))


QUANT_METHODS = ["bitsandbytes_nf4", "bitsandbytes_fp4", "bitsandbytes_int8", "torchao_int8_w8a16"]


def quantized_storage(layer: torch.nn.Module) -> str | None:
    """How a Linear layer's frozen weight is stored: ``nf4`` / ``fp4`` / ``int8`` (bitsandbytes), ``torchao``, or
    ``None`` for a plain floating-point weight."""
    weight = layer.weight
    if type(weight).__module__.startswith("torchao"):
        return "torchao"
    if type(weight).__name__ == "Params4bit":
        return weight.quant_state.quant_type if weight.bnb_quantized else None
    if type(weight).__name__ == "Int8Params":
        return "int8" if weight.dtype == torch.int8 else None
    return None


def fixed_draw_loss(module: torch.nn.Module, cache: Path) -> float:
    """The mean training loss of ``module`` over fixed (entry, timestep, noise) draws of the cache."""
    from diffusers_wan_ext.training import FlowMatchTrainingSchedule
    from diffusers_wan_ext.training.modules import training_loss

    schedule, ds, total = FlowMatchTrainingSchedule(min_boundary=0.2, max_boundary=0.8), CachedDataset(cache), []
    with torch.no_grad():
        for i in range(len(ds)):
            inputs = ModelInputs.from_tensors(ds[i]["cached"])
            for seed in range(2):
                loss, sample = training_loss(module, inputs, schedule, torch.Generator().manual_seed(seed),
                                             torch.float32)
                total.append(float(loss) / sample.weight)
    return sum(total) / len(total)


def skip_unless_installed(method: str, args: list[str], capsys) -> None:
    """Not installed: ``parse_args`` stops with one line naming the package (before any model loads), then skip."""
    package = method.split("_")[0]
    if quant_package_missing(method):
        with pytest.raises(SystemExit):
            parse_args(args)
        assert f"{package} is not installed" in capsys.readouterr().err
        pytest.skip(f"{package} is not installed: the {method} path is not exercised here")


def test_an_old_bitsandbytes_counts_as_missing_without_cuda(monkeypatch):
    """bitsandbytes 0.46 has no CPU fp4: without CUDA the methods ask for 0.47 (named in the argument error)."""
    from diffusers_wan_ext.training import quantized_base

    monkeypatch.setattr(quantized_base, "is_bitsandbytes_available", lambda: True)
    monkeypatch.setattr(quantized_base.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(quantized_base, "version", lambda name: "0.46.1")
    assert quant_package_missing("bitsandbytes_fp4") == "bitsandbytes>=0.47"
    monkeypatch.setattr(quantized_base, "version", lambda name: "0.47.0")
    assert quant_package_missing("bitsandbytes_fp4") is None
    monkeypatch.setattr(quantized_base.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(quantized_base, "version", lambda name: "0.43.0")
    assert quant_package_missing("bitsandbytes_nf4") is None


@pytest.mark.parametrize("method", QUANT_METHODS)
def test_quantize_frozen_linears_keeps_the_forward(method):
    """The frozen block Linears (an excluded name left alone, nothing outside the blocks) are stored quantized on
    CPU; the forward stays close to the plain one and gradients reach the input."""
    from diffusers_wan_ext.training.quantized_base import QuantOption, quantize_frozen_linears

    if quant_package_missing(method):
        pytest.skip(f"{method.split('_')[0]} is not installed")
    plain, model = tiny_transformer(0), tiny_transformer(0).requires_grad_(False)
    blocks = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.startswith("blocks.")]
    n = quantize_frozen_linears(model, QuantOption("dit", method, ("ffn",)), torch.float32, "cpu")
    kind = {"bitsandbytes_nf4": "nf4", "bitsandbytes_fp4": "fp4"}.get(method, method.split("_")[1]
                                                                      if "bitsandbytes" in method else "torchao")
    stored = {name: quantized_storage(model.get_submodule(name)) for name in blocks}
    assert n == sum(".ffn." not in name for name in blocks) > 0
    assert all(v == (None if ".ffn." in name else kind) for name, v in stored.items()), stored
    assert quantized_storage(model.proj_out) is None and type(model.proj_out) is torch.nn.Linear
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)
    kwargs = dict(timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 8, 32, generator=g))
    with torch.no_grad():
        want = plain(x, **kwargs).sample
    x.requires_grad_(True)
    got = model(x, **kwargs).sample
    error = float((got.detach().float() - want).norm() / want.norm())
    assert 0 < error < (0.2 if kind in ("nf4", "fp4") else 0.05), error  # the quantized weights are used
    got.float().square().mean().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


@pytest.mark.parametrize("method", ["bitsandbytes_nf4", "bitsandbytes_int8", "torchao_int8_w8a16"])
def test_quant_options_lora_trains_on_the_quantized_base(t2v, cache, tmp_path, method, capsys):
    """LoRA training on a bitsandbytes / torchao base (CPU): the base stays quantized, the loss on fixed draws
    drops, and the saved LoRA loads into the plain pipeline, lowers its loss there too and changes its output."""
    from diffusers import DiffusionPipeline

    out = tmp_path / method
    args = cached_args(t2v, cache, out, "--quant_options", f"dit:{method}", "--dataset_repeat", "2",
                       "--max_train_steps", "4", "--learning_rate", "1e-1")
    skip_unless_installed(method, args, capsys)
    trainer = WanTrainer(parse_args(args))
    layer = trainer.module.transformer.blocks[0].attn1.to_q
    assert quantized_storage(layer.base_layer) is not None and layer.lora_A["default"].weight.requires_grad
    before = fixed_draw_loss(trainer.module, cache)
    trainer.train()
    assert quantized_storage(layer.base_layer) is not None  # still quantized after the run
    assert fixed_draw_loss(trainer.module, cache) < 0.97 * before
    pipe = DiffusionPipeline.from_pretrained(str(t2v), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    plain_loss = fixed_draw_loss(WanTrainingModule(pipe.transformer), cache)
    render = dict(prompt="a red square", height=32, width=32, num_frames=5, num_inference_steps=1,
                  max_sequence_length=32, output_type="np")
    plain = pipe(generator=torch.Generator().manual_seed(0), **render).frames[0]
    pipe.load_lora_weights(str(out))
    assert fixed_draw_loss(WanTrainingModule(pipe.transformer), cache) < 0.97 * plain_loss
    with_lora = pipe(generator=torch.Generator().manual_seed(0), **render).frames[0]
    assert float(abs(with_lora - plain).max()) > 1e-4


def test_quant_options_syntax_is_checked(t2v, cache, tmp_path, capsys):
    for value, message in (("dit", "expected <model>:<method>"), ("dit:gptq", "unknown method 'gptq'"),
                           ("dit2:bitsandbytes_nf4", "LoRA training of the trained model")):
        with pytest.raises(SystemExit):
            parse_args(cached_args(t2v, cache, tmp_path / "o", "--quant_options", value))
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- component spellings

def test_a_familys_component_spellings_are_its_own(t2v, data, tmp_path, capsys):
    """MOVA declares DiffSynth-Studio's ``video_dit`` / ``video_dit2`` (``ModelFamily.training_component_aliases``);
    a Wan model given one is refused in one line naming the accepted components, before anything is written."""
    from diffusers_wan_ext.families import FAMILIES
    from diffusers_wan_ext.training import main as train_main

    declared = {f.name: f.training_component_aliases for f in FAMILIES if f.training_component_aliases}
    assert declared == {"mova": {"video_dit": "transformer", "video_dit2": "transformer_2"}}
    for option in ("--lora_base_model", "--trainable_models"):
        out = tmp_path / option.strip("-")
        with pytest.raises(SystemExit) as e:
            train_main(run_args(t2v, data, out, option, "video_dit2"))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert (f"{option}: unknown or unsupported component 'video_dit2' ('video_dit2' is MOVA's name of "
                f"transformer_2); accepted: ") in err, err
        accepted = err.split("accepted: ")[1].strip().split(", ")
        assert {"dit2", "transformer_2"} <= set(accepted) and not any("video" in a for a in accepted), err
        assert not out.exists()


# ----------------------------------------------------------------------------------- model_id_with_origin_paths

WAN_IDS = ("Wan-AI/Wan2.1-T2V-1.3B:diffusion_pytorch_model*.safetensors,"
           "Wan-AI/Wan2.1-T2V-1.3B:models_t5_umt5-xxl-enc-bf16.pth,Wan-AI/Wan2.1-T2V-1.3B:Wan2.1_VAE.pth")


def id_args(cache: Path, out: Path, ids: str, *extra) -> list[str]:
    return ["--dataset_base_path", str(cache), *COMMON, "--lora_base_model", "dit", "--task", "sft:train",
            "--output_path", str(out), "--model_id_with_origin_paths", ids, *[str(a) for a in extra]]


def test_model_id_with_origin_paths_resolves_local_folders_and_the_hub_cache(tiny_release, cache, plain, tmp_path,
                                                                            monkeypatch, capsys):
    import huggingface_hub

    release = Path(tiny_release("t2v"))
    base = tmp_path / "diffsynth-models"
    shutil.copytree(release, base / "Wan-AI" / "Wan2.1-T2V-1.3B")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    out = tmp_path / "ids"
    args = parse_args(id_args(cache, out, WAN_IDS, "--max_train_steps", "1"))
    assert Path(args.model_path) == base / "Wan-AI" / "Wan2.1-T2V-1.3B" and args.transformer_path is None
    run_training(args)  # the release the ids name: the plain run's first loss (same weights, same cache)
    assert losses(out) == pytest.approx(losses(plain)[:1], rel=1e-5)

    # a DiT of another model id, found in the hub cache (a snapshot already there; nothing is downloaded)
    hub = tmp_path / "hub"
    repo = hub / "models--Org--Wan-FineTune"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copy(release / "diffusion_pytorch_model.safetensors", repo / "snapshots" / "0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    ids = WAN_IDS.replace("Wan-AI/Wan2.1-T2V-1.3B:diffusion", "Org/Wan-FineTune:diffusion")
    args = parse_args(id_args(cache, tmp_path / "o", ids))
    assert Path(args.model_path) == base / "Wan-AI" / "Wan2.1-T2V-1.3B"
    assert Path(args.transformer_path) == repo / "snapshots" / "0123abcd" / "diffusion_pytorch_model.safetensors"

    for bad, message in (("Nobody/Absent:Wan2.1_VAE.pth", "Nobody/Absent is not downloaded"),
                         ("Wan-AI/Wan2.1-T2V-1.3B:Wan2.2_VAE.pth", "matches 'Wan2.2_VAE.pth'"),
                         ("no-colon-and-no-path", "neither an existing path")):
        with pytest.raises(SystemExit):
            parse_args(id_args(cache, tmp_path / "o", bad))
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(id_args(cache, tmp_path / "o", WAN_IDS, "--model_path", str(release)))
    assert "not both" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ preset LoRA


def test_preset_lora_runs_resume_exactly(t2v, cache, plain, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    preset = tmp_path / "preset.safetensors"
    save_file({f"transformer.blocks.{i}.attn1.to_q.lora_{ab}.weight": torch.randn(*shape, generator=g) * 0.3
               for i in range(2) for ab, shape in (("A", (2, 48)), ("B", (48, 2)))}, str(preset))
    out = tmp_path / "preset-run"
    run_training(parse_args(cached_args(t2v, cache, out, "--preset_lora_path", preset, "--max_train_steps", "3",
                                        "--save_steps", "1")))
    assert losses(out) != losses(plain)  # the preset changed the base
    resumed = tmp_path / "preset-resumed"
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    run_training(parse_args(cached_args(t2v, cache, resumed, "--preset_lora_path", preset, "--max_train_steps", "3",
                                        "--save_steps", "1", "--resume_from_checkpoint", "latest")))
    assert losses(resumed) == losses(out)[1:]


def test_layer_offload_keeps_the_encoders_in_cpu_memory_too(t2v, data, plain, tmp_path):
    out = tmp_path / "online"
    trainer = WanTrainer(parse_args(run_args(t2v, data, out, "--max_train_steps", "1", "--enable_model_cpu_offload")))
    assert len(trainer.encoder_offload) == 2  # VAE and umT5 (a T2V model has no CLIP)
    trainer.train()
    assert all(m.onloads > 0 for m in trainer.encoder_offload)
    assert losses(out) == losses(plain)[:1]  # online with offloaded encoders = from the cache, bit for bit


@pytest.mark.parametrize("mode", [["--trainable_models", "dit"], ["--lora_base_model", "dit", "--fp8_models", "dit"]],
                         ids=["full-finetuning", "fp8-base"])
def test_layer_offload_of_full_finetuning_and_an_fp8_base_gives_the_plain_losses(t2v, cache, tmp_path, mode):
    def run(name, *extra):
        run_training(parse_args(cached_args(t2v, cache, tmp_path / name, "--max_train_steps", "2", *mode, *extra,
                                            lora=False)))
        return losses(tmp_path / name)

    assert run("offload", "--enable_model_cpu_offload", "--enable_optimizer_cpu_offload",
               "--use_gradient_checkpointing") == run("plain")


class PlaceholderOffload(LayerOffloadManager):
    """On the GPU an offloaded weight is on the wrong device; here it is an empty tensor: any use of a weight the
    hooks have not brought back fails (and so does a checkpoint recompute that saw it change)."""

    def resting(self, p):
        return torch.empty(0, dtype=p.dtype)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_offload_hooks_bring_every_weight_back_for_the_backward_and_the_recompute(checkpointing):
    from diffusers_wan_ext.training.modules import add_lora, enable_gradient_checkpointing

    def model():
        t = tiny_transformer(4)
        params = add_lora(t, 4, 4, ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"])
        torch.manual_seed(5)
        for p in params:  # non-zero B: the gradients reach every layer
            p.data.normal_(0, 0.1)
        if checkpointing:
            enable_gradient_checkpointing(t)
        return WanTrainingModule(t.train())

    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 8, 32, generator=g)
    reference, offloaded = model(), model()
    manager = PlaceholderOffload(offloaded, torch.device("cpu"), optimizer_on_cpu=True)
    grads = []
    for module in (reference, offloaded):
        out = x
        for step in range(2):  # two student steps through the same layers, as direct distillation runs them
            out = module(out, torch.tensor([900.0 - 400 * step]), context)
        out.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
    manager.after_backward()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    assert all(p.numel() == 0 for p in offloaded.parameters() if id(p) in manager.frozen)  # all resting again
