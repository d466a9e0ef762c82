"""One Wan transformer forward: ours (default configuration) against stock Diffusers, in the same run.

Configurations timed per model (random weights, bf16, batch 1, 512 text tokens):
  * stock eager        -- ``WanTransformer3DModel`` as Diffusers ships it (SDPA; cuDNN kernel on Hopper)
  * stock compiled     -- + ``compile_repeated_blocks(fullgraph=True)``: stock's best configuration
  * ours               -- ``diffusers_wan_ext.runtime.optimize_transformer`` defaults (fastest installed exact
                          attention through Diffusers' dispatch, regional compile)
  * ours tuned         -- ours + Inductor multi-kernel reductions and coordinate-descent tuning (longer compile)
  * ours -NAME         -- ours with ``optimize_transformer(NAME=False)`` (A/B of one option, e.g. "ours -fused_norms")
  * ours fp8 (--fp8)   -- + torchao float8 dynamic-activation GEMMs; reported separately with its error vs bf16

"stock compiled", "ours" (and "ours tuned" / "ours -NAME") share one set of weights and are timed alternately (one forward each per round), so clock
and temperature drift hits both alike; the other variants are timed alone.

Usage (GPU machine):  python benchmarks/bench_dit.py --models 1.3b,14b --variants "stock compiled,ours"
Prints a table (seconds, TFLOP/s, fraction of the ideal bf16 bound, peak GiB, ratio vs stock compiled, error vs
stock eager) and writes bench_dit.json under $OUT.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from _common import (DIT_CONFIGS, PEAK_BF16_TFLOPS, dit_flops, env_info, make_dit_inputs, peak_memory,
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

    options = ({"triton.multi_kernel": 1, "coordinate_descent_tuning": True, "fx_graph_cache": False}
               if variant == "ours tuned" else None)  # multi-kernel graphs fail to load from the FX cache
    # "ours -name": ours with optimize_transformer(name=False), e.g. "ours -fused_qk_rope" (an A/B of one option)
    off = {variant.split(" -", 1)[1]: False} if " -" in variant else {}
    report = optimize_transformer(model, fp8=variant.endswith("fp8"), compile_options=options, **off)
    return report["attention_backend"]


def _weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (fused projections share storage)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except RuntimeError:  # tensor subclasses (torchao float8 weights) have no plain storage
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def sibling(base, name: str):
    """A second model of the same config that shares ``base``'s parameters and buffers (no second copy), so the
    pair timed alternately fits where two copies would not (14B on an 80 GB card)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**DIT_CONFIGS[name])
    model.load_state_dict(base.state_dict(keep_vars=True), assign=True)
    for buf_name, buf in base.named_buffers():  # non-persistent buffers (rotary tables) are not in the state dict
        owner, _, attr = buf_name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, buf)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise RuntimeError("sibling model still has meta tensors")
    return model.eval().requires_grad_(False)


def _timed_once(model, inputs) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    model(**inputs)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1.3b,ti2v-5b,14b")
    parser.add_argument("--variants", default="stock eager,stock compiled,ours")
    parser.add_argument("--fp8", action="store_true", help="also time ours with float8 GEMMs (needs torchao)")
    parser.add_argument("--iters", type=int, default=0, help="timed forwards per variant (default: 10, 3 for 14b)")
    args = parser.parse_args()
    variants = args.variants.split(",") + (["ours fp8"] if args.fp8 else [])
    env = env_info()
    print(env, flush=True)
    rows, full = [], {"env": env, "results": [], "method": (
        "'stock compiled' and 'ours' are resident together and timed in alternating order (one forward each per "
        "round, CUDA events, median), sharing one set of weights; other variants are timed alone. peak_gib: the "
        "variant's own weights (unique storage, fused copies included) + inputs + the forward's peak working memory.")}
    for name in args.models.split(","):
        inputs = make_dit_inputs(name)
        flops = dit_flops(name)
        ideal = flops / (PEAK_BF16_TFLOPS * 1e12)
        iters = args.iters or (3 if name == "14b" else 10)
        paired = [v for v in variants if v in ("stock compiled", "ours", "ours tuned") or v.startswith("ours -")]
        # stock eager alone first (the error reference), then the alternating group, then the rest (fp8) alone
        groups = ([["stock eager"]] if "stock eager" in variants else []) + [paired] + [
            [v] for v in variants if v not in paired and v != "stock eager"]
        ref, base, results = None, None, {}
        for group in (g for g in groups if g):
            models, info = {}, {}
            raw = [build(name)]  # the group shares one set of weights: siblings are made before any is optimized
            raw += [sibling(raw[0], name) for _ in group[1:]]
            for variant, model in zip(group, raw):
                t0 = time.time()
                try:
                    backend = configure(model, variant)
                except Exception as exc:  # noqa: BLE001 - e.g. fp8 without a working torchao: report, go on
                    print(f"{name} {variant}: not run ({exc!r})"[:400], flush=True)
                    results[variant] = dict(error=repr(exc)[:200])
                    continue
                models[variant] = model
                info[variant] = dict(backend=backend, t0=t0)
            with torch.no_grad():
                for variant, model in models.items():  # first call compiles; then one more warm-up call
                    out = model(**inputs)[0].float()
                    info[variant]["setup_s"] = time.time() - info[variant]["t0"]
                    ref = out if ref is None else ref
                    info[variant]["err"] = ((out - ref).norm() / ref.norm()).item()
                    del out
                    with peak_memory() as pm:
                        model(**inputs)
                    # this variant's own weights (fused copies included) + inputs + the forward's working memory
                    own = _weight_bytes(model) + sum(t.numel() * t.element_size() for t in inputs.values()
                                                     if torch.is_tensor(t))
                    info[variant]["peak_gib"] = pm["peak_gib"] - pm["base_gib"] + own / 2**30
                runs = {v: [] for v in models}
                for _ in range(iters):
                    for variant, model in models.items():
                        runs[variant].append(_timed_once(model, inputs))
            for variant in group:
                results[variant] = dict(info[variant], runs=runs[variant], median_s=statistics.median(runs[variant]))
            del models, model, raw
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        base = results.get("stock compiled", {}).get("median_s")
        for variant in variants:
            r = results[variant]
            if "error" in r:
                rows.append(dict(model=name, variant=variant, attention=r["error"][:60]))
                continue
            sec = r["median_s"]
            row = dict(model=name, variant=variant, attention=r["backend"], s=round(sec, 4),
                       tflops=round(flops / sec / 1e12), ideal_frac=round(ideal / sec, 3),
                       peak_gib=round(r["peak_gib"], 2), err=f"{r['err']:.1e}", setup_s=round(r["setup_s"], 1),
                       vs_stock_compiled=round(base / sec, 3) if base else "")
            rows.append(row)
            full["results"].append(dict(row, runs=r["runs"]))
            print(row, flush=True)
        del inputs, ref
    write_json("bench_dit.json", full)
    print(f"\n{env.get('gpu')} | torch {env['torch']} | diffusers {env.get('diffusers')} | ideal bound at "
          f"{PEAK_BF16_TFLOPS:.0f} TFLOP/s")
    print(table(rows, ["model", "variant", "attention", "s", "tflops", "ideal_frac", "peak_gib", "vs_stock_compiled", "err"]))


if __name__ == "__main__":
    main()
