"""SageAttention 2 (INT8 Q.K^T + FP8 P.V, sm90 kernels) and FlashAttention-3 (bf16 and fp8 e4m3 forward) for the Wan
DiT (issue 21: >= 1.5x stock compiled at 14B 720p with rel. error <= 2e-2 vs our bf16). Needs the wheels built by
``benchmarks/sage2_build.sh`` (installed in ``/tmp/sage2/site``) and ``benchmarks/fa3_build.sh`` (``/tmp/fa3/site``);
both folders are put first on ``sys.path`` here (``SAGE2_SITE`` / ``FA3_SITE`` override them). A kernel whose package
is missing is reported as "not run (...)" in one line and skipped.

Parts (``--parts``, default both):
  micro    self-attention alone at the 14B 720p shape (40 heads x 75600 tokens x 128) and the 1.3B 480p shape
           (12 x 32760 x 128), bf16 in and out: cuDNN SDPA against the ``--kernels`` (default: all): every
           sageattention kernel (``sageattn``'s automatic choice; the sm90 kernel with per-thread / per-warp Q/K
           quantization, without smooth_k; the sm89 fp8 kernel with each P.V accumulation; the sm80 fp16-P.V kernel;
           the Triton one), FlashAttention-3 bf16 (``fa3_bf16``) and fp8 (``fa3_fp8*``: q / k / v quantized to e4m3
           in the call with one scale per head from their amax, FA3's ``q/k/v_descale`` of shape (batch, heads);
           ``_smoothk``: K minus its per-channel mean over tokens first, which softmax ignores; ``_smoothkv``: V
           likewise, its mean added back to the output; ``_tensor``: one scale per tensor, for comparison), and the
           same quantization dequantized through SDPA (``emul_fp8*``, error only: what the e4m3 q / k / v alone
           cost). Time: CUDA events, median, quantization included (``quant_ms``: the q / k / v quantization alone).
           Rel. error ||o - o_sdpa|| / ||o_sdpa|| on two inputs: "randn" (q, k, v ~ N(0, 1)) and "proj" (a LayerNorm'd
           random activation projected to q / k / v, q and k RMS-normed with per-channel gains, k sharing half of
           q's projection and carrying a per-channel offset, like DiT q / k after their RMSNorm). Also (``--probe``,
           default on): whether Diffusers' own ``sage`` backend traces under ``torch.compile(fullgraph=True)``, and
           what our ``select_attention_backend`` picks with sage 2 importable.
  forward  the whole DiT forward (``--model``, default 14b; random weights, batch 1, 512 text tokens), one process,
           every variant timed interleaved with the others (``--iters`` rounds): stock compiled
           (``compile_repeated_blocks(fullgraph=True)``), ours (bf16, cuDNN attention: the error reference), ours fp8
           (scaled-fp8 file, ``optimize_transformer(fp8=True)``, as in bench_fp8.py), then with the ``--kernel``
           (default sm90): ours+kernel (bf16 GEMMs), fp8+kernel, fp8+kernel in the middle blocks only (``--skip``
           first/last blocks keep cuDNN, or ``--skip-fallback``; 0: no such row), fp8+each ``--extra-kernels``
           and ours+each ``--bf16-kernels``. Self-attention (attn1) of every block goes through one
           ``torch.library`` custom op (Diffusers' ``sage`` backend slot is pointed at it), so fullgraph compile
           traces it as one node; which kernel it runs, and in which blocks, is a Python setting read at run time,
           so all variants of one model share its compiled blocks (the fp8 quantization inside the op is its own
           small compiled function, ``--fp8-quant eager`` to skip that). Cross-attention keeps cuDNN. The variants
           without a sage / FA3 kernel are warmed first, then ``--wait-builds`` (background builds' folders) is
           waited for: the builds overlap the model set-up and the first compiles.

Every step is guarded: a failure prints one line and is recorded under "errors" in the JSON
($OUT/bench_sage2[_TAG].json). Usage (GPU machine, from benchmarks/ after run_gpu_round.sh's install):
  python3 bench_sage2.py --parts micro
  python3 bench_sage2.py --parts forward --kernel fa3_fp8 --extra-kernels sm90 --bf16-kernels fa3_fp8
  (gpu_round_fa3.sh runs both next to the two builds). CPU smoke test: python3 bench_sage2.py --tiny (a tiny
  micro shape and a tiny model: cuDNN is plain SDPA there, the sage / FA3 kernels report "not run", the emulated
  fp8 kernels run, and so does the custom-op plumbing of the forward).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

START = time.time()
SAGE2_SITE = os.environ.get("SAGE2_SITE", "/tmp/sage2/site")
FA3_SITE = os.environ.get("FA3_SITE", "/tmp/fa3/site")
# first on sys.path before anything imports diffusers (it looks for sageattention / flash_attn_interface at import),
# also while a background build has not filled them yet: ensure_kernels() refreshes the import caches after waiting
for _site in (FA3_SITE, SAGE2_SITE):
    if _site:
        sys.path.insert(0, _site)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import DIT_CONFIGS, DIT_SHAPES, TEXT_LEN, cuda_time, env_info, table, write_json  # noqa: E402

RESULT: dict = {"errors": {}, "not_run": {}}
HEAD_DIM = 128
#: micro-bench shapes: (heads, tokens); "tiny" is the CPU smoke shape (head dim 128 as everywhere)
MICRO_SHAPES = {"14b": (40, 75600), "1.3b": (12, 32760), "tiny": (2, 256)}
FP8_MAX = 448.0  # the largest float8_e4m3fn value

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
#: FlashAttention-3 (``flash_attn_interface.flash_attn_func``): short name -> q / k / v quantization (None: bf16 in;
#: else e4m3 with "head" scales (one per batch x head: FA3's descale shape) or one "tensor" scale, from the amax,
#: computed in the call; smooth_k: K minus its per-channel mean over tokens (softmax-invariant); smooth_v: V likewise,
#: the mean added back to the output, whose rows of P sum to one)
FA3_KERNELS = {
    "fa3_bf16": None,
    "fa3_fp8": dict(scales="head", smooth_k=False, smooth_v=False),
    "fa3_fp8_smoothk": dict(scales="head", smooth_k=True, smooth_v=False),
    "fa3_fp8_smoothkv": dict(scales="head", smooth_k=True, smooth_v=True),
    "fa3_fp8_tensor": dict(scales="tensor", smooth_k=False, smooth_v=False),
}
#: an FA3 fp8 kernel's q / k / v quantization, dequantized and run through SDPA (error only; no FA3 needed, runs on the
#: CPU): the error the e4m3 inputs alone cause (the rest of a kernel's is its fp8 P and accumulation)
EMUL_KERNELS = {"emul_fp8": "fa3_fp8", "emul_fp8_smoothkv": "fa3_fp8_smoothkv"}
ALL_KERNELS = ["cudnn", *SAGE_KERNELS, *FA3_KERNELS, *EMUL_KERNELS]


def record_error(key: str, exc: BaseException) -> None:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0][:400] if text else ''}"
    RESULT["errors"][key] = line
    print(f"[{key}] FAILED: {line}", flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def sage_status() -> dict:
    """The importable sageattention: version, file, compiled kernel families, the functions SAGE_KERNELS use."""
    try:
        import importlib.metadata as md

        import sageattention
    except Exception as exc:  # noqa: BLE001
        return dict(version=None, reason=first_line(exc))
    out = dict(version=md.version("sageattention"), file=sageattention.__file__,
               functions=sorted({fn for fn, _ in SAGE_KERNELS.values() if hasattr(sageattention, fn)}))
    try:
        import sageattention.core as core

        out.update(sm90=core.SM90_ENABLED, sm89=core.SM89_ENABLED, sm80=core.SM80_ENABLED)
    except Exception as exc:  # noqa: BLE001  (sageattention 1.x has no such flags)
        out["core"] = first_line(exc)
    return out


def fa3_status() -> dict:
    """The importable FlashAttention-3 (``flash_attn_interface``): version, file, the features it was built with."""
    try:
        import flash_attn_interface
        from flash_attn_config import CONFIG
    except Exception as exc:  # noqa: BLE001
        return dict(version=None, reason=first_line(exc))
    try:
        import importlib.metadata as md

        version = md.version("flash_attn_3")
    except Exception:  # noqa: BLE001
        version = "unknown"
    flags = CONFIG.get("build_flags", {})
    built = sorted(k.split("DISABLE_")[-1] for k, v in flags.items() if "DISABLE_" in k and not v)
    return dict(version=version, file=flash_attn_interface.__file__, built=built)


def ensure_kernels(args) -> None:
    """Once per process, before the first sageattention / FA3 import: wait for the background builds named by
    ``--wait-builds`` (each folder's DONE or FAILED marker; at most until ``--wait-timeout`` s after the start),
    refresh the import caches (the install folders were on sys.path before the builds filled them) and record what
    is importable."""
    if "fa3" in RESULT:
        return
    builds = {}
    for folder in filter(None, args.wait_builds.split(",")):
        state = None
        while True:
            state = next((m for m in ("DONE", "FAILED") if os.path.exists(os.path.join(folder, m))), None)
            if state or time.time() - START > args.wait_timeout:
                break
            time.sleep(5)
        builds[folder] = state or f"not done after {args.wait_timeout:.0f} s"
    importlib.invalidate_caches()
    RESULT.update(builds=builds, kernels_ready_after_s=round(time.time() - START), sage=sage_status(),
                  fa3=fa3_status())
    print(f"builds {builds} (after {RESULT['kernels_ready_after_s']} s); sage {RESULT['sage']}; fa3 {RESULT['fa3']}",
          flush=True)


def unavailable(name: str) -> str | None:
    """Why kernel ``name`` cannot run here (None: it can). Call after :func:`ensure_kernels`."""
    if name == "cudnn" or name in EMUL_KERNELS:
        return None
    if not torch.cuda.is_available():
        return "needs CUDA"
    if name in FA3_KERNELS:
        fa3 = RESULT.get("fa3", {})
        return None if fa3.get("version") else (f"FlashAttention-3 not installed ({fa3.get('reason', '?')}; "
                                                f"FA3_SITE={FA3_SITE}, built by benchmarks/fa3_build.sh)")
    sage, fn_name = RESULT.get("sage", {}), SAGE_KERNELS[name][0]
    if not sage.get("version"):
        return (f"sageattention not installed ({sage.get('reason', '?')}; SAGE2_SITE={SAGE2_SITE}, built by "
                "benchmarks/sage2_build.sh)")
    if fn_name not in sage.get("functions", ()):
        return f"sageattention {sage['version']} ({sage.get('file')}) has no {fn_name}"
    return None


def cudnn_attention(q, k, v, layout: str):
    """The reference: cuDNN SDPA on the GPU, plain SDPA on the CPU (``--tiny``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if layout == "NHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if q.is_cuda:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2) if layout == "NHD" else out


# ------------------------------------------------------------------------------------- FlashAttention-3 fp8
def quantize_fp8(x: torch.Tensor, scales: str, smooth: bool):
    """``(batch, seq, heads, dim)`` -> (e4m3 tensor, fp32 descale ``(batch, heads)``, fp32 per-channel mean
    ``(batch, 1, heads, dim)`` subtracted first, or None). ``scales``: "head" or "tensor" (then all equal).
    Per-head scales without smoothing (``fa3_fp8``) are the package's quantizer
    (``diffusers_wan_ext.runtime.flash3_fp8.quantize_fp8_heads``, what ``optimize_transformer(self_attention=
    "flash_3_fp8")`` runs); the other variants are this benchmark's own."""
    if scales == "head" and not smooth:
        from diffusers_wan_ext.runtime.flash3_fp8 import quantize_fp8_heads

        return (*quantize_fp8_heads(x), None)
    mean = x.mean(dim=1, keepdim=True, dtype=torch.float32) if smooth else None
    xs = x if mean is None else x - mean
    amax = xs.abs().amax(dim=(1, 3)).float()
    if scales == "tensor":
        amax = amax.amax().expand(amax.shape)
    descale = amax.clamp(min=1e-12) / FP8_MAX
    xq = (xs / descale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, descale.contiguous(), mean


#: how the op quantizes: "compile" (quantize_fp8 under torch.compile: two fused passes per tensor) or "eager"
QUANT: dict = {"mode": "compile", "compiled": None}


def quantize(x: torch.Tensor, scales: str, smooth: bool):
    """:func:`quantize_fp8`, compiled on CUDA unless ``--fp8-quant eager`` (or a compile failure: eager from then on,
    recorded once)."""
    if QUANT["mode"] == "compile" and x.is_cuda:
        if QUANT["compiled"] is None:
            QUANT["compiled"] = torch.compile(quantize_fp8, dynamic=False, fullgraph=True)
        try:
            return QUANT["compiled"](x, scales, smooth)
        except Exception as exc:  # noqa: BLE001
            record_error("fp8 quantization under torch.compile (eager from here on)", exc)
            QUANT["mode"] = "eager"
    return quantize_fp8(x, scales, smooth)


def quantize_qkv(q, k, v, quant: dict):
    """e4m3 q / k / v with their descales, and V's mean (None unless smooth_v)."""
    q8, q_descale, _ = quantize(q, quant["scales"], False)
    k8, k_descale, _ = quantize(k, quant["scales"], quant["smooth_k"])
    v8, v_descale, v_mean = quantize(v, quant["scales"], quant["smooth_v"])
    return (q8, k8, v8), (q_descale, k_descale, v_descale), v_mean


def fa3_attention(q, k, v, quant: dict | None):
    """FlashAttention-3 on ``(batch, seq, heads, dim)`` tensors (any strides with a unit last one); bf16 out. The fp8
    kernels call the package's op (``diffusers_wan_ext::flash3_fp8``) on the quantized tensors."""
    if quant is None:
        from flash_attn_interface import flash_attn_func

        out = flash_attn_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
    else:
        from diffusers_wan_ext.runtime.flash3_fp8 import flash3_fp8_op

        (q8, k8, v8), (qd, kd, vd), v_mean = quantize_qkv(q, k, v, quant)
        out = flash3_fp8_op(q8, k8, v8, qd, kd, vd)
    return out if quant is None or v_mean is None else out + v_mean.to(out.dtype)


def emulated_fp8(q, k, v, quant: dict):
    """:func:`fa3_attention`'s quantized inputs, dequantized (K and V without their means: the kernel's view) and run
    through the reference attention, V's mean added back."""
    (q8, k8, v8), descales, v_mean = quantize_qkv(q, k, v, quant)
    deq = [(t.float() * d[:, None, :, None]).to(q.dtype) for t, d in zip((q8, k8, v8), descales)]
    out = cudnn_attention(*deq, "NHD")
    return out if v_mean is None else out + v_mean.to(out.dtype)


def run_kernel(name: str, q, k, v, layout: str):
    if name == "cudnn":
        return cudnn_attention(q, k, v, layout)
    if name in FA3_KERNELS or name in EMUL_KERNELS:
        if layout == "HND":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = (fa3_attention(q, k, v, FA3_KERNELS[name]) if name in FA3_KERNELS
               else emulated_fp8(q, k, v, FA3_KERNELS[EMUL_KERNELS[name]]))
        return out.transpose(1, 2) if layout == "HND" else out
    import sageattention

    fn_name, kwargs = SAGE_KERNELS[name]
    return getattr(sageattention, fn_name)(q, k, v, tensor_layout=layout, is_causal=False, **kwargs)


# ------------------------------------------------------------------------------------------------ micro-bench
def make_qkv(heads: int, n: int, kind: str, device: str = "cuda", seed: int = 0):
    """(1, heads, n, 128) bf16 q, k, v (HND)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, heads, n, HEAD_DIM)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.bfloat16)  # noqa: E731
    if kind == "randn":
        return tuple(rnd(*shape) for _ in range(3))
    dim = heads * HEAD_DIM
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


def usable_kernels(kernels: list[str], where: str) -> list[str]:
    """The kernels that can run here; one "not run (why)" line for each other one."""
    usable = []
    for name in kernels:
        why = unavailable(name)
        if why:
            RESULT["not_run"][f"{where} {name}"] = why
            print(f"[{where}] {name}: not run ({why})", flush=True)
        else:
            usable.append(name)
    return usable


def time_quantization(name: str, q, k, v) -> float | None:
    """Milliseconds of an FA3 fp8 kernel's q / k / v quantization alone (None for the other kernels)."""
    quant = FA3_KERNELS.get(name)
    if quant is None:
        return None
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return time_ms(functools.partial(quantize_qkv, q, k, v, quant))


def micro_shape(shape_name: str, kernels: list[str], device: str) -> list[dict]:
    heads, n = MICRO_SHAPES[shape_name]
    flops = 4 * heads * n * n * HEAD_DIM
    errs, timed, quant_ms = {name: {} for name in kernels}, {}, {}
    for kind in ("randn", "proj"):
        try:
            q, k, v = make_qkv(heads, n, kind, device)
            ref = cudnn_attention(q, k, v, "HND").float()
        except Exception as exc:  # noqa: BLE001
            record_error(f"micro {shape_name} inputs {kind}", exc)
            continue
        for name in kernels:
            try:
                errs[name][kind] = rel_err(run_kernel(name, q, k, v, "HND"), ref)
                print(f"[micro {shape_name}] {name}: rel. error {errs[name][kind]:.2e} ({kind})", flush=True)
            except Exception as exc:  # noqa: BLE001
                record_error(f"micro {shape_name} {name} ({kind})", exc)
        del ref
        if kind == "randn" and device == "cuda":
            for name in kernels:
                if kind not in errs[name] or name in EMUL_KERNELS:
                    continue
                try:
                    timed[name] = time_ms(functools.partial(run_kernel, name, q, k, v, "HND"))
                    quant_ms[name] = time_quantization(name, q, k, v)
                    print(f"[micro {shape_name}] {name}: {timed[name]:.2f} ms (quantization {quant_ms[name]} ms)",
                          flush=True)
                except Exception as exc:  # noqa: BLE001
                    record_error(f"micro {shape_name} {name} timing", exc)
        del q, k, v
        if device == "cuda":
            torch.cuda.empty_cache()
    rows, base = [], timed.get("cudnn")
    for name in kernels:
        ms, qms = timed.get(name), quant_ms.get(name)
        row = dict(shape=shape_name, kernel=name, ms=None if ms is None else round(ms, 2),
                   tflops=None if ms is None else round(flops / ms / 1e9),
                   vs_cudnn=None if not (ms and base) else round(base / ms, 3),
                   quant_ms=None if qms is None else round(qms, 2),
                   err_randn=f"{errs[name]['randn']:.2e}" if "randn" in errs[name] else "-",
                   err_proj=f"{errs[name]['proj']:.2e}" if "proj" in errs[name] else "-")
        rows.append(row)
        print(row, flush=True)
    return rows


def micro(args, device: str) -> list[dict]:
    ensure_kernels(args)
    kernels = usable_kernels(["cudnn"] + [k for k in args.kernels.split(",") if k and k != "cudnn"], "micro")
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    return [row for shape_name in shapes for row in micro_shape(shape_name, kernels, device)]


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
#: what the self-attention op runs: a kernel name (one of ALL_KERNELS), the blocks that use it (None: all; the others
#: use the fallback kernel, cuDNN unless set), and a call counter (reset per forward: the op's n-th call is block n)
SELF_ATTN = {"kernel": "cudnn", "layers": None, "fallback": "cudnn", "num_layers": 40, "calls": 0}


@torch.library.custom_op("bench_sage2::self_attn", mutates_args=())
def self_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    layer = SELF_ATTN["calls"] % SELF_ATTN["num_layers"]
    SELF_ATTN["calls"] += 1
    layers = SELF_ATTN["layers"]
    name = SELF_ATTN["kernel"] if layers is None or layer in layers else SELF_ATTN["fallback"]
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
    """A model and the self-attention setting it runs with (``None``: the model does not use the op; ``layers``: the
    blocks that run ``kernel``, the others run ``fallback``)."""

    def __init__(self, model, kernel: str | None = None, layers=None, fallback: str = "cudnn"):
        self.model, self.kernel, self.layers, self.fallback = model, kernel, layers, fallback

    def __call__(self, kw: dict) -> torch.Tensor:
        if self.kernel is not None:
            SELF_ATTN.update(kernel=self.kernel, layers=self.layers, fallback=self.fallback, calls=0)
        with torch.no_grad():
            return self.model(**kw)[0]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_call(variant: Variant, kw: dict) -> float:
    sync()
    t0 = time.perf_counter()
    variant(kw)
    sync()
    return time.perf_counter() - t0


def warm(variants: dict, kw: dict, ref, info: dict, file_ref=None):
    """Warm every variant (first call: compile; its error vs ``ref`` and, when given, vs ``file_ref``; one more call,
    timed, for the peak). ``ref`` None: the variant named "ours" gives it (warm it first). Failures are recorded and
    the variant dropped. Returns ``ref``."""
    cuda = torch.cuda.is_available()
    for name, variant in list(variants.items()):
        try:
            t0 = time.perf_counter()
            out = variant(kw).float()
            info[name] = dict(first_call_s=round(time.perf_counter() - t0, 1))
            if ref is None and name == "ours":
                ref = out
            info[name]["err"] = rel_err(out, ref) if ref is not None else None
            if file_ref is not None:
                info[name]["err_file"] = rel_err(out, file_ref)
            del out
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            info[name]["warm_s"] = round(timed_call(variant, kw), 4)  # a timing even if the rounds get cut short
            if cuda:
                info[name]["peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
            print(f"{name}: warm {info[name]} (at {time.time() - START:.0f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001
            record_error(f"forward warm {name}", exc)
            variants.pop(name)
            info.pop(name, None)
    return ref


def time_rounds(variants: dict, kw: dict, iters: int, info: dict) -> None:
    """``iters`` rounds, every variant once per round (interleaved); the median per variant."""
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


def write_fp8_file(stock, name: str) -> Path | None:
    from diffusers_wan_ext.conversion.dit import export_dit_state_dict
    from diffusers_wan_ext.utils.single_file import write_single_file

    try:
        path = Path(tempfile.mkdtemp()) / f"dit_{name}_fp8_scaled.safetensors"
        t0 = time.perf_counter()
        write_single_file(path, export_dit_state_dict(stock.state_dict()), "comfy-fp8-scaled")
    except Exception as exc:  # noqa: BLE001
        record_error("writing the fp8 file", exc)
        return None
    print(f"{name}: wrote {path.stat().st_size / 2**30:.2f} GiB scaled fp8 in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return path


def kernel_variants(args, ours, fp8_model, n: int) -> dict:
    """The variants that need a sage / FA3 kernel (built after the plain ones are warm)."""
    kernel, later = args.kernel, {}
    for k in [kernel] + split(args.bf16_kernels):
        later[f"ours+{k}"] = Variant(ours, k)
    if fp8_model is not None:
        later[f"fp8+{kernel}"] = Variant(fp8_model, kernel)
        if args.skip > 0:
            middle, fallback = set(range(args.skip, n - args.skip)), args.skip_fallback
            label = f"fp8+{kernel} blocks {args.skip}..{n - args.skip - 1}" + (
                f" (others {fallback})" if fallback != "cudnn" else "")
            later[label] = Variant(fp8_model, kernel, middle, fallback)
        for extra in split(args.extra_kernels):
            later[f"fp8+{extra}"] = Variant(fp8_model, extra)
    for name, variant in list(later.items()):
        why = unavailable(variant.kernel) or unavailable(variant.fallback)
        if why:
            RESULT["not_run"][f"forward {name}"] = why
            print(f"[forward] {name}: not run ({why})", flush=True)
            later.pop(name)
    return later


def package_route_variant(path, device: str, attention: str, cuda: bool, reports: dict) -> dict:
    """The fp8 file loaded once more and set up the way a user would: ``optimize_transformer(fp8=True,
    self_attention="flash_3_fp8")`` (the package's backend, its quantization fused by the regional compile); empty
    with a "not run" line when the package refuses it."""
    from diffusers_wan_ext.conversion.quantized_dit import load_quantized_dit
    from diffusers_wan_ext.runtime import flash3_fp8_unavailable_reason, optimize_transformer

    name = "package: fp8 + flash_3_fp8"
    why = flash3_fp8_unavailable_reason(device, torch.bfloat16, HEAD_DIM) if cuda else "needs CUDA"
    if why:
        RESULT["not_run"][f"forward {name}"] = why
        print(f"[forward] {name}: not run ({why})", flush=True)
        return {}
    model = load_quantized_dit(path, torch_dtype=torch.bfloat16, device=device).eval().requires_grad_(False)
    reports[name] = optimize_transformer(model, compile=True, verbose=False, fp8=True, attention=attention,
                                         self_attention="flash_3_fp8")
    return {name: Variant(model)}


def forward(args) -> list[dict]:
    from bench_fp8 import TINY, TINY_SHAPE, inputs_for, sibling
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext.conversion.quantized_dit import load_quantized_dit
    from diffusers_wan_ext.runtime import optimize_transformer

    cuda = torch.cuda.is_available() and not args.tiny
    device, name = ("cuda", args.model) if cuda else ("cpu", "tiny")
    config, shape = (DIT_CONFIGS[name], DIT_SHAPES[name]) if cuda else (TINY, TINY_SHAPE)
    attention = "_native_cudnn" if cuda else "native"  # cross-attention (and the error reference's choice)
    kw = inputs_for(shape, device, TEXT_LEN if cuda else 16)
    torch.manual_seed(0)
    with torch.device(device):
        stock = WanTransformer3DModel(**config).to(torch.bfloat16).eval().requires_grad_(False)
    path = write_fp8_file(stock, name)
    ours = sibling(stock, config)
    if cuda:
        stock.compile_repeated_blocks(fullgraph=True)
    reports = {"ours": optimize_transformer(ours, compile=cuda, verbose=False, attention=attention)}
    n = use_self_attn_op(ours)
    fp8_model = file_ref = None
    if path is not None:
        try:
            fp8_model = load_quantized_dit(path, torch_dtype=torch.bfloat16, device=device).eval().requires_grad_(False)
            if args.file_ref:  # the file's weights, upcast, bf16 GEMMs and SDPA: the reference without fast kernels
                with torch.no_grad():
                    file_ref = fp8_model(**kw)[0].float()
            # cuDNN for cross-attention, set without touching Diffusers' global default (stock's backend)
            reports["ours fp8"] = optimize_transformer(fp8_model, compile=False, verbose=False, fp8=True,
                                                       attention=attention)
            use_self_attn_op(fp8_model)
            if cuda:
                fp8_model.compile_repeated_blocks(fullgraph=True)
        except Exception as exc:  # noqa: BLE001
            record_error("fp8 model", exc)
            fp8_model = None
    # the plain variants first ("ours", the error reference, before all): they overlap the background builds
    variants = {"ours": Variant(ours, "cudnn"), "stock compiled": Variant(stock)}
    if fp8_model is not None:
        variants["ours fp8"] = Variant(fp8_model, "cudnn")
    info = {}
    ref = warm(variants, kw, None, info, file_ref)
    ensure_kernels(args)
    later = kernel_variants(args, ours, fp8_model, n)
    if args.package_route and path is not None:
        later.update(package_route_variant(path, device, attention, cuda, reports))
    if path is not None:
        path.unlink()
    warm(later, kw, ref, info, file_ref)
    RESULT["forward_warm"] = info  # written now: the timed rounds may not fit the part's time limit
    write_json(args.json_name, RESULT)
    variants.update(later)
    time_rounds(variants, kw, args.iters, info)
    base = info.get("stock compiled", {}).get("median_s")
    rows = []
    for variant, r in info.items():
        if "median_s" not in r:
            continue
        rows.append(dict(model=name, variant=variant, s=round(r["median_s"], 4),
                         vs_stock_compiled=round(base / r["median_s"], 3) if base else None,
                         err_vs_ours_bf16="-" if r.get("err") is None else f"{r['err']:.2e}",
                         err_vs_file_bf16="-" if r.get("err_file") is None else f"{r['err_file']:.2e}",
                         peak_gib=r.get("peak_gib"), first_call_s=r.get("first_call_s"), warm_s=r.get("warm_s"),
                         runs=r.get("runs"),
                         report=reports.get(variant, "")))
        print({k: v for k, v in rows[-1].items() if k != "report"}, flush=True)
    del stock, ours, fp8_model, variants, later
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def split(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="micro,forward", help="micro, forward or both (comma-separated)")
    parser.add_argument("--shapes", default="14b,1.3b", help="micro-bench shapes: 14b, 1.3b")
    parser.add_argument("--kernels", default=",".join(ALL_KERNELS[1:]),
                        help="micro: kernels besides cuDNN (comma-separated; default all)")
    parser.add_argument("--model", default="14b", help="forward: a key of _common.DIT_CONFIGS")
    parser.add_argument("--kernel", default="sm90", help=f"forward: kernel, one of {', '.join(ALL_KERNELS)}")
    parser.add_argument("--extra-kernels", default="", help="forward: more fp8 variants (comma-separated kernels)")
    parser.add_argument("--bf16-kernels", default="", help="forward: more ours (bf16 GEMM) variants (kernels)")
    parser.add_argument("--skip", type=int, default=4,
                        help="forward: first/last blocks that keep cuDNN (subset row; 0: no subset row)")
    parser.add_argument("--skip-fallback", default="cudnn",
                        help="forward: the kernel of the first/last blocks in the subset row (default cudnn)")
    parser.add_argument("--iters", type=int, default=2, help="forward: timed rounds")
    parser.add_argument("--file-ref", action="store_true",
                        help="forward: also the error vs the fp8 file's weights upcast (bf16 GEMMs, SDPA): what the "
                             "fast kernels add, without the file's own rounding")
    parser.add_argument("--package-route", action="store_true",
                        help="forward: a row through optimize_transformer(fp8=True, self_attention='flash_3_fp8')")
    parser.add_argument("--fp8-quant", choices=("compile", "eager"), default="compile",
                        help="FA3 fp8: the q / k / v quantization compiled (default) or eager")
    parser.add_argument("--wait-builds", default="",
                        help="background build folders (DONE / FAILED markers, e.g. /tmp/fa3,/tmp/sage2) to wait "
                             "for before the first sage / FA3 use")
    parser.add_argument("--wait-timeout", type=float, default=480.0,
                        help="stop waiting for the builds this many seconds after the start")
    parser.add_argument("--no-probe", dest="probe", action="store_false",
                        help="micro: skip the Diffusers sage backend probe")
    parser.add_argument("--tag", default="", help="JSON file name: bench_sage2_TAG.json")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: tiny micro shape and tiny model (also used when there is no GPU)")
    args = parser.parse_args()
    for k in [args.kernel, args.skip_fallback] + split(args.extra_kernels) + split(args.bf16_kernels) + split(
            args.kernels):
        if k not in ALL_KERNELS:
            parser.error(f"--kernel / --kernels / --extra-kernels / --bf16-kernels: unknown kernel {k!r} "
                         f"(one of {', '.join(ALL_KERNELS)})")
    args.tiny = args.tiny or not torch.cuda.is_available()
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:  # the op's plumbing with a kernel that runs on the CPU
        args.extra_kernels = ",".join(split(args.extra_kernels) + ["emul_fp8_smoothkv"])
    QUANT["mode"] = args.fp8_quant
    dyn = torch._dynamo.config  # the quantization compiles once per shape / setting: room for all of them
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(dyn, attr):
            setattr(dyn, attr, max(getattr(dyn, attr), 32))
            break
    torch.backends.cuda.matmul.allow_tf32 = False
    args.json_name = json_name = f"bench_sage2{'_' + args.tag if args.tag else ''}.json"
    RESULT.update(env=env_info(), args=vars(args))
    print(RESULT["env"], flush=True)
    parts = args.parts.split(",")
    if "micro" in parts:
        try:
            RESULT["micro"] = micro(args, device)
        except Exception as exc:  # noqa: BLE001
            record_error("micro", exc)
        if args.probe and device == "cuda":
            RESULT["diffusers_sage"] = probe_diffusers_sage()
        write_json(json_name, RESULT)
    if "forward" in parts:
        try:
            RESULT["forward"] = forward(args)
        except Exception as exc:  # noqa: BLE001
            record_error("forward", exc)
        write_json(json_name, RESULT)
    if RESULT.get("micro"):
        print(table(RESULT["micro"], ["shape", "kernel", "ms", "tflops", "vs_cudnn", "quant_ms", "err_randn",
                                      "err_proj"]))
    if RESULT.get("forward"):
        print(table(RESULT["forward"], ["model", "variant", "s", "vs_stock_compiled", "err_vs_ours_bf16",
                                        "err_vs_file_bf16", "peak_gib", "first_call_s"]))
    if RESULT["not_run"]:
        print("not run:", RESULT["not_run"])
    if RESULT["errors"]:
        print("errors:", RESULT["errors"])


if __name__ == "__main__":
    main()
