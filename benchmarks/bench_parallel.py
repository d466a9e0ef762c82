"""Sequence-parallel scaling of one Wan transformer forward over 1, 2, 4 (8) GPUs, in the same run.

For every GPU count N the driver launches ``torchrun --nproc_per_node=N`` on this script (``--worker``); each worker
builds the random-weight transformer (same seed on every rank), spreads it with
``diffusers_wan_ext.parallel.enable_parallelism`` (Diffusers' context parallelism over NCCL; degrees from
``choose_degrees`` unless a layout is named) and times one forward: stock Diffusers' model with ``--attention``
(default cuDNN) and regional compile, or with ``--ours`` our ``optimize_transformer`` defaults (flash-attn 4 runs
Ulysses / Ring through Diffusers' templated attention).  The N=1 output is kept and every N>1 output is
compared with it (max abs and relative error), so the speedup is measured on a result that is proven equal.

Usage (GPU machine):
    python benchmarks/bench_parallel.py --gpus 1,2,4 --models 1.3b,14b [--layouts 1.3b:4=u2r2,1.3b:2=r2] [--ours]
Layout names: ``u4`` (Ulysses 4), ``r2`` (Ring 2), ``u2r2`` (Ulysses 2 x Ring 2).  Prints a table (seconds,
speedup and scaling efficiency over N=1, fraction of the ideal bf16 bound, peak GiB, error vs N=1) and writes
bench_parallel.json under $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _common import DIT_CONFIGS, PEAK_BF16_TFLOPS, cuda_time, dit_flops, env_info, make_dit_inputs, table, write_json

HERE = Path(__file__).resolve().parent


def parse_layout(name: str) -> tuple[int | None, int | None]:
    if not name or name == "auto":
        return None, None
    m = re.fullmatch(r"(?:u(\d+))?(?:r(\d+))?", name)
    if not m or not any(m.groups()):
        raise SystemExit(f"bad layout {name!r}: use e.g. u4, r2, u2r2")
    u, r = (int(g) if g else None for g in m.groups())
    return u or (1 if r else None), r or (1 if u else None)


def worker(args) -> None:
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext.parallel import enable_parallelism, init_distributed

    rank, world, device = init_distributed()
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**DIT_CONFIGS[args.model])
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    if args.ours:  # our defaults (fastest exact attention, fused kernels, regional compile) before the CP hooks
        from diffusers_wan_ext.runtime import optimize_transformer

        optimize_transformer(model, compile=args.compile, verbose=rank == 0)
    else:
        model.set_attention_backend(args.attention)
    layout = "1 GPU"
    if world > 1:
        ulysses, ring = parse_layout(args.layout)
        state = enable_parallelism(model, ulysses_degree=ulysses, ring_degree=ring, cfg_parallel=False)
        layout = f"U{state.ulysses_degree}xR{state.ring_degree}"
    compiled = args.ours and args.compile
    if args.compile and not args.ours:
        try:
            model.compile_repeated_blocks(fullgraph=True)
            compiled = True
        except Exception as exc:  # noqa: BLE001 - report and time eager
            print(f"compile failed: {exc}", flush=True)
    inputs = make_dit_inputs(args.model, device=device)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = model(**inputs)[0]
        dist.barrier()
        timing = cuda_time(lambda: model(**inputs), warmup=args.warmup, iters=args.iters)
    peak = torch.cuda.max_memory_allocated() / 2**30
    times = [None] * world
    dist.all_gather_object(times, (timing["median_s"], peak))
    if rank == 0:
        ref_path = Path(args.workdir, f"ref_{args.model}.pt")
        err = None
        if world == 1:
            torch.save(out.cpu(), ref_path)
        elif ref_path.exists():
            ref = torch.load(ref_path).to(out.device, torch.float32)
            diff = (out.float() - ref).abs()
            err = {"max_abs": diff.max().item(), "rel_l2": (diff.norm() / ref.norm()).item()}
        attention = next((str(m.processor._attention_backend) for m in model.modules()
                          if getattr(getattr(m, "processor", None), "_attention_backend", None)), args.attention)
        result = dict(model=args.model, gpus=world, layout=layout, compiled=compiled, attention=attention,
                      seconds=max(t for t, _ in times), peak_gib=max(p for _, p in times), runs=timing["runs"],
                      error_vs_1gpu=err)
        Path(args.workdir, f"res_{args.model}_{world}_{args.layout or 'auto'}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def driver(args) -> None:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_parallel_"))
    workdir.mkdir(parents=True, exist_ok=True)
    extra = {}
    for item in filter(None, args.layouts.split(",")):
        key, _, name = item.partition("=")
        extra.setdefault(key, []).append(name)
    rows, results = [], []
    for model in args.models.split(","):
        bases = {}
        for n in (int(g) for g in args.gpus.split(",")):
            if n > torch.cuda.device_count():
                print(f"skip {model} on {n} GPUs: only {torch.cuda.device_count()} here", flush=True)
                continue
            for layout in ["auto"] + (extra.get(f"{model}:{n}", []) if n > 1 else []):
                # extra layouts are correctness + timing checks: eager, to keep the run short
                compile_it = args.compile and layout == "auto"
                path = workdir / f"res_{model}_{n}_{layout}.json"
                for attempt_compile in ([True, False] if compile_it else [False]):
                    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--standalone",
                           str(Path(__file__).resolve()), "--worker", "--model", model, "--layout", layout,
                           "--workdir", str(workdir), "--attention", args.attention, "--warmup", str(args.warmup),
                           "--iters", str(args.iters)] + ([] if attempt_compile else ["--no-compile"]) + (
                               ["--ours"] if args.ours else [])
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode == 0 and path.exists():
                        break
                    print(f"{model} N={n} {layout} compile={attempt_compile} failed:\n{proc.stderr[-3000:]}", flush=True)
                if proc.returncode != 0 or not path.exists():
                    results.append(dict(model=model, gpus=n, layout=layout, failed=proc.stderr[-4000:]))
                    continue
                res = json.loads(path.read_text())
                if n == 1:
                    bases[res["compiled"]] = res["seconds"]
                base = bases.get(res["compiled"])  # speedup only against a 1-GPU run of the same mode
                res["speedup"] = base / res["seconds"] if base else None
                res["efficiency"] = res["speedup"] / n if base else None
                res["fraction_of_ideal"] = dit_flops(model) / (PEAK_BF16_TFLOPS * 1e12 * n) / res["seconds"]
                results.append(res)
                err = res["error_vs_1gpu"]
                rows.append({
                    "model": model, "GPUs": n, "layout": res["layout"], "attention": res["attention"],
                    "compiled": res["compiled"],
                    "s/forward": f"{res['seconds']:.4f}",
                    "speedup": f"{res['speedup']:.2f}x" if res["speedup"] else "",
                    "efficiency": f"{res['efficiency']:.0%}" if res["efficiency"] else "",
                    "of ideal": f"{res['fraction_of_ideal']:.2f}", "peak GiB": f"{res['peak_gib']:.1f}",
                    "rel err vs 1 GPU": f"{err['rel_l2']:.1e}" if err else "",
                })
                print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    if rows:
        print(table(rows, list(rows[0])))
    write_json("bench_parallel.json", {"env": env_info(), "attention": "ours" if args.ours else args.attention,
                                       "results": results})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1.3b,14b")
    p.add_argument("--gpus", default="1,2,4")
    p.add_argument("--layouts", default="", help="extra layouts per model:GPUs, e.g. 1.3b:4=u2r2,1.3b:2=r2")
    p.add_argument("--attention", default="_native_cudnn", help="Diffusers attention backend (context-parallel)")
    p.add_argument("--ours", action="store_true",
                   help="optimize_transformer defaults (flash-attn 4 when installed, fused kernels) instead of stock")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--workdir", default=os.environ.get("BENCH_WORKDIR"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--layout", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
