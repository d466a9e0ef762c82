"""GPU probe 3: flash-attn 4 (CuTe DSL, SM90 path) against cuDNN, in isolation and inside the compiled 1.3B/14B
forward; and Wan2.1 VAE decode variants (channels_last_3d convs, cuDNN autotune)."""

import gc
import math
import time
import traceback
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common.py
from _common import DIT_CONFIGS, cuda_time, dit_flops, env_info, kernel_breakdown, make_dit_inputs, peak_memory, table, write_json  # noqa: E402

rows, res = [], {"env": env_info()}
print(res["env"], flush=True)
T0 = time.time()


def log(**r):
    rows.append(r)
    print(r, flush=True)


try:
    from flash_attn.cute import flash_attn_func

    def fa4(q, k, v, scale):
        out = flash_attn_func(q, k, v, softmax_scale=scale, causal=False)
        return out[0] if isinstance(out, tuple) else out
except Exception:  # noqa: BLE001
    traceback.print_exc()
    fa4 = None


@torch.library.custom_op("probe::fa4", mutates_args=())
def fa4_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return fa4(q, k, v, scale)


@fa4_op.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q)


g = torch.Generator(device="cuda").manual_seed(1)
if fa4 is not None:
    for s in (4133, 1000):
        q, k, v = (torch.randn(2, s, 3, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        try:
            out = fa4(q, k, v, 1 / math.sqrt(128))
            log(what=f"fa4 rel err s={s}", s=f"{((out.float() - ref).norm() / ref.norm()).item():.2e}")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            fa4 = None
            break
if fa4 is not None:
    for heads, s, label, reps in ((12, 32760, "1.3b", 30), (40, 75600, "14b", 4)):
        q, k, v = (torch.randn(1, s, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        flops = 4 * s * s * 128 * heads
        qv, kv_, vv = (t.transpose(1, 2) for t in (q, k, v))
        for name, fn in (("cudnn", lambda: F.scaled_dot_product_attention(qv, kv_, vv)),
                         ("fa4", lambda: fa4(q, k, v, 1 / math.sqrt(128)))):
            def f():
                for _ in range(reps):
                    fn()
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                t = cuda_time(f, warmup=1, iters=3)["median_s"] / reps
            log(what=f"{label} {name} sustained x{reps}", s=round(t, 5), tflops=round(flops / t / 1e12))
        del q, k, v, qv, kv_, vv
        torch.cuda.empty_cache()

from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections  # noqa: E402


class ProbeProcessor:
    _attention_backend = None
    _parallel_config = None

    def __init__(self):
        self.stock = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        q, k, v = _get_qkv_projections(attn, hidden_states, None)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        cos, sin = rotary_emb

        def rope(x):
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            c, s_ = cos[..., 0::2], sin[..., 1::2]
            return torch.stack([x1 * c - x2 * s_, x1 * s_ + x2 * c], dim=-1).flatten(-2).type_as(x)

        out = fa4_op(rope(q), rope(k), v, 1.0 / math.sqrt(q.shape[-1]))
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))


import sys  # noqa: E402
SECTIONS = sys.argv[1:] or ["dit", "vae"]
for name, iters in (("1.3b", 5), ("14b", 2)) if "dit" in SECTIONS else ():
    inputs = make_dit_inputs(name)
    fl = dit_flops(name)
    base = None
    for variant in ("stock", "fa4+fused") if fa4 is not None else ("stock",):
        if time.time() - T0 > 420:
            break
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = WanTransformer3DModel(**DIT_CONFIGS[name]).to(torch.bfloat16).eval()
        if variant != "stock":
            for blk in model.blocks:
                blk.attn1.set_processor(ProbeProcessor())
                blk.attn1.fuse_projections()
        model.compile_repeated_blocks(fullgraph=True)
        with torch.no_grad():
            out = model(**inputs)[0].float()
            if variant == "stock":
                ref = out
            err = ((out - ref).norm() / ref.norm()).item()
            with peak_memory() as pm:
                t = cuda_time(lambda: model(**inputs), warmup=0, iters=iters)["median_s"]
            if variant == "stock":
                base = t
            log(what=f"{name} fwd compiled {variant}", s=round(t, 4), tflops=round(fl / t / 1e12),
                peak=round(pm["peak_gib"], 2), err=f"{err:.1e}", ratio=round(base / t, 3))
            if name == "1.3b" and variant != "stock":
                bd = kernel_breakdown(lambda: model(**inputs))
                res[f"profile_{variant}"] = bd
                print(bd["by_category_s"], flush=True)
        del model, out
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    del inputs

# VAE decode
if "vae" not in SECTIONS:
    write_json("probe_fa4.json", dict(res, rows=rows))
    print(table(rows, ["what", "s", "tflops", "peak", "err", "ratio"]))
    sys.exit(0)
with torch.device("cuda"):
    vae = AutoencoderKLWan().to(torch.bfloat16).eval()
z = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16, generator=g)
with torch.no_grad():
    torch.backends.cudnn.benchmark = False
    ref = vae.decode(z, return_dict=False)[0].float()
    res["vae_profile_stock"] = kernel_breakdown(lambda: vae.decode(z, return_dict=False))
    print(res["vae_profile_stock"]["by_category_s"], flush=True)
    for n, d, c, cat in res["vae_profile_stock"]["top"][:10]:
        print(f"  {d:8.4f}s x{c:4d} {cat:9s} {n[:90]}", flush=True)
    for variant in ("stock", "compile", "cl3d", "cl3d+compile"):
        torch.backends.cudnn.benchmark = False
        if variant == "cl3d":
            torch._dynamo.reset()
            vae.decoder = vae.decoder._orig_mod
            for m in vae.modules():
                if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)):
                    m.weight.data = m.weight.data.to(memory_format=torch.channels_last_3d if m.weight.ndim == 5 else torch.channels_last)
        if variant.endswith("compile"):
            vae.decoder = torch.compile(vae.decoder)
            t0 = time.time()
            vae.decode(z, return_dict=False)
            log(what=f"vae {variant} first call (compile)", s=round(time.time() - t0, 1))
        with peak_memory() as pm:
            t = cuda_time(lambda: vae.decode(z, return_dict=False), warmup=1, iters=3)["median_s"]
        out = vae.decode(z, return_dict=False)[0].float()
        err = ((out - ref).norm() / ref.norm()).item()
        log(what=f"vae decode {variant}", s=round(t, 3), peak=round(pm["peak_gib"], 2), err=f"{err:.1e}")
    res["vae_profile_cl3d"] = kernel_breakdown(lambda: vae.decode(z, return_dict=False))
    print(res["vae_profile_cl3d"]["by_category_s"], flush=True)
    for n, d, c, cat in res["vae_profile_cl3d"]["top"][:10]:
        print(f"  {d:8.4f}s x{c:4d} {cat:9s} {n[:90]}", flush=True)

res["rows"] = rows
write_json("probe_fa4.json", res)
print(table(rows, ["what", "s", "tflops", "peak", "err", "ratio"]))
