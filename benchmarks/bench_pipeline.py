"""Full Wan2.1-T2V-1.3B generation (480x832x81, 50 steps, CFG 5): stock Diffusers against ours, in the same run.

Random weights at release sizes (umT5-XXL encoder, 1.3B transformer, Wan2.1 VAE); timing does not depend on their
values. The tokenizer is a tiny offline one (ids fit the 256k vocabulary). Variants:
  * stock            -- ``diffusers.WanPipeline`` as shipped, everything on the GPU
  * ours             -- ``WanExtPipeline``: fast defaults (optimize_transformer + optimize_vae), CFG batching
  * ours+teacache    -- + TeaCache (threshold 0.08, the reference's fast setting for 1.3B)
  * ours@24gb / @8gb -- + ``enable_vram_management`` with the 24 / 8 GiB presets (components start on the CPU);
                        ``ours@24gb/2cfg``: the 24 GiB plan with two CFG forwards per step (as @8gb always does)
Reports wall seconds, peak allocated GiB over the whole call (text encoder included) and the speedup vs stock.
Long video (issue 20): ``--model 14b --height 720 --width 1280 --frames 161 --sliding-window 8,6 --variants
ours@24gb/2cfg --steps 2`` runs the 14B config under the 24 GiB plan with sliding windows (the plan is made for the
window's tokens).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import torch

from _common import env_info, table, write_json

H, W, F, STEPS = 480, 832, 81, 50
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False)


def build_components(device="cuda", model: str = "1.3b"):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from _common import DIT_CONFIGS
    from diffusers_wan_ext.conversion.tokenizer import make_tiny_umt5_tokenizer

    tokenizer = make_tiny_umt5_tokenizer(tempfile.mkdtemp(), vocab_size=256)
    torch.manual_seed(0)
    with torch.device(device):
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).to(torch.bfloat16).eval()
        transformer = WanTransformer3DModel(**DIT_CONFIGS[model]).to(torch.bfloat16).eval()
        vae = AutoencoderKLWan().to(torch.bfloat16).eval()
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


def run(pipe, **kw):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = pipe(prompt="a corgi running on the beach at sunset", negative_prompt="blurry, low quality",
               height=H, width=W, num_frames=F, num_inference_steps=kw.pop("steps", STEPS), guidance_scale=5.0,
               generator=torch.Generator("cuda").manual_seed(0), output_type="pt", **kw).frames
    torch.cuda.synchronize()
    return out, time.time() - t0, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="stock,ours,ours+teacache,ours@24gb,ours@8gb")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--model", default="1.3b", help="transformer config of benchmarks/_common.DIT_CONFIGS")
    parser.add_argument("--height", type=int, default=H)
    parser.add_argument("--width", type=int, default=W)
    parser.add_argument("--frames", type=int, default=F)
    parser.add_argument("--sliding-window", help="SIZE,STRIDE in latent frames (our variants)")
    args = parser.parse_args()
    set_shape(args.height, args.width, args.frames)
    if args.sliding_window:
        size, stride = (int(v) for v in args.sliding_window.split(","))
        WINDOW.update(sliding_window_size=size, sliding_window_stride=stride)
    env = env_info()
    print(env, flush=True)
    comps = build_components(model=args.model)
    rows, ref, base = [], None, None
    for variant in args.variants.split(","):
        try:
            rows.append(one_variant(variant, comps, args.steps))
            if variant == "stock":
                base = rows[-1]["s"]
                ref = rows[-1].pop("_frames")
            else:
                frames = rows[-1].pop("_frames")
                rows[-1]["err_vs_stock"] = f"{((frames - ref).norm() / ref.norm()).item():.1e}" if ref is not None else ""
            if base:
                rows[-1]["speedup"] = round(base / rows[-1]["s"], 2)
        except Exception as exc:  # noqa: BLE001 - keep the other variants
            import traceback

            traceback.print_exc()
            rows.append(dict(variant=variant, s="ERR " + str(exc)[:60]))
        print(rows[-1], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    write_json("bench_pipeline.json", {"env": env, "rows": rows})
    window = f", sliding windows {args.sliding_window}" if args.sliding_window else ""
    print(f"\n{env.get('gpu')} | torch {env['torch']} | {args.model} {H}x{W}x{F}, {args.steps} steps, CFG 5{window}")
    print(table(rows, ["variant", "s", "peak_gib", "speedup", "err_vs_stock"]))


WINDOW: dict = {}  # sliding_window_size / sliding_window_stride of our variants (--sliding-window)


def set_shape(height: int, width: int, frames: int) -> None:
    global H, W, F
    H, W, F = height, width, frames


def one_variant(variant: str, comps: dict, steps: int) -> dict:
    """Build the pipeline of one variant on the shared components, warm it up, time one generation."""
    from diffusers import WanPipeline

    from diffusers_wan_ext import WanExtPipeline
    from diffusers_wan_ext.runtime import optimize_transformer, optimize_vae

    kw = {"steps": steps}
    if variant == "stock":
        pipe = WanPipeline(**comps)
    else:
        pipe = WanExtPipeline(**comps)
        kw.update(WINDOW)
        if "@" in variant:
            pipe.to("cpu")
            torch.cuda.empty_cache()
            # tight budgets plan for two CFG forwards (batched CFG doubles the transformer's activations)
            # ("ours@24gb/2cfg": the 24 GiB plan with two CFG forwards)
            tight = variant.endswith("@8gb") or variant.endswith("/2cfg")
            if tight:
                kw["cfg_batching"] = False
            plan = pipe.enable_vram_management(variant.split("@")[1].split("/")[0], device="cuda", verbose=False,
                                               cfg_batched=not tight, height=H, width=W, num_frames=F,
                                               sliding_window_size=WINDOW.get("sliding_window_size"))
            print(plan, flush=True)
        if not getattr(comps["transformer"], "_bench_optimized", False):
            # under a VRAM plan, keep the unfused projections only (the fused copies would cost memory)
            optimize_transformer(pipe, fuse_qkv="@" not in variant)
            optimize_vae(pipe.vae)
            comps["transformer"]._bench_optimized = True
        if variant.endswith("teacache"):
            pipe.enable_teacache(0.08)
    # warm-up (compilation, cuDNN autotune) on a 2-step run, not timed
    run(pipe, steps=2, **{k: v for k, v in kw.items() if k != "steps"})
    frames, sec, peak = run(pipe, **kw)
    row = dict(variant=variant, s=round(sec, 1), peak_gib=round(peak, 2), _frames=frames.float().cpu())
    if "@" in variant:
        pipe.disable_vram_management()
        pipe.to("cuda")
    if variant.endswith("teacache"):
        pipe.disable_teacache()
    return row


if __name__ == "__main__":
    main()
