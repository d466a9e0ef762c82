"""Quantized DiT single files kept quantized on the GPU (issue 21): bf16 against GGUF Q8_0 and scaled fp8, same run.

A random-weight Wan2.1 DiT of the given config is exported to the original layout and written as a GGUF Q8_0 file
and a ComfyUI scaled-fp8 file (``utils.single_file.write_single_file``); each is loaded with
``conversion.quantized_dit.load_quantized_dit`` (GGUF packed in Diffusers' GGUFLinear, fp8 in our Fp8Linear:
dequantized per layer at compute) and timed against the bf16 model on one forward at the config's benchmark size
(1.3B: 480x832x81, 14B: 1280x720x81; 512 text tokens).
Reported: seconds per forward, weight GiB on the GPU, peak GiB during the forward, relative error vs bf16.

Usage (GPU machine):  python benchmarks/bench_quantized.py --model 1.3b
Prints a table and writes bench_quantized.json under $OUT.

``--plan BUDGET`` (issue 21 point 4) runs whole generations instead: umT5-XXL + the DiT + Wan2.1 VAE (random
weights, release sizes), first all resident in bf16 (the reference), then with the DiT loaded from each quantized
file (GGUF Q8_0 / Q4_K packed by ``gguf_fast.py``, scaled fp8 by ``write_single_file``) under
``enable_vram_management(BUDGET)`` (the planner counts the quantized bytes). Reported: seconds for ``--steps`` steps
with CFG (text encoding and decode included), peak GiB allocated over the whole call (text encoder included), the
plan, relative error of the video vs the bf16 run. Eager (a plan's hooks keep regional compile off).
  python bench_quantized.py --plan 24gb --model 14b --height 720 --width 1280 --steps 2
  python bench_quantized.py --plan 6 --model 1.3b --formats gguf-q8_0,gguf-q4_k,comfy-fp8-scaled
  python bench_quantized.py --plan 6 --tiny      (CPU smoke test: tiny components, no GPU)
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from _common import DIT_CONFIGS, env_info, make_dit_inputs, table, time_forward, write_json
from gguf_fast import write_gguf_fast


def weight_gib(model) -> float:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 2**30


def main() -> None:
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext.conversion.dit import export_dit_state_dict
    from diffusers_wan_ext.conversion.quantized_dit import load_quantized_dit
    from diffusers_wan_ext.utils.single_file import write_single_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1.3b", choices=["1.3b", "14b"])
    parser.add_argument("--formats", default="gguf-q8_0,comfy-fp8-scaled")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plan", help="whole generations under this VRAM budget (GiB or a preset: 8gb, 24gb)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", action="store_true", help="--plan: one untimed 1-step run per variant first")
    parser.add_argument("--tiny", action="store_true", help="--plan on CPU with tiny components (smoke test)")
    parser.add_argument("--overrides", default="", help="--plan: fixed strategies, e.g. transformer=group_offload,"
                        "text_encoder=group_offload (enable_vram_management(overrides=...))")
    args = parser.parse_args()
    if args.plan:
        plan_main(args)
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = WanTransformer3DModel(**DIT_CONFIGS[args.model]).to(torch.bfloat16).eval().requires_grad_(False)
    original = export_dit_state_dict(model.state_dict())
    work = Path(tempfile.mkdtemp())
    files = {}
    for fmt in args.formats.split(","):
        t0 = time.perf_counter()
        path = work / f"dit_{fmt}.{'gguf' if fmt.startswith('gguf') else 'safetensors'}"
        write_single_file(path, original, fmt)
        files[fmt] = path
        print(f"wrote {fmt} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s", flush=True)
    del original
    kw = make_dit_inputs(args.model)
    model.to("cuda")
    ref_s, ref_peak, ref = time_forward(model, kw, args.repeats)
    rows = [{"weights": "bf16", "s": f"{ref_s:.3f}", "weight GiB": f"{weight_gib(model):.2f}",
             "peak GiB": f"{ref_peak:.2f}", "rel err": "-", "time ratio": "1.00"}]
    model.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    for fmt, path in files.items():
        q = load_quantized_dit(path, torch_dtype=torch.bfloat16, device="cuda").eval()
        s, peak, out = time_forward(q, kw, args.repeats)
        err = ((out - ref).norm() / ref.norm()).item()
        rows.append({"weights": fmt, "s": f"{s:.3f}", "weight GiB": f"{weight_gib(q):.2f}", "peak GiB": f"{peak:.2f}",
                     "rel err": f"{err:.2e}", "time ratio": f"{s / ref_s:.2f}"})
        print(rows[-1], flush=True)
        del q
        gc.collect()
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()} | {args.model} DiT, benchmark size, one forward, eager")
    print(table(rows, list(rows[0])))
    write_json("bench_quantized.json", {"env": env_info(), "args": vars(args), "rows": rows})


def write_dit_file(path: Path, original: dict, fmt: str) -> None:
    if fmt in ("gguf-q8_0", "gguf-q4_k"):
        write_gguf_fast(path, original, fmt.split("-")[1].upper())
    else:
        from diffusers_wan_ext.utils.single_file import write_single_file

        write_single_file(path, original, fmt)


def tiny_components():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from diffusers_wan_ext.conversion.tokenizer import make_tiny_umt5_tokenizer

    torch.manual_seed(0)
    te = UMT5EncoderModel(UMT5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    dit = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
                                text_dim=32, freq_dim=32, ffn_dim=256, num_layers=2)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return dict(tokenizer=make_tiny_umt5_tokenizer(tempfile.mkdtemp(), vocab_size=256),
                text_encoder=te.to(torch.bfloat16).eval(), transformer=dit.to(torch.bfloat16).eval(),
                vae=vae.to(torch.bfloat16).eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


def generate(pipe, args, device: str, steps: int) -> tuple[torch.Tensor, float, float, float]:
    """One generation: (frames, seconds, peak GiB allocated, peak GiB reserved) over the whole call."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    frames = pipe(prompt="a corgi running on the beach at sunset", negative_prompt="blurry, low quality",
                  height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=steps,
                  guidance_scale=5.0, generator=torch.Generator(device).manual_seed(0), output_type="pt",
                  cfg_batching=False).frames
    if device == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    if device != "cuda":
        return frames.float().cpu(), sec, 0.0, 0.0
    return (frames.float().cpu(), sec, torch.cuda.max_memory_allocated() / 2**30,
            torch.cuda.max_memory_reserved() / 2**30)


