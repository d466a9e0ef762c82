"""SageAttention 2 (INT8 Q.K^T + FP8 P.V, sm90 kernels) for the Wan DiT (issue 21: >= 1.5x stock compiled at 14B 720p
with rel. error <= 2e-2 vs our bf16). Needs the wheel built by ``benchmarks/sage2_build.sh`` (installed in
``/tmp/sage2/site``, put first on ``sys.path`` here; ``SAGE2_SITE`` overrides the folder).

Parts (``--parts``, default both):
  micro    self-attention alone at the 14B 720p shape (40 heads x 75600 tokens x 128) and the 1.3B 480p shape
           (12 x 32760 x 128), bf16: cuDNN SDPA against every sageattention kernel that runs here (``sageattn``'s
           automatic choice; the sm90 kernel with per-thread / per-warp Q/K quantization, without smooth_k; the sm89
           fp8 kernel with each P.V accumulation; the sm80 fp16-P.V kernel; the Triton one). Time: CUDA events, median.
           Rel. error ||o - o_sdpa|| / ||o_sdpa|| on two inputs: "randn" (q, k, v ~ N(0, 1)) and "proj" (a LayerNorm'd
           random activation projected to q / k / v, q and k RMS-normed with per-channel gains, k sharing half of
           q's projection and carrying a per-channel offset, like DiT q / k after their RMSNorm). Also: whether Diffusers' own
           ``sage`` backend traces under ``torch.compile(fullgraph=True)``, and what our ``select_attention_backend``
           picks with sage 2 importable.
  forward  the whole DiT forward (``--model``, default 14b; random weights, batch 1, 512 text tokens):
           stock compiled (``compile_repeated_blocks(fullgraph=True)``) against ours (bf16, cuDNN attention: the
           error reference), ours + sage2 (bf16 GEMMs), ours fp8 (scaled-fp8 file, ``optimize_transformer(fp8=True)``,
           as in bench_fp8.py), fp8 + sage2 in every block, fp8 + sage2 in the middle blocks only (``--skip``
           first/last blocks keep cuDNN), and fp8 + each ``--extra-kernels``. Self-attention (attn1) of every block
           goes through one ``torch.library`` custom op (Diffusers' ``sage`` backend slot is pointed at it), so
           fullgraph compile traces it as one node; which kernel it runs, and in which blocks, is a Python setting
           read at run time, so all variants of one model share its compiled blocks. Cross-attention keeps cuDNN.
           Stock is timed interleaved with each phase's variants (phase 1: bf16 model, phase 2: fp8 model).

Every step is guarded: a failure prints one line and is recorded under "errors" in the JSON ($OUT/bench_sage2.json).
Usage (GPU machine, from benchmarks/ after run_gpu_round.sh's install): python3 bench_sage2.py --parts micro
                                                                          python3 bench_sage2.py --parts forward
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SAGE2_SITE = os.environ.get("SAGE2_SITE", "/tmp/sage2/site")
if os.path.isdir(SAGE2_SITE):
    sys.path.insert(0, SAGE2_SITE)  # before anything imports diffusers (it looks for sageattention at import)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import DIT_CONFIGS, DIT_SHAPES, cuda_time, env_info, table, write_json  # noqa: E402

RESULT: dict = {"errors": {}}
HEAD_DIM = 128
MICRO_SHAPES = {"14b": (40, 75600), "1.3b": (12, 32760)}

# short name -> (sageattention function, keyword arguments)
SAGE_KERNELS = {
    "sage2": ("sageattn", {}),
    "sm90": ("sageattn_qk_int8_pv_fp8_cuda_sm90", dict(qk_quant_gran="per_thread", pv_accum_dtype="fp32+fp32")),
    "sm90_warp": ("sageattn_qk_int8_pv_fp8_cuda_sm90", dict(qk_quant_gran="per_warp", pv_accum_dtype="fp32+fp32")),
    "sm90_nosmoothk": ("sageattn_qk_int8_pv_fp8_cuda_sm90",
                       dict(qk_quant_gran="per_thread", pv_accum_dtype="fp32+fp32", smooth_k=False)),
    "sm89_fp32+fp32": ("sageattn_qk_int8_pv_fp8_cuda", dict(pv_accum_dtype="fp32+fp32")),
    "sm89_fp32+fp16": ("sageattn_qk_int8_pv_fp8_cuda", dict(pv_accum_dtype="fp32+fp16")),
    "sm89_fp32": ("sageattn_qk_int8_pv_fp8_cuda", dict(pv_accum_dtype="fp32")),
    "sm80_fp16_fp32": ("sageattn_qk_int8_pv_fp16_cuda", dict(pv_accum_dtype="fp32")),
    "sm80_fp16_fp16+fp32": ("sageattn_qk_int8_pv_fp16_cuda", dict(pv_accum_dtype="fp16+fp32")),
    "triton_fp16": ("sageattn_qk_int8_pv_fp16_triton", {}),
}


def record_error(key: str, exc: BaseException) -> None:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0][:400] if text else ''}"
    RESULT["errors"][key] = line
    print(f"[{key}] FAILED: {line}", flush=True)


def sage_status() -> dict:
    try:
        import importlib.metadata as md

        import sageattention
        import sageattention.core as core

        return dict(version=md.version("sageattention"), file=sageattention.__file__, sm90=core.SM90_ENABLED,
                    sm89=core.SM89_ENABLED, sm80=core.SM80_ENABLED)
    except Exception as exc:  # noqa: BLE001
        record_error("import sageattention", exc)
        return dict(version=None)


def cudnn_attention(q, k, v, layout: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if layout == "NHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2) if layout == "NHD" else out


def run_kernel(name: str, q, k, v, layout: str):
    if name == "cudnn":
        return cudnn_attention(q, k, v, layout)
    import sageattention

    fn_name, kwargs = SAGE_KERNELS[name]
    return getattr(sageattention, fn_name)(q, k, v, tensor_layout=layout, is_causal=False, **kwargs)


# ------------------------------------------------------------------------------------------------ micro-bench
def make_qkv(heads: int, n: int, kind: str, seed: int = 0):
    """(1, heads, n, 128) bf16 q, k, v (HND)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, heads, n, HEAD_DIM)
    if kind == "randn":
        return tuple(torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dim = heads * HEAD_DIM
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    x = F.layer_norm(rnd(n, dim), (dim,))
    wq = rnd(dim, dim) / dim**0.5
    wk = (0.5 * wq + 0.87 * rnd(dim, dim) / dim**0.5)  # k shares part of q's projection: peaks on related tokens
    wv = rnd(dim, dim) / dim**0.5
    gain_q, gain_k = 1 + 0.3 * rnd(dim), 1 + 0.3 * rnd(dim)
    q = F.rms_norm(x @ wq, (dim,)) * gain_q
    k = F.rms_norm(x @ wk, (dim,)) * gain_k + 0.5 * rnd(dim)  # per-channel offset (what smooth_k removes)
    v = x @ wv
    del x, wq, wk, wv
    return tuple(t.view(n, heads, HEAD_DIM).transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))


