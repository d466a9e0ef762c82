"""Shared helpers for the GPU benchmarks: model configs, input shapes, timing and memory readings.

Timing follows the usual rules: warm-up first, CUDA events around the region, median of several runs.
Weights are random (timing does not depend on their values); inputs are random normal, never zeros.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

# Transformer configs of the public checkpoints (Diffusers names).
_COMMON = dict(
    patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
DIT_CONFIGS = {
    "1.3b": dict(_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16, out_channels=16),
    "14b": dict(_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16),
    "ti2v-5b": dict(_COMMON, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
}
DIT_CONFIGS["1.3b-odd"] = DIT_CONFIGS["1.3b"]
# (latent channels, latent frames, latent height, latent width) of the benchmark resolutions.
DIT_SHAPES = {
    "1.3b": (16, 21, 60, 104),      # 480x832x81, Wan2.1 VAE (4x8x8)
    "14b": (16, 21, 90, 160),       # 1280x720x81
    "ti2v-5b": (48, 31, 44, 80),    # 1280x704x121, Wan2.2 VAE (4x16x16)
    "1.3b-odd": (16, 21, 58, 102),  # 464x816x81: 31059 tokens, odd (context-parallel padding check)
}
TEXT_LEN = 512
PEAK_BF16_TFLOPS = 790.0


def dit_flops(name: str, batch: int = 1) -> float:
    """Matmul FLOPs of one transformer forward (attention + projections + FFN), as counted for the ideal bound."""
    cfg = DIT_CONFIGS[name]
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f = cfg["ffn_dim"]
    _, t, h, w = DIT_SHAPES[name]
    s = t * (h // 2) * (w // 2)
    per_layer = (
        8 * s * d * d            # self-attention q, k, v, o
        + 4 * s * s * d          # self-attention scores and values
        + 4 * s * d * d          # cross-attention q, o
        + 4 * TEXT_LEN * d * d   # cross-attention k, v
        + 4 * s * TEXT_LEN * d   # cross-attention scores and values
        + 4 * s * d * f          # FFN
    )
    return batch * cfg["num_layers"] * per_layer


def tokens(name: str) -> int:
    _, t, h, w = DIT_SHAPES[name]
    return t * (h // 2) * (w // 2)


def make_dit_inputs(name: str, batch: int = 1, device="cuda", dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    c, t, h, w = DIT_SHAPES[name]
    x = torch.randn(batch, c, t, h, w, generator=g).to(device, dtype)
    ctx = torch.randn(batch, TEXT_LEN, 4096, generator=g).to(device, dtype)
    ts = torch.full((batch,), 500.0, device=device)
    return dict(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, return_dict=False)


def cuda_time(fn: Callable[[], object], warmup: int = 2, iters: int = 5) -> dict:
    """Median / min seconds of ``fn`` timed with CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": times}


@contextmanager
def peak_memory():
    """Yields a dict filled with the peak allocated GiB of the region (after resetting the counter)."""
    out = {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield out
    torch.cuda.synchronize()
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["base_gib"] = base / 2**30


def env_info() -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1))
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def kernel_breakdown(fn: Callable[[], object], top: int = 25) -> dict:
    """Profiles one call of ``fn`` and sums CUDA kernel time by category (attention / gemm / other)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cats = {"attention": 0.0, "gemm": 0.0, "conv": 0.0, "other": 0.0}
    per_kernel = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = evt.name
        dur = evt.device_time_total / 1e6 if hasattr(evt, "device_time_total") else evt.cuda_time_total / 1e6
        low = name.lower()
        if any(k in low for k in ("fmha", "flash", "sdpa", "attention", "cudnn_generated_fort_native_sdpa")):
            cat = "attention"
        elif any(k in low for k in ("conv", "implicit_gemm", "winograd", "fprop", "dgrad")):
            cat = "conv"
        elif any(k in low for k in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "sm90_")):
            cat = "gemm"
        else:
            cat = "other"
        cats[cat] += dur
        k = per_kernel.setdefault(name[:120], [0.0, 0, cat])
        k[0] += dur
        k[1] += 1
    topk = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {"by_category_s": cats, "top": [(n, round(v[0], 5), v[1], v[2]) for n, v in topk]}


def write_json(name: str, data) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, name).write_text(json.dumps(data, indent=1, default=str))


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line([r.get(c, "") for c in cols]) for r in rows])


@torch.no_grad()
def time_forward(model, kw: dict, repeats: int) -> tuple[float, float, torch.Tensor]:
    """One warm-up forward, then the median seconds of ``repeats`` forwards, the peak GiB allocated above what was
    allocated before them, and the warm-up's output (float32)."""
    out = model(**kw)[0]
    times = []
    with peak_memory() as mem:
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), mem["peak_gib"] - mem["base_gib"], out.float()
