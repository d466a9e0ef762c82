"""A full text-to-video generation spread over N GPUs (CFG parallel x Ulysses / Ring), timed end to end.

Default: Wan2.1-T2V-14B at 1280x720x81, 50 steps, CFG 5, on 8 GPUs, against the official Wan2.1 figure for that
setting (287.9 s on 8 H800/H100, Wan2.1 README's computational-efficiency table; the named peer, a published number).
Random weights at release sizes (umT5-XXL encoder, transformer, Wan2.1 VAE; timing does not depend on values), the
same seed on every rank. Variants (each its own ``torchrun`` launch):
  * ours  -- ``WanExtPipeline`` with ``optimize_transformer`` + ``optimize_vae`` on every rank, then
             ``enable_parallelism`` (CFG 2 x Ulysses N/2 on an even N); rank 0 decodes
  * stock -- ``diffusers.WanPipeline`` with Diffusers' context parallelism (Ulysses N; stock pipelines have no CFG
             parallel), cuDNN attention, regional compile
A 2-step call warms up (compilation, autotuning) before the timed call. Reports wall seconds (slowest rank, text
encoding and VAE decode included), per-step seconds and peak allocated GiB (largest rank).

Usage (GPU machine): python benchmarks/bench_parallel_generate.py --gpus 8 [--model 14b] [--steps 50]
    [--variants ours,stock] [--ulysses 4 --ring 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import env_info, table, write_json

OFFICIAL = {"14b": {8: 287.9}}  # seconds, Wan2.1 README (8 GPUs, 1280x720x81, 50 steps)
SIZES = {"14b": (720, 1280, 81), "1.3b": (480, 832, 81)}


def worker(args) -> None:
    import torch.distributed as dist

    from bench_pipeline import build_components
    from diffusers_wan_ext.parallel import enable_parallelism, init_distributed

    rank, world, device = init_distributed()
    t_build = time.time()
    comps = build_components(device, args.model)
    if args.variant == "ours":
        from diffusers_wan_ext import WanExtPipeline
        from diffusers_wan_ext.runtime import optimize_transformer, optimize_vae

        pipe = WanExtPipeline(**comps)
        optimize_transformer(pipe, verbose=rank == 0)
        optimize_vae(pipe.vae)
        state = enable_parallelism(pipe, ulysses_degree=args.ulysses, ring_degree=args.ring)
    else:
        from diffusers import WanPipeline

        pipe = WanPipeline(**comps)
        pipe.transformer.set_attention_backend("_native_cudnn")
        state = enable_parallelism(pipe, ulysses_degree=args.ulysses, ring_degree=args.ring, cfg_parallel=False)
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    h, w, f = SIZES[args.model]

    def call(steps):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.time()
        out = pipe(prompt="a corgi running on the beach at sunset", negative_prompt="blurry, low quality", height=h,
                   width=w, num_frames=f, num_inference_steps=steps, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").frames
        torch.cuda.synchronize()
        return out, time.time() - t0

    call(2)
    setup = time.time() - t_build
    torch.cuda.reset_peak_memory_stats()
    out, seconds = call(args.steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    decoded = torch.is_tensor(out) and out.ndim == 5 and out.shape[2] == 3
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (seconds, peak, bool(decoded)))
    if rank == 0:
        Path(args.workdir, f"gen_{args.variant}_{world}.json").write_text(json.dumps(dict(
            variant=args.variant, model=args.model, gpus=world, layout=state.describe(), steps=args.steps,
            seconds=max(s for s, _, _ in per_rank), peak_gib=max(p for _, p, _ in per_rank),
            decoded_ranks=[r for r, (_, _, d) in enumerate(per_rank) if d], setup_s=setup)))
    dist.barrier()
    dist.destroy_process_group()


def driver(args) -> None:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pgen_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows, results = [], []
    for variant in args.variants.split(","):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.gpus}", "--standalone",
               str(Path(__file__).resolve()), "--worker", "--variant", variant, "--model", args.model,
               "--steps", str(args.steps), "--workdir", str(workdir)]
        cmd += [x for k in ("ulysses", "ring") if getattr(args, k) for x in (f"--{k}", str(getattr(args, k)))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        path = workdir / f"gen_{variant}_{args.gpus}.json"
        if proc.returncode != 0 or not path.exists():
            print(f"{variant} failed:\n{proc.stderr[-4000:]}", flush=True)
            results.append(dict(variant=variant, failed=proc.stderr[-4000:]))
            continue
        res = json.loads(path.read_text())
        official = OFFICIAL.get(args.model, {}).get(args.gpus) if args.steps == 50 else None
        res["official_s"] = official
        results.append(res)
        rows.append({"variant": variant, "model": args.model, "GPUs": args.gpus, "layout": res["layout"],
                     "steps": args.steps, "s": f"{res['seconds']:.1f}", "s/step": f"{res['seconds'] / args.steps:.2f}",
                     "peak GiB": f"{res['peak_gib']:.1f}",
                     "vs official": f"{official / res['seconds']:.2f}x" if official else ""})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    if rows:
        print()
        print(table(rows, list(rows[0])))
    write_json("bench_parallel_generate.json", {"env": env_info(), "results": results})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--model", default="14b", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--variants", default="ours")
    p.add_argument("--ulysses", type=int, default=None)
    p.add_argument("--ring", type=int, default=None)
    p.add_argument("--workdir", default=os.environ.get("BENCH_WORKDIR"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    elif args.gpus > torch.cuda.device_count():
        raise SystemExit(f"--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA devices here")
    else:
        driver(args)


if __name__ == "__main__":
    main()
