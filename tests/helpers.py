"""Shared helpers for tests: subprocesses that import this checkout, stand-in modules, the tiny text-to-video call, the
command line's exit status, the reference blend of sliding windows, the project's sdist and wheel, metadata rows and
wav files of the training datasets."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tarfile
import types
import wave
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def src_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that imports this checkout: ``src`` first on ``PYTHONPATH``, the caller's
    ``PYTHONPATH`` kept after it (on the GPU machine Diffusers is installed into a folder named there), plus
    ``extra`` variables."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


def run_python(code: str, cwd: str | os.PathLike | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (no package imported beforehand); return the completed process."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd or ROOT, env=src_env(HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=timeout)


def run_interpreted(script: str, expect: str, timeout: int = 300) -> None:
    """Run ``script`` in a fresh interpreter with ``TRITON_INTERPRET=1`` (set before Triton is imported); it must
    exit cleanly and print ``expect``."""
    proc = subprocess.run([sys.executable, "-c", script], env=src_env(TRITON_INTERPRET="1"), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert expect in proc.stdout, proc.stdout


def flash4_stand_in_modules(forward) -> dict[str, types.ModuleType]:
    """``sys.modules`` entries that make ``from flash_attn.cute import interface`` give a stand-in whose
    ``_flash_attn_fwd`` is ``forward`` (the real package needs a Hopper/Blackwell GPU)."""
    package, cute, interface = (types.ModuleType(n) for n in ("flash_attn", "flash_attn.cute",
                                                                "flash_attn.cute.interface"))
    interface._flash_attn_fwd, cute.interface, package.cute = forward, interface, cute
    return {"flash_attn": package, "flash_attn.cute": cute, "flash_attn.cute.interface": interface}


def latents_of(pipe, **kwargs) -> torch.Tensor:
    """The latents of the tests' tiny text-to-video call of ``pipe`` (32 x 32, 5 frames, 2 steps, guidance 4 with a
    negative prompt, seed 0); ``kwargs`` replace or add call arguments."""
    args = dict(prompt="a dog running", negative_prompt="blurry", height=32, width=32, num_frames=5,
                num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kwargs}).frames


def run_main(argv: list[str], capsys) -> tuple[int | str | None, str]:
    """``diffusers_wan_ext_cli.main(argv)`` -> (exit status, stderr); argparse's exit is an exit status too."""
    from diffusers_wan_ext_cli import main

    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def blend_windows(outputs: list[torch.Tensor], windows, num_frames: int, size: int, stride: int) -> torch.Tensor:
    """DiffSynth's blend of per-window outputs ``[B, C, b - a, ...]`` of the frame windows ``(a, b)`` (the reference
    side of the sliding-window tests)."""
    from diffusers_wan_ext.hooks.sliding_window import blend_weights

    value, weight = 0, torch.zeros(num_frames)
    for out, (a, b) in zip(outputs, windows):
        mask = blend_weights(num_frames, a, b, size - stride)
        full = torch.zeros(*out.shape[:2], num_frames, *out.shape[3:])
        full[:, :, a:b] = out * mask.view(1, 1, -1, 1, 1)
        value = value + full
        weight[a:b] += mask
    return value / weight.view(1, 1, -1, 1, 1)


def k_quant_blocks(qtype: str, rows: int, cols: int, seed: int):
    """Pre-quantized blocks of a K type (the gguf package cannot quantize them) with small finite fp16 scales."""
    import gguf
    import numpy as np

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = np.random.default_rng(seed).integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
    raw[:, 1::2] = (raw[:, 1::2] & 0x83) | 0x0C  # every fp16 in the block: |value| < 2^-11
    return raw


