"""Scaled-fp8 DiT with fp8 GEMMs (issue 21, "run fast"): ours fp8 against stock Diffusers compiled and our bf16.

Per model (random weights, bf16, batch 1, 512 text tokens, the config's benchmark size):
  * stock compiled -- ``WanTransformer3DModel`` + ``compile_repeated_blocks(fullgraph=True)`` (SDPA)
  * ours           -- ``optimize_transformer`` defaults on the same weights (bf16; the error reference)
  * ours fp8       -- the model written as a ComfyUI scaled-fp8 file (``write_single_file(.., "comfy-fp8-scaled")``,
                      one scale per weight), loaded with ``load_quantized_dit`` (fp8 weights stay fp8) and optimized
                      with ``optimize_transformer(fp8=True)``: ``torch._scaled_mm`` on the stored weights with the
                      file's scales, per-row dynamic activation scales, fused q/k/v as one fp8 GEMM
  * ours fp8 tensorwise (--tensorwise) -- the same with one activation scale per call (``fp8="tensorwise"``; the
                      fused q/k/v layers keep per-row weight scales, so they stay row-wise)
  * ours fp8+sage  -- ours fp8 with SageAttention 1.0.6 (INT8 Q.K^T, Triton) for every attention, if importable
                      and faster than SDPA alone at the model's shape (a benchmark-only backend: Diffusers' ``sage``
                      backend wants sageattention >= 2.1.1)
Before the models, self-attention alone at the model's shape: SDPA against SageAttention 1.0.6.

Phase 1 times stock compiled and ours alternately (one forward each per round); phase 2 drops ours and times
stock compiled and the fp8 variants alternately, so each ratio comes from forwards interleaved with stock's.
Reported: seconds (median), ratio vs stock compiled, peak GiB during the forward (above what was resident before),
weight GiB, relative L2 error vs ours bf16.

Usage (GPU machine):  python bench_fp8.py --models 1.3b,ti2v-5b,14b
CPU smoke test:       python bench_fp8.py --tiny     (tiny config, eager, fp8 layers upcast: checks the plumbing)
Writes bench_fp8.json under $OUT.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import DIT_CONFIGS, DIT_SHAPES, TEXT_LEN, env_info, table, write_json

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=128, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY_SHAPE = (16, 3, 8, 8)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def inputs_for(shape, device: str, text_len: int = TEXT_LEN) -> dict:
    g = torch.Generator().manual_seed(0)
    c, t, h, w = shape
    return dict(hidden_states=torch.randn(1, c, t, h, w, generator=g).to(device, torch.bfloat16),
                timestep=torch.full((1,), 500.0, device=device),
                encoder_hidden_states=torch.randn(1, text_len, 4096, generator=g).to(device, torch.bfloat16),
                return_dict=False)


def weight_gib(model) -> float:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 2**30


def sibling(base, config: dict):
    """A second stock model sharing ``base``'s parameters and buffers (no second copy)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    model.load_state_dict(base.state_dict(keep_vars=True), assign=True)
    for buf_name, buf in base.named_buffers():
        owner, _, attr = buf_name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, buf)
    return model.eval().requires_grad_(False)


def register_sage_backend() -> str | None:
    """Make Diffusers' ``sage`` backend call sageattention 1.0.6 through a custom op (traceable by fullgraph
    compile); returns why not, or ``None``."""
    try:
        from sageattention import sageattn
    except ImportError as exc:
        return f"sageattention not importable ({exc})"
    from diffusers.models import attention_dispatch as ad

    @torch.library.custom_op("bench_fp8::sage", mutates_args=())
    def sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sageattn(q.contiguous(), k.contiguous(), v.contiguous(), tensor_layout="NHD", is_causal=False)

    @sage.register_fake
    def _(q, k, v):
        return torch.empty_like(q)

    def sage_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       return_lse=False, _parallel_config=None):
        return sage(query, key, value)

    name = ad.AttentionBackendName.SAGE
    ad._AttentionBackendRegistry._backends[name] = sage_attention
    ad._AttentionBackendRegistry._constraints[name] = []
    ad._AttentionBackendRegistry._supported_arg_names[name] = set(
        ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "return_lse", "_parallel_config"])
    ad._CAN_USE_SAGE_ATTN = True
    return None


