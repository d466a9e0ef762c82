"""LoRA training step of Wan2.1 1.3B / 14B, Wan2.2-S2V-14B and Video-As-Prompt-14B with our trainer's code:
seconds per step and peak GPU memory.

One training step = flow-matching loss (DiffSynth-Studio's timestep sampling and weighting), backward with
per-block gradient checkpointing, AdamW step on the LoRA weights -- exactly what ``examples/training/train.py``
runs per micro-batch after the (cacheable) VAE / umT5 / CLIP / Wav2Vec2 encoding, using
``diffusers_wan_ext.training.modules`` (and ``training.offload.LayerOffloadManager`` for the offload modes).

* models: random-weight transformers built from the released configs (no download), bf16, with the fp32 modules
  (``_keep_in_fp32_modules``) kept in fp32 as ``from_pretrained`` does:
  ``1.3b`` / ``14b`` (``WanTransformer3DModel``), ``s2v-14b`` (``WanS2VTransformer3DModel``, release defaults:
  Wav2Vec2 25 x 1024 audio features, 12 audio-injection layers, pose embedding), ``vap-14b``
  (``WanVideoAsPromptTransformer3DModel``: Wan2.1-I2V-14B + the reference stream on blocks 0, 4, ..., 36);
* inputs at 480x832x81 with each family's training conditioning at release sizes (what the family's
  ``Conditioning.encode`` puts in ``ModelInputs``):
  T2V: latents ``[1, 16, 21, 60, 104]`` (32 760 tokens), 512 text tokens;
  S2V: the first frame is the reference -> target latents ``[1, 16, 20, 60, 104]``, ``image_latents``
  ``[1, 16, 1, 60, 104]``, ``audio_embeds`` ``[1, 25, 1024, 80]``, ``pose_latents`` ``[1, 16, 20, 60, 104]``,
  ``motion_latents`` ``[1, 16, 19, 60, 104]`` with ``drop_motion_frames`` (the first clip);
  VAP: latents ``[1, 16, 21, 60, 104]`` + I2V ``y`` ``[1, 20, 21, 60, 104]``, CLIP ``[1, 257, 1280]``, the
  reference video ``vap_hidden_states`` ``[1, 36, 21, 60, 104]`` with its umT5 context and CLIP features;
* LoRA rank 32 (alpha 32) on ``to_q, to_k, to_v, to_out.0, ffn.net.0.proj, ffn.net.2`` (DiffSynth-Studio's
  default ``q,k,v,o,ffn.0,ffn.2``), LoRA weights and AdamW state in fp32;
* variants (all with gradient checkpointing): ``lora``; ``lora-fp8`` (+ frozen linear weights stored in float8);
  ``lora-offload`` (checkpointed activations in CPU memory, ``--use_gradient_checkpointing_offload``);
  ``lora-model-offload`` (``--enable_model_cpu_offload``: layer weights in pinned CPU memory, brought in per
  layer by hooks); ``lora-model-optim-offload`` (+ ``--enable_optimizer_cpu_offload``: LoRA weights, gradients
  and AdamW on the CPU).

There is no stock Diffusers Wan trainer to compare with.  What DiffSynth-Studio states (no H100 timings anywhere):
LoRA at 480x832x81: Wan2.1-T2V-1.3B 16 GB, Wan2.1-T2V-14B 60 GB (examples/wanvideo/README, 2025-04;
``--use_gradient_checkpointing_offload`` saves another 20-30 %); no figures for S2V or Video-As-Prompt training;
offload training (docs, "Offload Training"): "speed drops about 2-10x (more for larger models)", a toy model
4 GB -> 1.4 GB; no Wan figures.  Memory: ``weights`` = allocated before the first step (after the offload manager
moved the frozen weights to the CPU), ``peak`` = the largest allocation during the timed steps.

Usage (GPU):  python benchmarks/bench_train.py                      # 1.3b and 14b, variant lora
              python benchmarks/bench_train.py --models s2v-14b,vap-14b:lora-offload
              python benchmarks/bench_train.py --models 1.3b --variants lora,lora-model-offload,lora-model-optim-offload
CPU smoke:    python benchmarks/bench_train.py --tiny --models 1.3b,s2v-14b,vap-14b   (tiny models of each family,
              every variant; plain --tiny: the tiny T2V model)
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
TINY = dict(num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2)
# name -> (family, transformer config); family "t2v" / "s2v" / "vap" picks the class and the conditioning inputs
MODELS = {
    "1.3b": ("t2v", dict(COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30)),
    "14b": ("t2v", dict(COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40)),
    "s2v-14b": ("s2v", {}),  # WanS2VTransformer3DModel's defaults are the release's (Wan2.2-S2V-14B)
    "vap-14b": ("vap", {}),  # WanVideoAsPromptTransformer3DModel's defaults are the release's
    "tiny": ("t2v", dict(COMMON, **TINY)),
    "s2v-tiny": ("s2v", dict(TINY, audio_dim=32, audio_num_layers=3, audio_inject_layers=[0, 1], pose_dim=16,
                             motion_frames=9)),
    "vap-tiny": ("vap", dict(TINY, image_dim=40, added_kv_proj_dim=48, text_len=16, num_layers=3, vap_layers=[0, 2])),
}
LATENTS = {"480x832x81": (16, 21, 60, 104), "tiny": (16, 3, 8, 8)}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
DIFFSYNTH_STATED = {"1.3b": "16 GB (lora)", "14b": "60 GB (lora)", "s2v-14b": "none stated", "vap-14b": "none stated"}
OFFLOAD_STATED = "offload: 2-10x slower (no Wan GB stated)"
VARIANTS = ("lora", "lora-fp8", "lora-offload", "lora-model-offload", "lora-model-optim-offload")


def model_class(family: str):
    if family == "s2v":
        from diffusers_wan_ext.models import WanS2VTransformer3DModel

        return WanS2VTransformer3DModel
    if family == "vap":
        from diffusers_wan_ext.models import WanVideoAsPromptTransformer3DModel

        return WanVideoAsPromptTransformer3DModel
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


def build_transformer(name: str, device: torch.device, dtype: torch.dtype):
    """Random-weight transformer created directly on ``device`` in ``dtype`` (no fp32 copy of 14B)."""
    family, config = MODELS[name]
    cls = model_class(family)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(default)
    keep = set(cls._keep_in_fp32_modules or ())
    for module_name, module in model.named_modules():
        if keep & set(module_name.split(".")):
            module.float()
    for param_name, param in model.named_parameters():
        if param_name.split(".")[-1] in keep:
            param.data = param.data.float()
    return model


def make_inputs(name: str, model, shape: str, device: torch.device, dtype: torch.dtype, g: torch.Generator):
    """The family's ``ModelInputs`` at ``shape`` (what its ``Conditioning.encode`` produces), random normal."""
    from diffusers_wan_ext.training.inputs import ModelInputs

    family, _ = MODELS[name]
    cfg = model.config
    c, t, h, w = LATENTS[shape]
    text_len = 512 if shape != "tiny" else 16
    rand = lambda *size: torch.randn(*size, generator=g).to(device, dtype)  # noqa: E731
    prompt = rand(1, text_len, cfg.text_dim)
    if family == "s2v":  # frame 0 is the reference image: (num_frames - 1) / 4 target latent frames
        t -= 1
        kwargs = {"audio_embeds": rand(1, cfg.audio_num_layers, cfg.audio_dim, 4 * t),
                  "image_latents": rand(1, c, 1, h, w),
                  "motion_latents": rand(1, c, model.motion_latent_frames, h, w),
                  "pose_latents": rand(1, cfg.pose_dim, t, h, w),
                  "drop_motion_frames": torch.tensor(True)}
        return ModelInputs(latents=rand(1, c, t, h, w), prompt_embeds=prompt, transformer_kwargs=kwargs)
    if family == "vap":
        y_channels = cfg.in_channels - c
        kwargs = {"vap_hidden_states": rand(1, cfg.in_channels, t, h, w), "vap_encoder_hidden_states": rand(*prompt.shape),
                  "vap_encoder_hidden_states_image": rand(1, 257, cfg.image_dim)}
        return ModelInputs(latents=rand(1, c, t, h, w), prompt_embeds=prompt, y=rand(1, y_channels, t, h, w),
                           image_embeds=rand(1, 257, cfg.image_dim), transformer_kwargs=kwargs)
    return ModelInputs(latents=rand(1, c, t, h, w), prompt_embeds=prompt)


