"""Exploratory GPU probe (first run of issue 4): where does a Wan forward spend its time?

Times attention kernels and GEMMs at the benchmark shapes, a stock 1.3B forward (eager, compiled) with a kernel
breakdown, and the stock VAE decode under a few settings. Prints a short table; full JSON under $OUT.
"""

import gc
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common.py
from _common import (DIT_CONFIGS, cuda_time, dit_flops, env_info, kernel_breakdown, make_dit_inputs, peak_memory,  # noqa: E402
                     table, write_json)

res = {"env": env_info()}
rows = []
print(res["env"], flush=True)
sections = sys.argv[1:] or ["attn", "gemm", "dit", "vae"]


def attn_case(heads, s, label):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, s, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    flops = 4 * s * s * 128 * heads
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        for layout in ("bshd_view", "bhsd_contig"):
            if layout == "bshd_view":
                qq, kk, vv = (t.transpose(1, 2) for t in (q, k, v))
            else:
                qq, kk, vv = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            try:
                with sdpa_kernel(backend):
                    t = cuda_time(lambda: F.scaled_dot_product_attention(qq, kk, vv), warmup=2, iters=5)
                rows.append(dict(what=f"attn {label} {backend.name} {layout}", s=round(t["median_s"], 4),
                                 tflops=round(flops / t["median_s"] / 1e12)))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(what=f"attn {label} {backend.name} {layout}", s="ERR " + str(e)[:60]))
            print(rows[-1], flush=True)
    del q, k, v


if "attn" in sections:
    attn_case(12, 32760, "1.3b")
    attn_case(40, 75600, "14b")
    attn_case(24, 27280, "5b")
    try:
        import flash_attn  # noqa: F401
        res["flash_attn"] = flash_attn.__version__
    except Exception as e:  # noqa: BLE001
        res["flash_attn"] = repr(e)

if "gemm" in sections:
    for m, k, n in [(32760, 1536, 1536), (32760, 1536, 4608), (32760, 1536, 8960), (32760, 8960, 1536),
                    (75600, 5120, 5120), (75600, 5120, 13824), (75600, 13824, 5120)]:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        t = cuda_time(lambda: F.linear(a, w), warmup=3, iters=10)
        rows.append(dict(what=f"gemm {m}x{k}x{n}", s=round(t["median_s"], 5), tflops=round(2 * m * k * n / t["median_s"] / 1e12)))
        print(rows[-1], flush=True)
        del a, w

if "dit" in sections:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**DIT_CONFIGS["1.3b"]).to(torch.bfloat16).eval()
    inputs = make_dit_inputs("1.3b")
    fl = dit_flops("1.3b")
    with torch.no_grad():
        with peak_memory() as pm:
            t = cuda_time(lambda: model(**inputs), warmup=2, iters=3)
        rows.append(dict(what="stock 1.3b eager", s=round(t["median_s"], 4), tflops=round(fl / t["median_s"] / 1e12), peak=round(pm["peak_gib"], 2)))
        print(rows[-1], flush=True)
        res["stock_eager_profile"] = kernel_breakdown(lambda: model(**inputs))
        print(res["stock_eager_profile"]["by_category_s"], flush=True)
        t0 = time.time()
        model.compile_repeated_blocks(fullgraph=True)
        model(**inputs)
        torch.cuda.synchronize()
        res["compile_s"] = time.time() - t0
        with peak_memory() as pm:
            t = cuda_time(lambda: model(**inputs), warmup=1, iters=5)
        rows.append(dict(what="stock 1.3b compiled", s=round(t["median_s"], 4), tflops=round(fl / t["median_s"] / 1e12), peak=round(pm["peak_gib"], 2)))
        print(rows[-1], flush=True)
        res["stock_compiled_profile"] = kernel_breakdown(lambda: model(**inputs))
        print(res["stock_compiled_profile"]["by_category_s"], flush=True)
        for n, d, c, cat in res["stock_compiled_profile"]["top"][:15]:
            print(f"  {d:8.4f}s x{c:4d} {cat:9s} {n[:90]}", flush=True)
    del model, inputs
    gc.collect()
    torch.cuda.empty_cache()

if "vae" in sections:
    from diffusers import AutoencoderKLWan

    with torch.device("cuda"):
        vae = AutoencoderKLWan().to(torch.bfloat16).eval()
    z = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for bench, cl in [(False, False), (True, False), (True, True)]:
            torch.backends.cudnn.benchmark = bench
            if cl:
                vae = vae.to(memory_format=torch.channels_last_3d)
            with peak_memory() as pm:
                t = cuda_time(lambda: vae.decode(z, return_dict=False), warmup=1, iters=3)
            rows.append(dict(what=f"vae decode bench={bench} cl3d={cl}", s=round(t["median_s"], 3), peak=round(pm["peak_gib"], 2)))
            print(rows[-1], flush=True)
        torch.backends.cudnn.benchmark = True
        res["vae_profile"] = kernel_breakdown(lambda: vae.decode(z, return_dict=False))
        print(res["vae_profile"]["by_category_s"], flush=True)
        for n, d, c, cat in res["vae_profile"]["top"][:12]:
            print(f"  {d:8.4f}s x{c:4d} {cat:9s} {n[:90]}", flush=True)

res["rows"] = rows
write_json("probe.json", res)
print(table(rows, ["what", "s", "tflops", "peak"]))