def forward_once(model, kw, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(**kw)
    sync(device)
    return time.perf_counter() - t0


def warm(models: dict, kw: dict, device: str, ref, info: dict) -> torch.Tensor | None:
    """First call (compiles) and one more; records setup time, the output's error vs ``ref`` and the peak."""
    for name, model in models.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(**kw)[0].float()
        info[name] = dict(first_call_s=time.perf_counter() - t0)
        if ref is None and name == "ours":
            ref = out
        info[name]["err"] = ((out - ref).norm() / ref.norm()).item() if ref is not None else None
        del out
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        forward_once(model, kw, device)
        if device == "cuda":
            info[name]["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        info[name]["weight_gib"] = weight_gib(model)
    return ref


def alternate(models: dict, kw: dict, device: str, iters: int, info: dict) -> None:
    runs = {name: [] for name in models}
    for _ in range(iters):
        for name, model in models.items():
            runs[name].append(forward_once(model, kw, device))
    for name in models:
        info[name]["runs"] = runs[name]
        info[name]["median_s"] = statistics.median(runs[name])


def attention_probe(name: str) -> dict:
    """Self-attention alone at the model's benchmark shape: SDPA (cuDNN) against SageAttention 1.0.6."""
    import torch.nn.functional as F

    from _common import tokens

    heads = DIT_CONFIGS[name]["num_attention_heads"]
    q, k, v = (torch.randn(1, heads, tokens(name), 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = {}
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    try:
        from sageattention import sageattn

        fns["sage 1.0.6"] = lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    except ImportError:
        pass
    ref = fns["sdpa"]().float()
    for label, fn in fns.items():
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            res = fn()
        torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / 5
        flops = 4 * heads * tokens(name) ** 2 * 128
        out[label] = dict(ms=round(sec * 1e3, 2), tflops=round(flops / sec / 1e12),
                          rel_err=f"{((res.float() - ref).norm() / ref.norm()).item():.2e}")
    print(f"{name} self-attention alone: {out}", flush=True)
    return out


def bench_model(name: str, args) -> list[dict]:
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext.conversion.dit import export_dit_state_dict
    from diffusers_wan_ext.conversion.quantized_dit import load_quantized_dit
    from diffusers_wan_ext.runtime import optimize_transformer
    from diffusers_wan_ext.utils.single_file import write_single_file

    device = "cpu" if args.tiny else "cuda"
    probe = {} if args.tiny else attention_probe(name)
    config, shape = (TINY, TINY_SHAPE) if args.tiny else (DIT_CONFIGS[name], DIT_SHAPES[name])
    compile_ = not args.tiny
    kw = inputs_for(shape, device, 16 if args.tiny else TEXT_LEN)
    torch.manual_seed(0)
    with torch.device(device):
        stock = WanTransformer3DModel(**config).to(torch.bfloat16).eval().requires_grad_(False)
    t0 = time.perf_counter()
    path = Path(tempfile.mkdtemp()) / f"dit_{name}_fp8_scaled.safetensors"
    write_single_file(path, export_dit_state_dict(stock.state_dict()), "comfy-fp8-scaled")
    print(f"{name}: wrote {path.stat().st_size / 2**30:.2f} GiB scaled fp8 in {time.perf_counter() - t0:.0f} s",
          flush=True)
    gc.collect()
    ours = sibling(stock, config)
    if compile_:
        stock.compile_repeated_blocks(fullgraph=True)
    reports = {"ours": optimize_transformer(ours, compile=compile_, verbose=False)}
    info = {}
    ref = warm({"stock compiled": stock, "ours": ours}, kw, device, None, info)
    alternate({"stock compiled": stock, "ours": ours}, kw, device, args.iters, info)
    phase1_stock = info.pop("stock compiled")
    del ours
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    variants = {}
    sage_slower = bool(probe) and "sage 1.0.6" in probe and probe["sage 1.0.6"]["ms"] > probe["sdpa"]["ms"]
    for variant in ("ours fp8", "ours fp8 tensorwise", "ours fp8+sage"):
        # registered only now, so that "auto" attention of ours / ours fp8 never picks it
        sage_reason = None
        if variant.endswith("sage"):
            sage_reason = ("not asked (--no-sage)" if not args.sage else "slower than SDPA alone (see the probe)"
                           if sage_slower else register_sage_backend())
        if variant.endswith("tensorwise") and not args.tensorwise:
            sage_reason = "not asked (--tensorwise)"
        if sage_reason:
            print(f"{name} {variant}: not run ({sage_reason})", flush=True)
            continue
        t0 = time.perf_counter()
        model = load_quantized_dit(path, torch_dtype=torch.bfloat16, device=device).eval().requires_grad_(False)
        load_s = time.perf_counter() - t0
        attention = "sage" if variant.endswith("sage") else reports["ours"]["attention_backend"]
        fp8 = "tensorwise" if variant.endswith("tensorwise") else True  # True: the file's weights, row-wise inputs
        reports[variant] = optimize_transformer(model, compile=False, verbose=False, fp8=fp8, attention="native")
        model.set_attention_backend(attention)
        reports[variant]["attention_backend"] = attention
        if compile_:
            model.compile_repeated_blocks(fullgraph=True)
        variants[variant] = model
        print(f"{name} {variant}: loaded in {load_s:.0f} s, {reports[variant]}", flush=True)
    models = {"stock compiled": stock, **variants}
    warm(models, kw, device, ref, info)
    alternate(models, kw, device, args.iters, info)
    rows = []
    for variant, r in [("stock compiled (phase 1)", phase1_stock)] + list(info.items()):
        base = phase1_stock["median_s"] if variant in ("ours", "stock compiled (phase 1)") else info[
            "stock compiled"]["median_s"]
        rows.append(dict(model=name, variant=variant, s=round(r["median_s"], 4),
                         vs_stock_compiled=round(base / r["median_s"], 3), peak_gib=round(r.get("peak_gib", 0), 2),
                         weight_gib=round(r["weight_gib"], 2),
                         err_vs_ours_bf16="-" if r.get("err") is None else f"{r['err']:.2e}",
                         first_call_s=round(r["first_call_s"], 1), runs=[round(x, 4) for x in r["runs"]],
                         report=reports.get(variant.split(" (")[0], ""), attention_alone=probe))
        print({k: v for k, v in rows[-1].items() if k != "report"}, flush=True)
    del models, variants, stock
    path.unlink()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1.3b,ti2v-5b,14b")
    parser.add_argument("--iters", type=int, default=0, help="timed rounds (default 5; 2 for 14b)")
    parser.add_argument("--no-sage", dest="sage", action="store_false", help="skip the SageAttention variant")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny config")
    parser.add_argument("--tensorwise", action="store_true", help="also time per-tensor activation scales")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    env = env_info()
    print(env, flush=True)
    rows = []
    for name in (["tiny"] if args.tiny else args.models.split(",")):
        iters = args.iters or (2 if name == "14b" else 5)
        rows += bench_model(name, argparse.Namespace(**{**vars(args), "iters": iters}))
        write_json("bench_fp8.json", {"env": env, "args": vars(args), "rows": rows})
    print(f"\n{env.get('gpu', 'cpu')} | torch {env['torch']} | diffusers {env.get('diffusers')}")
    print(table(rows, ["model", "variant", "s", "vs_stock_compiled", "peak_gib", "weight_gib", "err_vs_ours_bf16",
                       "first_call_s"]))


if __name__ == "__main__":
    main()
