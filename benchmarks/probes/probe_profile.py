"""Exploratory GPU probe (issue 4, round 4): kernel breakdown of *our* configuration, to decide which fusions pay.

Sections (argv, default all): ``dit13`` / ``dit14`` -- one compiled forward of ours (``optimize_transformer``) with the
top kernels; ``vae`` -- stock and ours decode with the top kernels and the peak memory after each latent chunk;
``kernels`` -- our Triton kernels against the compiled stock expression at the benchmark shapes.
Prints short tables; JSON under $OUT.
"""

import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common.py
from _common import DIT_CONFIGS, cuda_time, env_info, kernel_breakdown, make_dit_inputs, write_json  # noqa: E402

res = {"env": env_info()}
print(res["env"], flush=True)
sections = sys.argv[1:] or ["kernels", "dit13", "vae", "dit14"]


def show(tag, bd, n=22):
    print(f"--- {tag}: " + ", ".join(f"{k} {v:.4f}s" for k, v in bd["by_category_s"].items()), flush=True)
    for name, s, count, cat in bd["top"][:n]:
        print(f"  {s:8.4f}s x{count:4d} {cat:9s} {name[:110]}", flush=True)


def dit(name):
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext.runtime import optimize_transformer

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**DIT_CONFIGS[name]).to(torch.bfloat16).eval().requires_grad_(False)
    inputs = make_dit_inputs(name)
    for variant in ("ours+fusedqk",):
        rep = optimize_transformer(model, fused_qk_rope=variant.endswith("fusedqk"))
        with torch.no_grad():
            t0 = time.time()
            model(**inputs)
            torch.cuda.synchronize()
            setup = time.time() - t0
            t = cuda_time(lambda: model(**inputs), warmup=1, iters=2 if name == "14b" else 5)
            bd = kernel_breakdown(lambda: model(**inputs), top=30)
        res[f"dit_{name}_{variant}"] = dict(report=rep, setup_s=setup, time=t, breakdown=bd)
        show(f"{name} {variant} {t['median_s']:.4f}s (setup {setup:.0f}s) {rep}", bd)
        torch._dynamo.reset()
    del model
    gc.collect()
    torch.cuda.empty_cache()


