"""LoRA training step of Wan2.1 1.3B / 14B with our trainer's code: seconds per step and peak GPU memory.

One training step = flow-matching loss (DiffSynth-Studio's timestep sampling and weighting), backward with
per-block gradient checkpointing, AdamW step on the LoRA weights -- exactly what ``examples/training/train.py``
runs per micro-batch after the (cacheable) VAE / umT5 encoding, using ``diffusers_wan_ext.training.modules``.

* models: random-weight ``WanTransformer3DModel`` built from the released configs (no download), bf16, with
  Diffusers' fp32 modules (``_keep_in_fp32_modules``) kept in fp32 as ``from_pretrained`` does;
* inputs: 480x832x81 (latents ``[1, 16, 21, 60, 104]``, 32 760 tokens), 512 text tokens;
* LoRA rank 32 (alpha 32) on ``to_q, to_k, to_v, to_out.0, ffn.net.0.proj, ffn.net.2`` (DiffSynth-Studio's
  default ``q,k,v,o,ffn.0,ffn.2``), LoRA weights and AdamW state in fp32;
* variants: ``lora`` (gradient checkpointing), ``lora-fp8`` (+ frozen linear weights stored in float8),
  ``lora-offload`` (checkpointed activations in CPU memory).

There is no stock Diffusers Wan trainer to compare with; DiffSynth-Studio states 16 GB for Wan2.1-T2V-1.3B LoRA
training at this size.  Memory: ``weights`` = allocated after building the model, ``peak`` = the largest allocation
during the timed steps (everything on the GPU: weights, LoRA, optimizer state, activations).

Usage (GPU):  python benchmarks/bench_train.py                      # 1.3b and 14b, variant lora
              python benchmarks/bench_train.py --models 1.3b --variants lora,lora-fp8,lora-offload
CPU smoke:    python benchmarks/bench_train.py --tiny
Writes bench_train.json under $OUT when set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, in_channels=16, out_channels=16)
MODELS = {
    "1.3b": dict(COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14b": dict(COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "tiny": dict(COMMON, num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=96,
                 num_layers=2),
}
LATENTS = {"480x832x81": (16, 21, 60, 104), "tiny": (16, 3, 8, 8)}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
DIFFSYNTH_STATED = {"1.3b": "16 GB"}


def build_transformer(name: str, device: torch.device, dtype: torch.dtype):
    """Random-weight transformer created directly on ``device`` in ``dtype`` (no fp32 copy of 14B)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**MODELS[name])
    finally:
        torch.set_default_dtype(default)
    keep = set(WanTransformer3DModel._keep_in_fp32_modules or ())
    for module_name, module in model.named_modules():
        if keep & set(module_name.split(".")):
            module.float()
    if "scale_shift_table" in keep:
        for module_name, param in model.named_parameters():
            if module_name.endswith("scale_shift_table"):
                param.data = param.data.float()
    return model


def run(name: str, variant: str, shape: str, rank: int, steps: int, warmup: int, device: torch.device,
        dtype: torch.dtype, attention: str) -> dict:
    from diffusers_wan_ext.training.flow_match import FlowMatchTrainingSchedule
    from diffusers_wan_ext.training.inputs import ModelInputs
    from diffusers_wan_ext.training.modules import (WanTrainingModule, add_lora, enable_gradient_checkpointing,
                                                    store_frozen_weights_in_fp8, training_loss)

    cuda = device.type == "cuda"
    model = build_transformer(name, device, dtype)
    if attention != "native":
        model.set_attention_backend(attention)
    params = add_lora(model, rank, rank, TARGETS, dtype=torch.float32)
    if variant == "lora-fp8":
        store_frozen_weights_in_fp8(model, dtype)
    enable_gradient_checkpointing(model, offload=variant == "lora-offload")
    model.train()
    module = WanTrainingModule(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    c, t, h, w = LATENTS[shape]
    text_dim = MODELS[name]["text_dim"]
    inputs = ModelInputs(latents=torch.randn(1, c, t, h, w, generator=g).to(device, dtype),
                         prompt_embeds=torch.randn(1, 512 if shape != "tiny" else 16, text_dim, generator=g)
                         .to(device, dtype))
    schedule = FlowMatchTrainingSchedule()
    if cuda:
        torch.cuda.synchronize()
        weights_gib = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    def step() -> float:
        loss, _ = training_loss(module, inputs, schedule, g, dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    times, losses = [], []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    result = {
        "model": name, "variant": variant, "shape": shape, "rank": rank, "tokens": t * (h // 2) * (w // 2),
        "lora_params_m": round(sum(p.numel() for p in params) / 1e6, 2),
        "seconds_per_step": round(times[len(times) // 2], 4), "min_seconds": round(times[0], 4),
        "steps": steps, "losses_finite": all(l == l for l in losses),  # noqa: E741
        "diffsynth_stated": DIFFSYNTH_STATED.get(name, ""),
    }
    if cuda:
        result.update(weights_gib=round(weights_gib, 2),
                      peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
    del module, model, optimizer, params, inputs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    fmt = lambda vals: "| " + " | ".join(str(v).ljust(n) for v, n in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cols), fmt(["-" * n for n in widths]), *(fmt([r.get(c, "") for c in cols]) for r in rows)])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1.3b,14b")
    parser.add_argument("--variants", default="lora", help="lora, lora-fp8, lora-offload (comma-separated)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attention", default="native",
                        help="Diffusers attention backend (native = SDPA; e.g. flash, _flash_3, _native_cudnn)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny model, one timed step")
    args = parser.parse_args(argv)
    if args.tiny:
        device, dtype, models, shape = torch.device("cpu"), torch.float32, ["tiny"], "tiny"
        args.steps, args.warmup, args.rank = 1, 1, 4
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device; run with --tiny for the CPU smoke test")
        device, dtype, models, shape = torch.device("cuda"), torch.bfloat16, args.models.split(","), "480x832x81"
    import diffusers
    import peft

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "peft": peft.__version__, "date": time.strftime("%Y-%m-%d"), "attention": args.attention}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    print(json.dumps(env), flush=True)
    rows = []
    for name in models:
        for variant in args.variants.split(","):
            try:
                rows.append(run(name, variant, shape, args.rank, args.steps, args.warmup, device, dtype,
                                args.attention))
            except torch.OutOfMemoryError as e:  # report and go on with the next configuration
                rows.append({"model": name, "variant": variant, "shape": shape, "rank": args.rank,
                             "seconds_per_step": "OOM", "error": str(e).splitlines()[0]})
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows, ["model", "variant", "shape", "rank", "seconds_per_step", "weights_gib", "peak_allocated_gib",
                       "peak_reserved_gib", "diffsynth_stated"]))
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "bench_train.json").write_text(json.dumps({"env": env, "runs": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
