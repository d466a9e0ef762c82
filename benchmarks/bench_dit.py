"""One Wan transformer forward: ours (default configuration) against stock Diffusers, in the same run.

Configurations timed per model (random weights, bf16, batch 1, 512 text tokens):
  * stock eager        -- ``WanTransformer3DModel`` as Diffusers ships it (SDPA; cuDNN kernel on Hopper)
  * stock compiled     -- + ``compile_repeated_blocks(fullgraph=True)``: stock's best configuration
  * ours               -- ``diffusers_wan_ext.runtime.optimize_transformer`` defaults (fastest installed exact
                          attention through Diffusers' dispatch, regional compile)
  * ours fp8 (--fp8)   -- + torchao float8 dynamic-activation GEMMs; reported separately with its error vs bf16

Usage (GPU machine):  python benchmarks/bench_dit.py --models 1.3b,ti2v-5b   (then --models 14b)
Prints a table (seconds, TFLOP/s, fraction of the ideal bf16 bound, peak GiB, ratio vs stock compiled, error vs
stock eager) and writes bench_dit.json under $OUT.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from _common import (DIT_CONFIGS, PEAK_BF16_TFLOPS, cuda_time, dit_flops, env_info, make_dit_inputs, peak_memory,
                     table, write_json)


def build(name: str):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**DIT_CONFIGS[name])
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def configure(model, variant: str) -> str:
    if variant == "stock eager":
        return "native"
    if variant == "stock compiled":
        model.compile_repeated_blocks(fullgraph=True)
        return "native"
    from diffusers_wan_ext.runtime import optimize_transformer

    report = optimize_transformer(model, fp8=variant.endswith("fp8"))
    return report["attention_backend"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1.3b,ti2v-5b,14b")
    parser.add_argument("--variants", default="stock eager,stock compiled,ours")
    parser.add_argument("--fp8", action="store_true", help="also time ours with float8 GEMMs (needs torchao)")
    parser.add_argument("--iters", type=int, default=0, help="timed forwards (default: 5, 2 for 14b)")
    args = parser.parse_args()
    variants = args.variants.split(",") + (["ours fp8"] if args.fp8 else [])
    env = env_info()
    print(env, flush=True)
    rows, full = [], {"env": env, "results": []}
    for name in args.models.split(","):
        inputs = make_dit_inputs(name)
        flops = dit_flops(name)
        ideal = flops / (PEAK_BF16_TFLOPS * 1e12)
        iters = args.iters or (2 if name == "14b" else 5)
        ref, base = None, None
        for variant in variants:
            model = build(name)
            t0 = time.time()
            backend = configure(model, variant)
            with torch.no_grad():
                out = model(**inputs)[0].float()  # compiles here
                setup_s = time.time() - t0
                if ref is None:
                    ref = out
                err = ((out - ref).norm() / ref.norm()).item()
                with peak_memory() as pm:
                    t = cuda_time(lambda: model(**inputs), warmup=1, iters=iters)
            sec = t["median_s"]
            if variant == "stock compiled":
                base = sec
            row = dict(model=name, variant=variant, attention=backend, s=round(sec, 4),
                       tflops=round(flops / sec / 1e12), ideal_frac=round(ideal / sec, 3),
                       peak_gib=round(pm["peak_gib"], 2), err=f"{err:.1e}", setup_s=round(setup_s, 1),
                       vs_stock_compiled=round(base / sec, 3) if base else "")
            rows.append(row)
            full["results"].append(dict(row, runs=t["runs"]))
            print(row, flush=True)
            del model, out
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        del inputs, ref
    write_json("bench_dit.json", full)
    print(f"\n{env.get('gpu')} | torch {env['torch']} | diffusers {env.get('diffusers')} | ideal bound at "
          f"{PEAK_BF16_TFLOPS:.0f} TFLOP/s")
    print(table(rows, ["model", "variant", "attention", "s", "tflops", "ideal_frac", "peak_gib", "vs_stock_compiled", "err"]))


if __name__ == "__main__":
    main()