def time_ms(fn, warmup: int = 2, iters: int = 7) -> float:
    """Median milliseconds of ``fn`` (CUDA events, ``_common.cuda_time``)."""
    return cuda_time(fn, warmup=warmup, iters=iters)["median_s"] * 1000.0


def rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def micro(shapes: list[str]) -> list[dict]:
    rows = []
    kernels = ["cudnn"] + list(SAGE_KERNELS)
    for shape_name in shapes:
        heads, n = MICRO_SHAPES[shape_name]
        flops = 4 * heads * n * n * HEAD_DIM
        errs, timed = {name: {} for name in kernels}, {}
        for kind in ("randn", "proj"):
            try:
                q, k, v = make_qkv(heads, n, kind)
                ref = cudnn_attention(q, k, v, "HND").float()
            except Exception as exc:  # noqa: BLE001
                record_error(f"micro {shape_name} inputs {kind}", exc)
                continue
            for name in kernels:
                try:
                    errs[name][kind] = rel_err(run_kernel(name, q, k, v, "HND"), ref)
                except Exception as exc:  # noqa: BLE001
                    record_error(f"micro {shape_name} {name} ({kind})", exc)
            del ref
            if kind == "randn":
                for name in kernels:
                    if kind not in errs[name]:
                        continue
                    try:
                        timed[name] = time_ms(functools.partial(run_kernel, name, q, k, v, "HND"))
                    except Exception as exc:  # noqa: BLE001
                        record_error(f"micro {shape_name} {name} timing", exc)
            del q, k, v
            torch.cuda.empty_cache()
        base = timed.get("cudnn")
        for name in kernels:
            ms = timed.get(name)
            row = dict(shape=shape_name, kernel=name, ms=None if ms is None else round(ms, 2),
                       tflops=None if ms is None else round(flops / ms / 1e9),
                       vs_cudnn=None if not (ms and base) else round(base / ms, 3),
                       err_randn=f"{errs[name]['randn']:.2e}" if "randn" in errs[name] else "-",
                       err_proj=f"{errs[name]['proj']:.2e}" if "proj" in errs[name] else "-")
            rows.append(row)
            print(row, flush=True)
    return rows


