"""GPU probe 2: sustained cuDNN attention by layout, our Triton attention (correctness + config sweep), and a
1.3B forward with each attention path inside the compiled model, beside stock compiled."""

import gc
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common.py
from _common import DIT_CONFIGS, cuda_time, dit_flops, env_info, make_dit_inputs, peak_memory, table, write_json  # noqa: E402
from diffusers_wan_ext.ops.attention_triton import attention_bshd, triton_attention

rows, res = [], {"env": env_info()}
print(res["env"], flush=True)


def log(**r):
    rows.append(r)
    print(r, flush=True)


# 1. correctness on a ragged length against fp32 math
g = torch.Generator(device="cuda").manual_seed(1)
for s in (4133, 1000):
    q, k, v = (torch.randn(2, s, 3, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = attention_bshd(q, k, v)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    cud = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    errc = ((cud.float() - ref).norm() / ref.norm()).item()
    log(what=f"triton rel err s={s}", s=f"{err:.2e} (sdpa bf16 {errc:.2e})")

# 2. kernels at the benchmark shapes; sustained = 30 calls in a row (one layer stack's worth)
CONFIGS = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 4, 2),
           (128, 64, 4, 4), (64, 64, 4, 3)]
for heads, s, label in ((12, 32760, "1.3b"), (40, 75600, "14b")):
    q, k, v = (torch.randn(1, s, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    flops = 4 * s * s * 128 * heads
    reps = 30 if label == "1.3b" else 4
    qc, kc, vc = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    qv, kv_, vv = (t.transpose(1, 2) for t in (q, k, v))

    def run(fn):
        def f():
            for _ in range(reps):
                fn()
        t = cuda_time(f, warmup=1, iters=3)
        return t["median_s"] / reps

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t = run(lambda: F.scaled_dot_product_attention(qc, kc, vc))
        log(what=f"{label} cudnn bhsd-contig x{reps}", s=round(t, 5), tflops=round(flops / t / 1e12))
        t = run(lambda: F.scaled_dot_product_attention(qv, kv_, vv))
        log(what=f"{label} cudnn bshd-view x{reps}", s=round(t, 5), tflops=round(flops / t / 1e12))
    for cfg in CONFIGS:
        try:
            t = run(lambda: attention_bshd(q, k, v, config=cfg))
            log(what=f"{label} triton {cfg} x{reps}", s=round(t, 5), tflops=round(flops / t / 1e12))
        except Exception as e:  # noqa: BLE001
            log(what=f"{label} triton {cfg}", s="ERR " + str(e)[:80])
    del q, k, v, qc, kc, vc, qv, kv_, vv
    torch.cuda.empty_cache()

# 3. whole 1.3B forward, compiled, with each attention path
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections  # noqa: E402


class ProbeProcessor:
    _attention_backend = None
    _parallel_config = None

    def __init__(self, kind):
        self.kind = kind
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

        q, k = rope(q), rope(k)
        if self.kind == "triton":
            out = triton_attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
        else:
            qc, kc, vc = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(qc, kc, vc).transpose(1, 2)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


inputs = make_dit_inputs("1.3b")
fl = dit_flops("1.3b")
results = {}
for variant in ("stock", "cudnn_contig", "triton", "cudnn_contig+fused", "triton+fused"):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**DIT_CONFIGS["1.3b"]).to(torch.bfloat16).eval()
    if variant != "stock":
        kind = variant.split("+")[0]
        for blk in model.blocks:
            blk.attn1.set_processor(ProbeProcessor(kind))
            if "fused" in variant:
                blk.attn1.fuse_projections()
    model.compile_repeated_blocks(fullgraph=True)
    with torch.no_grad():
        out = model(**inputs)[0]
        if variant == "stock":
            ref = out.float()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        with peak_memory() as pm:
            t = cuda_time(lambda: model(**inputs), warmup=1, iters=5)
    results[variant] = t["median_s"]
    log(what=f"1.3b fwd compiled {variant}", s=round(t["median_s"], 4), tflops=round(fl / t["median_s"] / 1e12),
        peak=round(pm["peak_gib"], 2), err=f"{err:.1e}", ratio=round(results["stock"] / t["median_s"], 3))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()

res["rows"] = rows
write_json("probe_attn.json", res)
print(table(rows, ["what", "s", "tflops", "peak", "err", "ratio"]))