def run(name: str, variant: str, shape: str, rank: int, steps: int, warmup: int, device: torch.device,
        dtype: torch.dtype, attention: str) -> dict:
    from diffusers_wan_ext.training.flow_match import FlowMatchTrainingSchedule
    from diffusers_wan_ext.training.modules import (WanTrainingModule, add_lora, enable_gradient_checkpointing,
                                                    store_frozen_weights_in_fp8, training_loss)
    from diffusers_wan_ext.training.offload import LayerOffloadManager

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
    manager = None
    if variant in ("lora-model-offload", "lora-model-optim-offload"):  # as the trainer: hooks on the unwrapped module
        manager = LayerOffloadManager(module, device, optimizer_on_cpu=variant == "lora-model-optim-offload")
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    inputs = make_inputs(name, model, shape, device, dtype, g)
    schedule = FlowMatchTrainingSchedule()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        weights_gib = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    def step() -> float:
        loss, _ = training_loss(module, inputs, schedule, g, dtype)
        loss.backward()
        if manager is not None:
            manager.after_backward()
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
    stated = DIFFSYNTH_STATED.get(name, "")
    if manager is not None:
        stated = OFFLOAD_STATED
    result = {
        "model": name, "variant": variant, "shape": shape, "rank": rank, "grad_ckpt": True,
        "tokens": inputs.latents.shape[2] * (inputs.latents.shape[3] // 2) * (inputs.latents.shape[4] // 2),
        "lora_params_m": round(sum(p.numel() for p in params) / 1e6, 2),
        "seconds_per_step": round(times[len(times) // 2], 4), "min_seconds": round(times[0], 4),
        "steps": steps, "losses_finite": all(l == l for l in losses),  # noqa: E741
        "diffsynth_stated": stated,
    }
    if manager is not None:
        result["onloads"] = manager.onloads
    if cuda:
        result.update(weights_gib=round(weights_gib, 2),
                      peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
    if manager is not None:
        manager.remove()
    module = model = optimizer = params = inputs = manager = None  # free before the next row
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    fmt = lambda vals: "| " + " | ".join(str(v).ljust(n) for v, n in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cols), fmt(["-" * n for n in widths]), *(fmt([r.get(c, "") for c in cols]) for r in rows)])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help=f"comma-separated: {', '.join(MODELS)} (default 1.3b,14b; --tiny: tiny); "
                             "NAME:V1+V2 gives that model its own variants")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated: {', '.join(VARIANTS)} (default lora; --tiny: all)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attention", default="native",
                        help="Diffusers attention backend (native = SDPA; e.g. flash, _flash_3, _native_cudnn)")
    parser.add_argument("--oom-fallback", default=None, metavar="VARIANT",
                        help="a row that runs out of memory is run again with this variant (e.g. lora-offload)")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: tiny models (release names map to tiny ones of the same family: "
                             "--models 1.3b,s2v-14b,vap-14b), every variant unless --variants, one timed step")
    args = parser.parse_args(argv)
    if args.tiny:
        device, dtype, shape = torch.device("cpu"), torch.float32, "tiny"
        tiny_of = {"1.3b": "tiny", "14b": "tiny", "s2v-14b": "s2v-tiny", "vap-14b": "vap-tiny"}  # same code paths
        models = [tiny_of.get(m.split(":")[0], m.split(":")[0]) + m[len(m.split(":")[0]):]
                  for m in (args.models or "tiny").split(",")]
        args.steps, args.warmup, args.rank, args.variants = 1, 1, 4, args.variants or ",".join(VARIANTS)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device; run with --tiny for the CPU smoke test")
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, "480x832x81"
        models, args.variants = (args.models or "1.3b,14b").split(","), args.variants or "lora"
    import diffusers
    import peft

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "peft": peft.__version__, "date": time.strftime("%Y-%m-%d"), "attention": args.attention}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    print(json.dumps(env), flush=True)
    # "name:variant" runs that model with that variant only (e.g. vap-14b:lora-offload), others get --variants
    per_model = {m.split(":")[0]: (m.split(":")[1].split("+") if ":" in m else args.variants.split(",")) for m in models}
    unknown = [n for n in per_model if n not in MODELS] + [
        v for v in sum(per_model.values(), []) + [args.oom_fallback or "lora"] if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown --models / --variants {unknown}; models: {', '.join(MODELS)}; "
                         f"variants: {', '.join(VARIANTS)}")
    rows = []
    out = os.environ.get("OUT", "out")
    for name, variants in per_model.items():
        variants = list(variants)
        while variants:
            variant = variants.pop(0)
            try:
                rows.append(run(name, variant, shape, args.rank, args.steps, args.warmup, device, dtype,
                                args.attention))
            except Exception as e:  # noqa: BLE001  (OOM or a failure: report it and go on with the next one)
                oom = isinstance(e, torch.OutOfMemoryError)
                rows.append({"model": name, "variant": variant, "shape": shape, "rank": args.rank,
                             "seconds_per_step": "OOM" if oom else f"error: {type(e).__name__}",
                             "error": (str(e).splitlines() or [""])[0][:300]})
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if oom and args.oom_fallback and args.oom_fallback != variant and args.oom_fallback not in variants:
                    variants.insert(0, args.oom_fallback)
            row = rows[-1]
            print(f"{name} {variant}: {row['seconds_per_step']} s/step, peak {row.get('peak_allocated_gib', '-')} "
                  f"GiB {row.get('error', '')}", flush=True)
            if out:  # after every row: a later timeout keeps what was measured
                Path(out).mkdir(parents=True, exist_ok=True)
                Path(out, "bench_train.json").write_text(json.dumps({"env": env, "runs": rows}, indent=1))
    print(table(rows, ["model", "variant", "tokens", "seconds_per_step", "weights_gib", "peak_allocated_gib",
                       "peak_reserved_gib", "diffsynth_stated"]))
    return rows


if __name__ == "__main__":
    main()