def probe_diffusers_sage() -> dict:
    """Diffusers' own ``sage`` backend: eager vs ``torch.compile(fullgraph=True)``; our auto choice; our
    registration (runtime/sage.py) under fullgraph compile."""
    out, q, k, v, ref = {}, None, None, None, None
    try:
        from diffusers.models import attention_dispatch as ad

        out["diffusers_can_use_sage"] = bool(ad._CAN_USE_SAGE_ATTN)
        q, k, v = (torch.randn(1, 4096, 12, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = cudnn_attention(q, k, v, "NHD").float()
        fn = lambda q, k, v: ad.dispatch_attention_fn(q, k, v, backend=ad.AttentionBackendName.SAGE)  # noqa: E731
        out["eager_rel_err"] = f"{rel_err(fn(q, k, v), ref):.2e}"
        try:
            out["fullgraph_rel_err"] = f"{rel_err(torch.compile(fn, fullgraph=True)(q, k, v), ref):.2e}"
            out["fullgraph"] = "traced"
        except Exception as exc:  # noqa: BLE001
            text = str(exc).strip().splitlines()
            out["fullgraph"] = f"fails: {type(exc).__name__}: {text[0][:300] if text else ''}"
        torch._dynamo.reset()
    except Exception as exc:  # noqa: BLE001
        record_error("diffusers sage backend probe", exc)
    try:
        from diffusers_wan_ext.runtime.attention import attention_backend_report, select_attention_backend

        out["our_auto_choice"] = select_attention_backend("cuda", torch.bfloat16)
        out["our_report"] = attention_backend_report("cuda", torch.bfloat16)
    except Exception as exc:  # noqa: BLE001
        record_error("our attention report", exc)
    try:  # our runtime's registration (runtime/sage.py): the same call behind a custom op
        from diffusers.models import attention_dispatch as ad

        from diffusers_wan_ext.runtime.sage import register_traceable_sage

        register_traceable_sage()
        fn = lambda q, k, v: ad.dispatch_attention_fn(q, k, v, backend=ad.AttentionBackendName.SAGE)  # noqa: E731
        out["ours_fullgraph_rel_err"] = f"{rel_err(torch.compile(fn, fullgraph=True)(q, k, v), ref):.2e}"
        torch._dynamo.reset()
    except Exception as exc:  # noqa: BLE001
        record_error("our traceable sage backend (runtime/sage.py) under fullgraph compile", exc)
    print(f"diffusers sage backend: {out}", flush=True)
    return out


# ------------------------------------------------------------------------------------------ whole forward
#: what the self-attention op runs: a kernel name (``cudnn`` or a key of SAGE_KERNELS), the blocks that use it
#: (None: all; the others use cuDNN), and a call counter (reset per forward: the op's n-th call is block n)
SELF_ATTN = {"kernel": "cudnn", "layers": None, "num_layers": 40, "calls": 0}


@torch.library.custom_op("bench_sage2::self_attn", mutates_args=())
def self_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    layer = SELF_ATTN["calls"] % SELF_ATTN["num_layers"]
    SELF_ATTN["calls"] += 1
    layers = SELF_ATTN["layers"]
    name = SELF_ATTN["kernel"] if layers is None or layer in layers else "cudnn"
    out = run_kernel(name, q.contiguous(), k.contiguous(), v.contiguous(), "NHD")
    return out.contiguous()


@self_attn_op.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


def _self_attn_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False, return_lse=False, _parallel_config=None):
    if attn_mask is not None or is_causal or return_lse or _parallel_config is not None:
        raise ValueError("bench_sage2 self-attention op: no mask / causal / lse / context parallel")
    return self_attn_op(query, key, value)


def use_self_attn_op(model) -> int:
    """Point Diffusers' ``sage`` backend slot at the op and set every block's attn1 to it; returns the count."""
    from diffusers.models import attention_dispatch as ad

    name = ad.AttentionBackendName.SAGE
    registry = ad._AttentionBackendRegistry
    registry._backends[name] = _self_attn_backend
    registry._constraints[name] = []
    registry._supported_arg_names[name] = {"query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                                           "enable_gqa", "return_lse", "_parallel_config"}
    for block in model.blocks:
        block.attn1.processor._attention_backend = name
    SELF_ATTN["num_layers"] = len(model.blocks)
    return len(model.blocks)


class Variant:
    """A model and the self-attention setting it runs with (``None``: the model does not use the op)."""

    def __init__(self, model, kernel: str | None = None, layers=None):
        self.model, self.kernel, self.layers = model, kernel, layers

    def __call__(self, kw: dict) -> torch.Tensor:
        if self.kernel is not None:
            SELF_ATTN.update(kernel=self.kernel, layers=self.layers, calls=0)
        with torch.no_grad():
            return self.model(**kw)[0]


def timed_call(variant: Variant, kw: dict) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    variant(kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_phase(variants: dict, kw: dict, iters: int, ref, info: dict):
    """Warm every variant (first call: compile; its error vs ``ref``; one more call for the peak), then time them
    interleaved, ``iters`` rounds. ``ref`` None: the variant named "ours" gives it. Failures are recorded."""
    for name, variant in list(variants.items()):
        try:
            t0 = time.perf_counter()
            out = variant(kw).float()
            info[name] = dict(first_call_s=round(time.perf_counter() - t0, 1))
            if ref is None and name == "ours":
                ref = out
            info[name]["err"] = rel_err(out, ref) if ref is not None else None
            del out
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            timed_call(variant, kw)
            info[name]["peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
            print(f"{name}: warm {info[name]}", flush=True)
        except Exception as exc:  # noqa: BLE001
            record_error(f"forward warm {name}", exc)
            variants.pop(name)
            info.pop(name, None)
    runs = {name: [] for name in variants}
    for _ in range(iters):
        for name, variant in variants.items():
            try:
                runs[name].append(timed_call(variant, kw))
            except Exception as exc:  # noqa: BLE001
                record_error(f"forward timing {name}", exc)
    for name in variants:
        if runs[name]:
            info[name].update(runs=[round(x, 4) for x in runs[name]], median_s=statistics.median(runs[name]))
    return ref


def forward(args) -> list[dict]:
    from bench_fp8 import inputs_for, sibling
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext.conversion.dit import export_dit_state_dict
    from diffusers_wan_ext.conversion.quantized_dit import load_quantized_dit
    from diffusers_wan_ext.runtime import optimize_transformer
    from diffusers_wan_ext.utils.single_file import write_single_file

    name, kernel = args.model, args.kernel
    config, shape = DIT_CONFIGS[name], DIT_SHAPES[name]
    kw = inputs_for(shape, "cuda")
    torch.manual_seed(0)
    with torch.device("cuda"):
        stock = WanTransformer3DModel(**config).to(torch.bfloat16).eval().requires_grad_(False)
    path = None
    try:
        path = Path(tempfile.mkdtemp()) / f"dit_{name}_fp8_scaled.safetensors"
        t0 = time.perf_counter()
        write_single_file(path, export_dit_state_dict(stock.state_dict()), "comfy-fp8-scaled")
    except Exception as exc:  # noqa: BLE001
        record_error("writing the fp8 file", exc)
        path = None
    else:
        print(f"{name}: wrote {path.stat().st_size / 2**30:.2f} GiB scaled fp8 in {time.perf_counter() - t0:.0f} s",
              flush=True)
    ours = sibling(stock, config)
    stock.compile_repeated_blocks(fullgraph=True)
    report = optimize_transformer(ours, compile=True, verbose=False, attention="_native_cudnn")
    use_self_attn_op(ours)
    n = len(ours.blocks)
    middle = set(range(args.skip, n - args.skip))
    info, reports = {}, {"ours": report}
    phase1 = {"stock compiled": Variant(stock), "ours": Variant(ours, "cudnn"),
              f"ours+{kernel}": Variant(ours, kernel)}
    ref = run_phase(phase1, kw, args.iters, None, info)
    phase1_stock = info.pop("stock compiled", None)
    del ours, phase1
    gc.collect()
    torch.cuda.empty_cache()
    if path is not None:
        try:
            model = load_quantized_dit(path, torch_dtype=torch.bfloat16, device="cuda").eval().requires_grad_(False)
            # cuDNN for cross-attention, set without touching Diffusers' global default (stock's backend)
            reports["ours fp8"] = optimize_transformer(model, compile=False, verbose=False, fp8=True,
                                                       attention="_native_cudnn")
            use_self_attn_op(model)
            model.compile_repeated_blocks(fullgraph=True)
            phase2 = {"stock compiled": Variant(stock), "ours fp8": Variant(model, "cudnn"),
                      f"fp8+{kernel}": Variant(model, kernel),
                      f"fp8+{kernel} blocks {args.skip}..{n - args.skip - 1}": Variant(model, kernel, middle)}
            for extra in filter(None, args.extra_kernels.split(",")):
                phase2[f"fp8+{extra}"] = Variant(model, extra)
            run_phase(phase2, kw, args.iters, ref, info)
            del model, phase2
        except Exception as exc:  # noqa: BLE001
            record_error("fp8 phase", exc)
        path.unlink()
    rows = []
    for variant, r in ([("stock compiled (phase 1)", phase1_stock)] if phase1_stock else []) + list(info.items()):
        if not r or "median_s" not in r:
            continue
        in_phase1 = variant in ("stock compiled (phase 1)", "ours", f"ours+{kernel}")
        base = (phase1_stock if in_phase1 else info.get("stock compiled")) or {}
        ratio = round(base["median_s"] / r["median_s"], 3) if "median_s" in base else None
        rows.append(dict(model=name, variant=variant, s=round(r["median_s"], 4), vs_stock_compiled=ratio,
                         err_vs_ours_bf16="-" if r.get("err") is None else f"{r['err']:.2e}",
                         peak_gib=r.get("peak_gib"), first_call_s=r.get("first_call_s"), runs=r.get("runs"),
                         report=reports.get(variant, "")))
        print({k: v for k, v in rows[-1].items() if k != "report"}, flush=True)
    del stock
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="micro,forward", help="micro, forward or both (comma-separated)")
    parser.add_argument("--shapes", default="14b,1.3b", help="micro-bench shapes: 14b, 1.3b")
    parser.add_argument("--model", default="14b", help="forward: a key of _common.DIT_CONFIGS")
    parser.add_argument("--kernel", default="sm90", help=f"forward: sage kernel, one of {', '.join(SAGE_KERNELS)}")
    parser.add_argument("--extra-kernels", default="", help="forward: more fp8 variants (comma-separated kernels)")
    parser.add_argument("--skip", type=int, default=4, help="forward: first/last blocks that keep cuDNN (subset row)")
    parser.add_argument("--iters", type=int, default=2, help="forward: timed rounds")
    args = parser.parse_args()
    for k in [args.kernel] + list(filter(None, args.extra_kernels.split(","))):
        if k not in SAGE_KERNELS:
            parser.error(f"--kernel / --extra-kernels: unknown kernel {k!r} (one of {', '.join(SAGE_KERNELS)})")
    torch.backends.cuda.matmul.allow_tf32 = False
    RESULT.update(env=env_info(), args=vars(args), sage=sage_status())
    print(RESULT["env"], RESULT["sage"], flush=True)
    parts = args.parts.split(",")
    if "micro" in parts:
        try:
            RESULT["micro"] = micro(args.shapes.split(","))
        except Exception as exc:  # noqa: BLE001
            record_error("micro", exc)
        RESULT["diffusers_sage"] = probe_diffusers_sage()
        write_json("bench_sage2.json", RESULT)
    if "forward" in parts:
        try:
            RESULT["forward"] = forward(args)
        except Exception as exc:  # noqa: BLE001
            record_error("forward", exc)
        write_json("bench_sage2.json", RESULT)
    if RESULT.get("micro"):
        print(table(RESULT["micro"], ["shape", "kernel", "ms", "tflops", "vs_cudnn", "err_randn", "err_proj"]))
    if RESULT.get("forward"):
        print(table(RESULT["forward"], ["model", "variant", "s", "vs_stock_compiled", "err_vs_ours_bf16", "peak_gib",
                                        "first_call_s"]))
    if RESULT["errors"]:
        print("errors:", RESULT["errors"])


if __name__ == "__main__":
    main()
