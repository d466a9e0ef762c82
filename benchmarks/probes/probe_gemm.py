"""Exploratory GPU probe (issue 4, round 5): the transformer's GEMMs and LayerNorm kernels at the benchmark shapes.

Sections (argv, default all):
  ``gemm``  -- every linear layer of a Wan block at the 14B (and 1.3B) 720p/480p token count: cuBLAS as PyTorch calls
               it (linear + bias, plain mm, addmm with a full C, GELU epilogue) against quack's CuTe-DSL GEMM (default
               config and a list of explicit sm90 configs, plain and with the residual added in the epilogue);
  ``norm``  -- the block's LayerNorm + modulation (+ residual) expressions compiled by Inductor with our options,
               against our Triton kernels when present.
Prints TFLOP/s and TB/s per case; JSON under $OUT.
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common.py
from _common import cuda_time, env_info, write_json  # noqa: E402

res = {"env": env_info()}
print(res["env"], flush=True)
sections = [a for a in sys.argv[1:] if not a.startswith("--")] or ["gemm", "norm"]
ONLY = next((a.split("=", 1)[1].split(",") for a in sys.argv[1:] if a.startswith("--only=")), None)
DEV = "cuda"
BF = torch.bfloat16

#: (tag, tokens, in_features, out_features) of the block's GEMMs
SHAPES = {
    "14b": [("qkv", 75600, 5120, 15360), ("o", 75600, 5120, 5120), ("ffn1", 75600, 5120, 13824),
            ("ffn2", 75600, 13824, 5120)],
    "1.3b": [("qkv", 32760, 1536, 4608), ("o", 32760, 1536, 1536), ("ffn1", 32760, 1536, 8960),
             ("ffn2", 32760, 8960, 1536)],
}


def sustained(fn, reps=10, iters=3):
    t = cuda_time(lambda: [fn() for _ in range(reps)], warmup=1, iters=iters)
    return t["median_s"] / reps


def round_robin(cases: dict, rounds: int, burst: int) -> dict:
    """Per case, the seconds per call of each round: one burst of every case per round, so clock drift hits all."""
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(burst):
                fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / burst)
    return times


def gemm():
    try:
        from quack.gemm_config import GemmConfig
        from quack.gemm_interface import gemm as qgemm
        from quack.gemm_interface import gemm_add_inplace, gemm_tuned
    except Exception as exc:  # noqa: BLE001
        print("quack unavailable:", type(exc).__name__, str(exc)[:200], flush=True)
        qgemm = None
    cfgs = [(256, 128, False), (256, 160, False), (256, 192, False), (256, 208, False), (128, 256, False),
            (128, 224, False), (128, 128, True), (128, 160, True), (128, 192, True), (128, 208, True),
            (192, 128, True)]
    for model in ("14b", "1.3b"):
        for tag, m, k, n in SHAPES[model]:
            a = torch.randn(m, k, device=DEV, dtype=BF)
            w = torch.randn(n, k, device=DEV, dtype=BF) / k ** 0.5
            b = torch.randn(n, device=DEV, dtype=BF)
            c = torch.randn(m, n, device=DEV, dtype=BF)
            out = torch.empty(m, n, device=DEV, dtype=BF)
            flop = 2 * m * n * k
            cases = {
                "cublas linear+bias": lambda: F.linear(a, w, b),
                "cublas mm": lambda: a @ w.t(),
                "cublas addmm C": lambda: torch.addmm(c, a, w.t()),
                "cublas addmm C out=C": lambda: torch.addmm(c, a, w.t(), out=c),
            }
            if tag == "ffn1":
                cases["cublas gelu epi"] = lambda: torch._addmm_activation(b, a, w.t(), use_gelu=True)
            if qgemm is not None:
                wt = w.t()
                cases["quack default+bias"] = lambda: qgemm(a, wt, out=out, bias=b, tuned=False)
                cases["quack default"] = lambda: qgemm(a, wt, out=out, tuned=False)
                cases["quack add_inplace+bias"] = lambda: gemm_add_inplace(a, wt, c, bias=b, tuned=False)
                if model == "14b" and tag in ("o", "qkv"):
                    for tm, tn, pp in cfgs:
                        for cl in ((2, 1),):
                            cfg = GemmConfig(tile_m=tm, tile_n=tn, pingpong=pp, cluster_m=cl[0], cluster_n=cl[1],
                                             swap_ab=False, device_capacity=9, is_dynamic_persistent=False)
                            cases[f"quack {tm}x{tn}{'pp' if pp else 'co'} c{cl[0]}{cl[1]}+bias"] = (
                                lambda cfg=cfg: gemm_tuned.fn(a, wt, out, None, bias=b, config=cfg))
            for name, fn in cases.items():
                t0 = time.time()
                try:
                    fn()
                    torch.cuda.synchronize()
                    setup = time.time() - t0
                    s = sustained(fn)
                except Exception as exc:  # noqa: BLE001
                    print(f"gemm {model} {tag} {name}: FAILED {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    res[f"gemm {model} {tag} {name}"] = {"error": str(exc)[:300]}
                    continue
                res[f"gemm {model} {tag} {name}"] = dict(s=s, tflops=flop / s / 1e12, setup_s=setup)
                print(f"gemm {model} {tag:5s} {name:32s} {s * 1e3:8.3f} ms {flop / s / 1e12:6.1f} TFLOP/s "
                      f"(setup {setup:.1f}s)", flush=True)
            del a, w, b, c, out
            torch.cuda.empty_cache()


def gemmrr():
    """Round-robin timing (one burst of each candidate per round) so clock drift hits every candidate alike."""
    import statistics

    from quack.gemm_config import GemmConfig
    from quack.gemm_interface import gemm as qgemm
    from quack.gemm_interface import gemm_act, gemm_tuned

    def cfg(tm, tn, pp=False, cl=(2, 1)):
        return GemmConfig(tile_m=tm, tile_n=tn, pingpong=pp, cluster_m=cl[0], cluster_n=cl[1], swap_ab=False,
                          device_capacity=9, is_dynamic_persistent=False)

    configs = {"256x192": cfg(256, 192), "256x160": cfg(256, 160), "256x208": cfg(256, 208),
               "256x192c12": cfg(256, 192, cl=(1, 2)), "128x256": cfg(128, 256), "128x208pp": cfg(128, 208, True)}
    for model in ("14b", "1.3b"):
        for tag, m, k, n in SHAPES[model]:
            if ONLY and tag not in ONLY:
                continue
            a = torch.randn(m, k, device=DEV, dtype=BF)
            w = torch.randn(n, k, device=DEV, dtype=BF) / k ** 0.5
            wt = w.t()
            b = torch.randn(n, device=DEV, dtype=BF)
            out = torch.empty(m, n, device=DEV, dtype=BF)
            flop = 2 * m * n * k
            cases = {"cublas linear+bias": lambda: F.linear(a, w, b), "cublas mm": lambda: a @ wt,
                     "quack default+bias": lambda: qgemm(a, wt, out=out, bias=b, tuned=False)}
            for cname, c in configs.items():
                cases[f"quack {cname}+bias"] = lambda c=c: gemm_tuned.fn(a, wt, out, None, bias=b, config=c)
            if tag == "ffn1":
                cases["cublas gelu epi"] = lambda: torch._addmm_activation(b, a, wt, use_gelu=True)
                cases["quack gelu default"] = lambda: gemm_act(a, wt, bias=b, activation="gelu_tanh_approx",
                                                               postact_out=out, store_preact=False, tuned=False)
                for cname in ("256x192", "256x192c12", "128x256", "128x208pp"):
                    cases[f"quack gelu {cname}"] = lambda c=configs[cname]: gemm_act(
                        a, wt, bias=b, activation="gelu_tanh_approx", postact_out=out, store_preact=False,
                        tuned=False, config=c)
            ok = {}
            for name, fn in cases.items():
                try:
                    fn()
                    torch.cuda.synchronize()
                    ok[name] = fn
                except Exception as exc:  # noqa: BLE001
                    print(f"rr {model} {tag} {name}: FAILED {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            if ok:  # correctness of the quack paths against cuBLAS on this shape
                ref = F.linear(a, w, b)
                checks = [("quack 128x256+bias", ref)]
                if tag == "ffn1":
                    checks.append(("quack gelu 256x192", F.gelu(ref.float(), approximate="tanh")))
                for cname, want in checks:
                    if cname in ok:
                        ok[cname]()
                        err = ((out.float() - want.float()).norm() / want.float().norm()).item()
                        print(f"rr {model} {tag} {cname}: rel err vs cuBLAS {err:.2e}", flush=True)
                        res[f"rr {model} {tag} {cname} err"] = err
            times = round_robin(ok, 8, 5 if model == "14b" else 20)
            base = statistics.median(times["cublas linear+bias"])
            for name, ts in times.items():
                s = statistics.median(ts)
                res[f"rr {model} {tag} {name}"] = dict(s=s, tflops=flop / s / 1e12, runs=ts)
                print(f"rr {model:4s} {tag:5s} {name:26s} {s * 1e3:8.3f} ms {flop / s / 1e12:6.1f} TFLOP/s "
                      f"x{base / s:5.3f}", flush=True)
            del a, w, b, out
            torch.cuda.empty_cache()


def bias():
    """cuBLAS with the bias in its epilogue against the plain GEMM, round-robin, 16 rounds: does deferring the bias
    to the kernel that reads the output pay?"""
    import statistics

    for model in ("14b", "1.3b"):
        for tag, m, k, n in SHAPES[model]:
            a = torch.randn(m, k, device=DEV, dtype=BF)
            w = torch.randn(n, k, device=DEV, dtype=BF) / k ** 0.5
            b = torch.randn(n, device=DEV, dtype=BF)
            cases = {"linear+bias": lambda: F.linear(a, w, b), "mm": lambda: F.linear(a, w)}
            if tag == "ffn1":
                cases["gelu+bias epi"] = lambda: torch._addmm_activation(b, a, w.t(), use_gelu=True)
            for fn in cases.values():
                fn()
            times = round_robin(cases, 16, 4 if model == "14b" else 16)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            wins = sum(x < y for x, y in zip(times["mm"], times["linear+bias"]))
            res[f"bias {model} {tag}"] = dict(med, runs=times)
            print(f"bias {model:4s} {tag:5s} " + " ".join(f"{k} {v * 1e3:.3f}ms" for k, v in med.items())
                  + f" | mm/bias {med['linear+bias'] / med['mm']:.3f}x, mm faster in {wins}/16 rounds", flush=True)
            del a, w, b
            torch.cuda.empty_cache()


def norm():
    from diffusers_wan_ext.runtime.speed import COMPILE_OPTIONS

    m, d = 75600, 5120
    x = torch.randn(1, m, d, device=DEV, dtype=BF)
    a = torch.randn(1, m, d, device=DEV, dtype=BF)
    sc, sh, g = (torch.randn(1, 1, d, device=DEV) * 0.1 for _ in range(3))
    w2, b2 = torch.randn(d, device=DEV), torch.randn(d, device=DEV)
    eps = 1e-6

    def k1(x, sc, sh):
        return (F.layer_norm(x.float(), (d,), eps=eps) * (1 + sc) + sh).type_as(x)

    def kb(x, a, g):
        x = (x.float() + a * g).type_as(x)
        return x, F.layer_norm(x.float(), (d,), w2, b2, eps).type_as(x)

    def kc(x, a, sc, sh):
        x = x + a
        return x, (F.layer_norm(x.float(), (d,), eps=eps) * (1 + sc) + sh).type_as(x)

    def kd(x, a, g):
        return (x.float() + a.float() * g).type_as(x)

    nbytes = x.numel() * 2
    cases = {"k1 ln+mod": (k1, (x, sc, sh), 2), "kb res+ln_affine": (kb, (x, a, g), 4),
             "kc res+ln+mod": (kc, (x, a, sc, sh), 4), "kd gated res": (kd, (x, a, g), 3)}
    for opts_name, opts in (("inductor ours", COMPILE_OPTIONS), ("inductor default", {})):
        for name, (fn, args, passes) in cases.items():
            cf = torch.compile(fn, fullgraph=True, options=dict(opts))
            t0 = time.time()
            cf(*args)
            torch.cuda.synchronize()
            setup = time.time() - t0
            s = sustained(lambda: cf(*args))
            tbs = passes * nbytes / s / 1e12
            res[f"norm {name} {opts_name}"] = dict(s=s, tbs=tbs, setup_s=setup)
            print(f"norm {name:18s} {opts_name:16s} {s * 1e3:7.3f} ms {tbs:5.2f} TB/s (setup {setup:.0f}s)",
                  flush=True)
    try:
        from diffusers_wan_ext.ops import layer_norm_mod as lnm
    except ImportError:
        lnm = None
    if lnm is not None:
        ours = {"k1 ln+mod": (lambda: lnm.ln_modulate(x, None, None, sc, sh, None, None, eps), 2),
                "kb res+ln_affine": (lambda: lnm.ln_modulate(x, a, g, None, None, w2, b2, eps), 4),
                "kc res+ln+mod": (lambda: lnm.ln_modulate(x, a, None, sc, sh, None, None, eps), 4)}
        for name, (fn, passes) in ours.items():
            fn()
            s = sustained(fn)
            tbs = passes * nbytes / s / 1e12
            res[f"norm {name} triton ours"] = dict(s=s, tbs=tbs)
            print(f"norm {name:18s} {'triton ours':16s} {s * 1e3:7.3f} ms {tbs:5.2f} TB/s", flush=True)
        want, got = kc(x, a, sc, sh), lnm.ln_modulate(x, a, None, sc, sh, None, None, eps)
        print("kc max abs diff", [(u.float() - v.float()).abs().max().item() for u, v in zip(want, got)], flush=True)
    bw = torch.empty(4 * 2**30, device=DEV, dtype=torch.uint8)
    s = sustained(lambda: bw[: 2**31].copy_(bw[2**31:]))
    res["copy_tbs"] = 2 * 2**31 / s / 1e12
    print(f"device copy {res['copy_tbs']:.2f} TB/s", flush=True)


for sec in sections:
    {"gemm": gemm, "gemmrr": gemmrr, "bias": bias, "norm": norm}[sec]()
write_json("probe_gemm.json", res)
