"""Exploratory GPU probe (issue 4, round 4): kernel breakdown of *our* configuration, to decide which fusions pay.

Sections (argv, default all): ``dit13`` / ``dit14`` -- one compiled forward of ours (``optimize_transformer``) with the
top kernels; ``vae`` -- stock and ours decode with the top kernels and the peak memory after each latent chunk;
``kernels`` -- our Triton kernels against the compiled stock expression at the benchmark shapes.
Prints short tables; JSON under $OUT.
"""

import gc
import sys
import time

import torch

from _common import DIT_CONFIGS, cuda_time, env_info, kernel_breakdown, make_dit_inputs, write_json

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
    for variant in ("ours", "ours+fusedqk") if name != "14b" else ("ours+fusedqk",):
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
    from diffusers_wan_ext.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

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
        out = qk_norm_rope(qkv, wq, wk, cos, sin, 1e-6, heads)
        err = max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(out, ref))
        maxd = max((o.float() - r.float()).abs().max().item() for o, r in zip(out, ref))
        nbytes = 4 * n * dim * 2
        row = {"model": name, "err": err, "max_abs": maxd}
        for label, fn in (("compiled stock expr", lambda: ref_fn(qkv, wq, wk, cos, sin, 1e-6, heads)),
                          ("triton", lambda: qk_norm_rope(qkv, wq, wk, cos, sin, 1e-6, heads))):
            t = cuda_time(fn, warmup=3, iters=20)["median_s"]
            row[label] = dict(ms=round(t * 1e3, 4), tbps=round(nbytes / t / 1e12, 2))
        res[f"qk_{name}"] = row
        print("qk_norm_rope", row, flush=True)


for s in sections:
    try:
        {"dit13": lambda: dit("1.3b"), "dit14": lambda: dit("14b"), "vae": vae, "kernels": kernels}[s]()
    except Exception as exc:  # keep going: one probe run per device call
        import traceback

        traceback.print_exc()
        res[f"{s}_error"] = repr(exc)
    write_json("probe_profile.json", res)
