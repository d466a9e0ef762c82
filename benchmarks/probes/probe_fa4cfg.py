"""Exploratory GPU probe (issue 4, round 6): flash-attn 4 SM90 forward configurations beyond the tile size
(P in registers or shared memory, intra-warpgroup overlap, 3 consumer warpgroups with 192-row tiles) at the 14B and
1.3B self-attention shapes, with the SM clock and board power sampled by ``nvidia-smi`` while each runs (is the kernel
power-limited?), and a cuBLAS GEMM of the 14B block for comparison. JSON under $OUT."""

import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common.py
from _common import cuda_time, env_info, table, write_json  # noqa: E402

res = {"env": env_info()}
print(res["env"], flush=True)
rows = []

from flash_attn.cute.interface import _flash_attn_fwd  # noqa: E402

#: (tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap); None = the package default (128, 128, True, True)
CONFIGS = [None, (128, 128, False, True), (128, 128, True, False), (128, 144, True, True),
           (192, 128, True, False), (192, 112, True, False), (192, 96, True, False)]
if len(sys.argv) > 1:
    CONFIGS = [None] + [tuple(int(x) if x.isdigit() else x == "T" for x in a.split(",")) for a in sys.argv[1:]]


class Sampler:
    """``nvidia-smi`` SM clock (MHz) and power (W) sampled every 50 ms while the block runs."""

    def __enter__(self):
        self.p = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                   "-lms", "50"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.p.terminate()
        out = self.p.communicate()[0]
        vals = [tuple(float(x) for x in line.split(",")) for line in out.strip().splitlines() if "," in line]
        vals = vals[len(vals) // 4:] or vals  # drop the ramp-up
        self.mhz = round(sum(v[0] for v in vals) / max(len(vals), 1))
        self.watt = round(sum(v[1] for v in vals) / max(len(vals), 1))


g = torch.Generator(device="cuda").manual_seed(1)
for heads, s, label, reps in ((40, 75600, "14b", 6), (12, 32760, "1.3b", 60)):
    q, k, v = (torch.randn(1, s, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    flops = 4 * s * s * 128 * heads
    ref = None
    for cfg in CONFIGS:
        kw = {} if cfg is None else dict(tile_mn=cfg[:2], mma_pv_is_rs=cfg[2], intra_wg_overlap=cfg[3])
        fn = lambda: _flash_attn_fwd(q, k, v, softmax_scale=1 / math.sqrt(128), causal=False, **kw)  # noqa: E731
        try:
            t0 = time.time()
            out = fn()[0].float()
            first = time.time() - t0
            ref = out if ref is None else ref
            err = ((out - ref).norm() / ref.norm()).item()
            with Sampler() as smp:
                t = cuda_time(lambda: [fn() for _ in range(reps)], warmup=1, iters=3)["median_s"] / reps
            rows.append(dict(what=f"{label} fa4 {cfg or 'default'}", ms=round(t * 1e3, 2),
                             tflops=round(flops / t / 1e12), mhz=smp.mhz, watt=smp.watt, err=f"{err:.1e}",
                             compile_s=round(first, 1)))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(what=f"{label} fa4 {cfg}", ms="ERR " + str(e)[:90]))
        print(rows[-1], flush=True)
    del q, k, v
    torch.cuda.empty_cache()

a = torch.randn(75600, 5120, device="cuda", dtype=torch.bfloat16, generator=g)
w = torch.randn(13824, 5120, device="cuda", dtype=torch.bfloat16, generator=g)
with Sampler() as smp:
    t = cuda_time(lambda: [torch.mm(a, w.t()) for _ in range(20)], warmup=1, iters=3)["median_s"] / 20
rows.append(dict(what="14b gemm ffn1 cuBLAS", ms=round(t * 1e3, 2), tflops=round(2 * 75600 * 5120 * 13824 / t / 1e12),
                 mhz=smp.mhz, watt=smp.watt))
print(rows[-1], flush=True)
res["rows"] = rows
write_json("probe_fa4cfg.json", res)
print(table(rows, ["what", "ms", "tflops", "mhz", "watt", "err", "compile_s"]))