def vae():
    from diffusers import AutoencoderKLWan

    from diffusers_wan_ext.runtime import optimize_vae

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoencoderKLWan().to(torch.bfloat16).eval()
    z = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    peaks = []
    orig = model.decoder.forward

    def traced(*a, **k):
        torch.cuda.reset_peak_memory_stats()
        out = orig(*a, **k)
        peaks.append(round(torch.cuda.max_memory_allocated() / 2**30, 2))
        return out

    model.decoder.forward = traced
    with torch.no_grad():
        for variant in ("stock", "ours"):
            if variant == "ours":
                optimize_vae(model)
            model.decode(z, return_dict=False)
            torch.cuda.synchronize()
            peaks.clear()
            torch.cuda.reset_peak_memory_stats()
            t = cuda_time(lambda: model.decode(z, return_dict=False), warmup=0, iters=1)
            total_peak = torch.cuda.max_memory_allocated() / 2**30
            chunk_peaks = list(peaks)
            bd = kernel_breakdown(lambda: model.decode(z, return_dict=False), top=40)
            res[f"vae_{variant}"] = dict(time=t, peak=total_peak, chunk_peaks=chunk_peaks, breakdown=bd)
            print(f"vae {variant}: {t['median_s']:.3f}s peak {total_peak:.2f} GiB, per-chunk peaks {chunk_peaks[:4]}..."
                  f"{chunk_peaks[-2:]}; resident after {torch.cuda.memory_allocated() / 2**30:.2f}", flush=True)
            show(f"vae {variant}", bd, n=40)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def kernels():
    from diffusers_wan_ext.ops.qk_norm_rope import _autotuned, qk_norm_rope, qk_norm_rope_reference

    for name, heads, dim in (("1.3b", 12, 1536), ("14b", 40, 5120), ("ti2v-5b", 24, 3072)):
        n = {"1.3b": 32760, "14b": 75600, "ti2v-5b": 27280}[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        qkv = torch.randn(1, n, 3 * dim, device="cuda", dtype=torch.bfloat16, generator=g)
        wq = torch.rand(dim, device="cuda", dtype=torch.bfloat16, generator=g) + 0.5
        wk = torch.rand(dim, device="cuda", dtype=torch.bfloat16, generator=g) + 0.5
        ang = torch.rand(1, n, 1, 64, device="cuda", generator=g) * 6
        cos = torch.cos(ang).repeat_interleave(2, -1)
        sin = torch.sin(ang).repeat_interleave(2, -1)
        ref_fn = torch.compile(qk_norm_rope_reference, fullgraph=True)
        ref = ref_fn(qkv, wq, wk, cos, sin, 1e-6, heads)
        row = {"model": name}
        nbytes = 4 * n * dim * 2
        t = cuda_time(lambda: ref_fn(qkv, wq, wk, cos, sin, 1e-6, heads), warmup=3, iters=20)["median_s"]
        row["compiled stock expr"] = dict(ms=round(t * 1e3, 4), tbps=round(nbytes / t / 1e12, 2))
        for hf, padded in ((False, False), (True, False), (False, True), (True, True)):
            import diffusers_wan_ext.ops.qk_norm_rope as qmod

            qmod.PADDED_HEADS = padded
            if padded:
                qmod._autotuned.cache.clear()
            out = qk_norm_rope(qkv, wq, wk, cos, sin, 1e-6, heads, heads_first=hf)
            row[f"err hf={hf}"] = max(((o.float() - r.float()).norm() / r.float().norm()).item()
                                      for o, r in zip(out, ref))
            t = cuda_time(lambda: qk_norm_rope(qkv, wq, wk, cos, sin, 1e-6, heads, heads_first=hf),
                          warmup=3, iters=20)["median_s"]
            b = nbytes * (1.5 if hf else 1.0)
            row[f"triton hf={hf} padded={padded}"] = dict(ms=round(t * 1e3, 4), tbps=round(b / t / 1e12, 2),
                                          best=str(_autotuned.best_config))
        qmod.PADDED_HEADS = False
        qmod._autotuned.cache.clear()
        res[f"qk_{name}"] = row
        print("qk_norm_rope", row, flush=True)


def opts():
    """Regional-compile Inductor options on ours (1.3B, then 14B with the options that won on 1.3B)."""
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext.runtime import optimize_transformer

    variants = {"default": {}, "multi_kernel": {"triton.multi_kernel": 1},
                "coord": {"coordinate_descent_tuning": True},
                "multi+coord": {"triton.multi_kernel": 1, "coordinate_descent_tuning": True}}
    best = {}
    for name in ("1.3b", "14b"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = WanTransformer3DModel(**DIT_CONFIGS[name]).to(torch.bfloat16).eval().requires_grad_(False)
        inputs = make_dit_inputs(name)
        todo = variants if name == "1.3b" else {k: variants[k] for k in ["default"] + sorted(best, key=best.get)[:1]}
        for label, options in todo.items():
            torch._dynamo.reset()
            optimize_transformer(model, compile_options=options, verbose=False)
            with torch.no_grad():
                t0 = time.time()
                model(**inputs)
                torch.cuda.synchronize()
                setup = time.time() - t0
                t = cuda_time(lambda: model(**inputs), warmup=1, iters=10 if name == "1.3b" else 2)
            if name == "1.3b" and label != "default":
                best[label] = t["median_s"]
            res[f"opts {name} {label}"] = dict(setup_s=round(setup, 1), **t)
            print(f"opts {name} {label}: median {t['median_s']:.4f} min {t['min_s']:.4f} setup {setup:.0f}s",
                  flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()


def vaemem():
    """Where the fast decode's peak comes from: per-conv peak deltas, a conv3d microbenchmark, cudnn.benchmark."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKLWan

    from diffusers_wan_ext.runtime import optimize_vae

    shape = (1, 96, 6, 480, 832)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last_3d)
    w = torch.randn(96, 96, 3, 3, 3, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last_3d)
    xc, wc = x.contiguous(), w.contiguous()
    cases = {"cl pad(0,1,1)": lambda: F.conv3d(x, w, None, 1, (0, 1, 1)),
             "cl F.pad + pad0": lambda: F.conv3d(F.pad(x, (1, 1, 1, 1)), w),
             "contig pad(0,1,1)": lambda: F.conv3d(xc, wc, None, 1, (0, 1, 1)),
             "contig F.pad + pad0": lambda: F.conv3d(F.pad(xc, (1, 1, 1, 1)), wc)}
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        for label, fn in cases.items():
            with torch.no_grad():
                fn()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t = cuda_time(fn, warmup=1, iters=5)["median_s"]
                extra = (torch.cuda.max_memory_allocated() - base) / 2**30
            res[f"conv {label} bench={bench}"] = dict(ms=round(t * 1e3, 2), extra_gib=round(extra, 2))
            print(f"conv {label} bench={bench}: {t * 1e3:.2f} ms, extra {extra:.2f} GiB", flush=True)
    torch.backends.cudnn.benchmark = False
    del x, w, xc, wc

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLWan().to(torch.bfloat16).eval()
    optimize_vae(vae)
    z = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    records = []
    orig = F.conv3d

    def traced(inp, weight, *a, **k):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = orig(inp, weight, *a, **k)
        torch.cuda.synchronize()
        records.append((tuple(inp.shape), tuple(weight.shape), str(a[1:2] or k.get("padding")),
                        round(base / 2**30, 2), round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)))
        return out

    with torch.no_grad():
        vae.decode(z, return_dict=False)
        torch.nn.functional.conv3d = traced
        try:
            vae.decode(z, return_dict=False)
        finally:
            torch.nn.functional.conv3d = orig
    top = sorted(records, key=lambda r: -(r[3] + r[4]))[:12]
    res["vae conv peaks"] = top
    for r in top:
        print("vae conv", r, flush=True)
    for bench in (True,):
        torch.backends.cudnn.benchmark = bench
        with torch.no_grad():
            vae.decode(z, return_dict=False)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = cuda_time(lambda: vae.decode(z, return_dict=False), warmup=0, iters=2)["median_s"]
        peak = torch.cuda.max_memory_allocated() / 2**30
        res[f"vae ours cudnn.benchmark={bench}"] = dict(s=t, peak=peak)
        print(f"vae ours cudnn.benchmark={bench}: {t:.3f}s peak {peak:.2f}", flush=True)
    torch.backends.cudnn.benchmark = False


def vaetrace():
    """Every aten op of one fast decode with the allocated memory before it and its peak increase (top 12)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode
    from diffusers import AutoencoderKLWan

    from diffusers_wan_ext.runtime import optimize_vae

    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLWan().to(torch.bfloat16).eval()
    optimize_vae(vae)
    z = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    records = []

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = func(*args, **(kwargs or {}))
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            if peak > 5 * 2**30:
                where = [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                         if "diffusers" in f.filename][-3:]
                shapes = [tuple(a.shape) for a in args if torch.is_tensor(a)][:3]
                records.append((round(peak / 2**30, 2), round(base / 2**30, 2), str(func), shapes, where))
            return out

    with torch.no_grad():
        vae.decode(z, return_dict=False)
        with Trace():
            vae.decode(z, return_dict=False)
    top = sorted(records, key=lambda r: -r[0])[:12]
    res["vae trace"] = top
    print(f"vae trace: {len(records)} ops above 5 GiB", flush=True)
    for r in top:
        print("  ", r, flush=True)


def gaps():
    """GPU idle time inside one compiled forward of ours (1.3B), and the same forward replayed as a CUDA graph."""
    from torch.profiler import ProfilerActivity, profile
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext.runtime import optimize_transformer

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**DIT_CONFIGS["1.3b"]).to(torch.bfloat16).eval().requires_grad_(False)
    inputs = make_dit_inputs("1.3b")
    optimize_transformer(model, verbose=False)
    with torch.no_grad():
        for _ in range(2):
            model(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model(**inputs)
            torch.cuda.synchronize()
        kern = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
        idle, big = 0.0, []
        for a, b in zip(kern, kern[1:]):
            gap = b.time_range.start - a.time_range.end
            if gap > 0:
                idle += gap
                if gap > 200:
                    big.append((round(gap), a.name[:50], b.name[:50]))
        span = kern[-1].time_range.end - kern[0].time_range.start
        syncs = [e.name for e in prof.events() if "ynchronize" in e.name or "Memcpy" in e.name]
        res["gaps"] = dict(idle_ms=idle / 1e3, span_ms=span / 1e3, big=big[:20], syncs=syncs[:20])
        print(f"gaps: idle {idle / 1e3:.1f} ms of {span / 1e3:.1f} ms; big gaps {big[:8]}; syncs {syncs[:6]}",
              flush=True)
        t_eager = cuda_time(lambda: model(**inputs), warmup=1, iters=10)
        try:
            static = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs.items()}
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    model(**static)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(**static)
            t_graph = cuda_time(graph.replay, warmup=1, iters=10)
            res["cuda graph"] = dict(eager=t_eager, graph=t_graph)
            print(f"cuda graph: {t_graph['median_s']:.4f} s vs {t_eager['median_s']:.4f} s", flush=True)
        except Exception as exc:  # noqa: BLE001
            res["cuda graph"] = repr(exc)[:300]
            print("cuda graph failed:", repr(exc)[:300], flush=True)


def cross():
    """Cross-attention (512 text keys) and self-attention kernels at the benchmark shapes, per backend/tile."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from diffusers_wan_ext.runtime.flash4 import _flash4_import

    fa4, reason = _flash4_import()
    print("fa4:", reason or "ok", flush=True)
    for name, n, heads in (("1.3b", 32760, 12), ("14b", 75600, 40)):
        for kind, nk in (("cross", 512), ("self", n)):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, n, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, nk, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, nk, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            flops = 4 * n * nk * 128 * heads
            cases = {"cudnn": lambda: _sdpa(F, sdpa_kernel, SDPBackend.CUDNN_ATTENTION, q, k, v)}
            if fa4 is not None:
                tiles = [None] + ([(128, 64), (128, 96), (128, 176), (64, 128)] if kind == "cross" else [])
                for tile in tiles:
                    cases[f"fa4 {tile}"] = (lambda tile=tile: fa4(q, k, v, None, False, tile and (*tile, True, True)))
                if kind == "self":
                    for rs, ol in ((False, True), (True, False)):
                        cases[f"fa4 rs={rs} ol={ol}"] = (lambda rs=rs, ol=ol: _fa4_flags(q, k, v, rs, ol))
            for label, fn in cases.items():
                try:
                    t = cuda_time(fn, warmup=2, iters=10 if kind == "cross" else 5)["median_s"]
                    row = dict(ms=round(t * 1e3, 3), tflops=round(flops / t / 1e12))
                except Exception as exc:  # noqa: BLE001 - report and go on
                    row = dict(error=repr(exc)[:160])
                res[f"attn {name} {kind} {label}"] = row
                print(f"attn {name} {kind} {label}: {row}", flush=True)


def _sdpa(F, sdpa_kernel, backend, q, k, v):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


def _fa4_flags(q, k, v, rs, ol):
    from flash_attn.cute.interface import _flash_attn_fwd

    return _flash_attn_fwd(q, k, v, mma_pv_is_rs=rs, intra_wg_overlap=ol)


for s in sections:
    try:
        {"dit13": lambda: dit("1.3b"), "dit14": lambda: dit("14b"), "vae": vae, "kernels": kernels,
         "cross": cross, "opts": opts,
         "vaemem": vaemem, "gaps": gaps,
         "vaetrace": vaetrace}[s]()
    except Exception as exc:  # keep going: one probe run per device call
        import traceback

        traceback.print_exc()
        res[f"{s}_error"] = repr(exc)
    write_json("probe_profile.json", res)