def write_wide_t2v_gguf(path) -> dict:
    """A core T2V DiT of width 256 (K-quant blocks fit its rows) written to ``path`` as a GGUF whose Linears cycle
    through Q8_0 / Q4_K / Q6_K / Q5_K (F32 elsewhere): ``{key: (stored blocks or None, type name)}``."""
    import gguf
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext.conversion.dit import export_dit_state_dict

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=256, freq_dim=256, ffn_dim=512, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    sd = export_dit_state_dict(model.state_dict())
    w = gguf.GGUFWriter(str(path), "wan")
    stored = {}
    for i, (key, value) in enumerate(sorted(sd.items())):
        v = value.float()
        if v.ndim == 2 and v.shape[1] % 256 == 0 and "modulation" not in key:
            qtype = ("Q8_0", "Q4_K", "Q6_K", "Q5_K")[i % 4]
            data = (gguf.quants.quantize(v.numpy(), gguf.GGMLQuantizationType.Q8_0) if qtype == "Q8_0"
                    else k_quant_blocks(qtype, v.shape[0], v.shape[1], i))
            w.add_tensor(key, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
            stored[key] = (data, qtype)
        else:
            w.add_tensor(key, v.numpy())
            stored[key] = (None, "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def checkout_files() -> list[str] | None:
    """The checkout's files (tracked and untracked, ignored ones left out); None outside a git checkout."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


BUILD = """
import sys
from setuptools import build_meta
kind, out = sys.argv[1], sys.argv[2]
print((build_meta.build_sdist if kind == "sdist" else build_meta.build_wheel)(out))
"""


def build_distribution(kind: str, source: Path, out: Path) -> Path:
    """Build an ``sdist`` or a ``wheel`` of the project at ``source`` into ``out`` (setuptools' build backend)."""
    proc = subprocess.run([sys.executable, "-c", BUILD, kind, str(out)], cwd=source, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


def build_sdist_and_wheel(tmp: Path) -> tuple[Path | None, Path]:
    """(sdist, wheel) of a copy of this checkout, the wheel built from the unpacked sdist (as pip does).  Outside a
    git checkout (an unpacked sdist) there is no file list to make an sdist of: (None, a wheel of ``src``)."""
    files = checkout_files()
    if files is None:
        project = tmp / "project"
        shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for name in ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in"):
            shutil.copy(ROOT / name, project / name)
        return None, build_distribution("wheel", project, tmp)
    source = tmp / "checkout"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    sdist = build_distribution("sdist", source, tmp)
    with tarfile.open(sdist) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
        tar.extractall(tmp / "unpacked", **safe)
    (unpacked,) = (tmp / "unpacked").iterdir()
    return sdist, build_distribution("wheel", unpacked, tmp)


def edit_metadata_rows(meta: Path, edit: Callable[[int, dict[str, str]], None]) -> None:
    """Rewrite a dataset's ``metadata.csv`` after ``edit(index, row)`` changed each row (columns it adds are kept, in
    the first row's order)."""
    rows = list(csv.DictReader(open(meta)))
    for i, row in enumerate(rows):
        edit(i, row)
    with open(meta, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_pcm16_wav(path: Path, pcm: np.ndarray, rate: int) -> Path:
    """A mono wav file of 16-bit samples ``pcm`` (``int16``) at ``rate`` Hz; returns ``path``."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, dtype="<i2").tobytes())
    return path


def fixed_draws_loss(transformer, cache: Path, seeds: int = 4) -> float:
    """Mean training loss of ``transformer`` (a trained LoRA already loaded, or not) over fixed (entry, timestep,
    noise) draws of the trainer's cached clips in ``cache``: the per-family "LoRA lowers the loss" measure."""
    from diffusers_wan_ext.training import FlowMatchTrainingSchedule
    from diffusers_wan_ext.training.inputs import ModelInputs
    from diffusers_wan_ext.training.modules import WanTrainingModule, training_loss
    from diffusers_wan_ext.training.trainer import CachedDataset

    module = WanTrainingModule(transformer).eval()
    schedule = FlowMatchTrainingSchedule(min_boundary=0.2, max_boundary=0.8)
    ds = CachedDataset(cache)
    total = []
    with torch.no_grad():
        for i in range(len(ds)):
            inputs = ModelInputs.from_tensors(ds[i]["cached"])
            for seed in range(seeds):
                loss, smp = training_loss(module, inputs, schedule, torch.Generator().manual_seed(seed), torch.float32)
                total.append(float(loss) / smp.weight)
    return float(np.mean(total))


def randomize_lora(transformer, seed: int = 0) -> None:
    """Fill every ``lora_*`` parameter of ``transformer`` with seeded normal values (a LoRA that changes outputs)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g)