def plan_main(args) -> None:
    """--plan: bf16 resident generation against quantized DiTs under a VRAM plan, same run."""
    from diffusers_wan_ext import WanExtPipeline
    from diffusers_wan_ext.conversion.dit import export_dit_state_dict
    from diffusers_wan_ext.conversion.quantized_dit import load_quantized_dit
    from diffusers_wan_ext.models.quantized_linear import quantized_weight_bytes

    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.height, args.width, args.frames = 64, 64, 5
        comps = tiny_components()
    else:
        from bench_pipeline import build_components

        comps = build_components(device="cuda", model=args.model)
    budget = args.plan if args.plan.endswith("gb") else float(args.plan)
    work = Path(tempfile.mkdtemp())
    original = export_dit_state_dict(comps["transformer"].state_dict())
    files = {}
    for fmt in args.formats.split(","):
        t0 = time.perf_counter()
        files[fmt] = work / f"dit_{fmt}.{'gguf' if fmt.startswith('gguf') else 'safetensors'}"
        write_dit_file(files[fmt], original, fmt)
        print(f"wrote {fmt} ({files[fmt].stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s",
              flush=True)
    del original
    pipe = WanExtPipeline(**comps).to(device)
    if args.warmup:
        generate(pipe, args, device, 1)
    ref, sec, peak, reserved = generate(pipe, args, device, args.steps)
    rows = [dict(dit="bf16", placement="all resident", s=round(sec, 1), peak_gib=round(peak, 2),
                 reserved_gib=round(reserved, 2), dit_weight_gib=round(weight_gib(comps["transformer"]), 2),
                 rel_err="-", time_ratio=1.0)]
    print(rows[-1], flush=True)
    pipe.to("cpu")
    comps["transformer"] = None
    del pipe
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    for fmt, path in files.items():
        dit = load_quantized_dit(path, torch_dtype=torch.bfloat16, device="cpu").eval()
        pipe = WanExtPipeline(**{**comps, "transformer": dit})
        overrides = dict(item.split("=") for item in args.overrides.split(",")) if args.overrides else None
        plan = pipe.enable_vram_management(budget, device=device, verbose=False, cfg_batched=False,
                                           height=args.height, width=args.width, num_frames=args.frames,
                                           overrides=overrides)
        print(plan, flush=True)
        if args.warmup:
            generate(pipe, args, device, 1)
        frames, sec, peak, reserved = generate(pipe, args, device, args.steps)
        err = ((frames - ref).norm() / ref.norm()).item()
        rows.append(dict(dit=fmt, placement=", ".join(f"{k}: {v}" for k, v in plan.strategies.items()),
                         s=round(sec, 1), peak_gib=round(peak, 2), reserved_gib=round(reserved, 2),
                         dit_weight_gib=round(quantized_weight_bytes(dit) / 2**30, 2), rel_err=f"{err:.2e}",
                         time_ratio=round(sec / rows[0]["s"], 2)))
        print(rows[-1], flush=True)
        pipe.disable_vram_management()
        pipe.to("cpu")
        del pipe, dit
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        path.unlink()
    name = "tiny" if args.tiny else args.model
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} | {name} {args.height}x{args.width}x"
          f"{args.frames}, {args.steps} steps, CFG 5 (two forwards), budget {args.plan}")
    print(table(rows, list(rows[0])))
    write_json(f"bench_quantized_plan_{name}.json", {"env": env_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
