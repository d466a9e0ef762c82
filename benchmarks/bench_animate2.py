"""Wan2.2-Animate-2-14B transformer at release size (random weights): ours against stock Diffusers, same run.

One clip = a reference pass (``kv_cache_mode="extract"``: every block caches the reference video's K/V) and a
generation pass per denoising step (``kv_cache_mode="cached"``: each generation latent frame attends to all generation
tokens plus the cached tokens of its reference frame). Variants, on one set of weights:
  * stock compiled -- ``diffusers.WanAnimate2Transformer3DModel`` with its flex-attention ``BlockMask`` (which needs
                      ``torch.compile``: ``compile_repeated_blocks()``; uncompiled, flex materializes the full score
                      matrix); the error reference
  * ours           -- ``WanAnimate2ExtTransformer3DModel.from_stock`` (weights shared): the dense frame-by-frame
                      generation attention (plain SDPA, no mask, no compile)
  * ours compiled  -- ours + ``compile_repeated_blocks()``
Reported per variant: seconds of the reference pass, seconds per generation pass (median), peak GiB allocated above
the weights (the K/V cache included), relative error of the generation output vs stock.

Usage (GPU machine): python bench_animate2.py                   (480x832, 20 reference + 21 generation latent frames)
                     python bench_animate2.py --height 720 --width 1280 --offload-kv   (K/V cache in CPU memory)
CPU smoke test:      python bench_animate2.py --tiny
Writes bench_animate2.json under $OUT.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from _common import env_info, table, write_json

TINY = dict(text_len=16, dim=48, ffn_dim=96, freq_dim=32, text_dim=32, num_heads=2, num_layers=2)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_inputs(config: dict, ref_frames: int, lat_h: int, lat_w: int, device: str, dtype, clip_dim: int) -> dict:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    in_dim, text_len, text_dim = config.get("in_dim", 36), config.get("text_len", 512), config.get("text_dim", 4096)
    return dict(latents=r(16, ref_frames + 1, lat_h, lat_w), y=r(in_dim - 16, ref_frames + 1, lat_h, lat_w),
                ref=r(16, ref_frames, lat_h, lat_w), ref_y=r(in_dim - 16, ref_frames, lat_h, lat_w),
                context=r(text_len, text_dim), clip=r(1, 257, clip_dim), t=torch.tensor([700.0], device=device))


def passes(model, x: dict, origin_len: int, origin_area: list[int], offload_kv: bool):
    """(reference pass, generation pass) as callables sharing one K/V cache; the first fills it."""
    grid_ref = torch.tensor([[x["ref"].shape[1], x["ref"].shape[2] // 2, x["ref"].shape[3] // 2]])
    grid = torch.tensor([[x["latents"].shape[1], x["latents"].shape[2] // 2, x["latents"].shape[3] // 2]])
    cache = model.new_kv_cache("cpu") if offload_kv and hasattr(model, "new_kv_cache") and x["t"].is_cuda else (
        model.new_kv_cache() if hasattr(model, "new_kv_cache") else None)
    if cache is None:
        from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

        cache = WanAnimate2KVCache(len(model.blocks))

    def extract():
        cache.clear()
        model([x["ref"]], x["t"], [x["context"]], [x["ref_y"]], cache, "extract", seq_len=int(grid_ref.prod()),
              encoder_hidden_states_image=x["clip"], offset_grid_sizes=grid_ref)

    def generate():
        return model([x["latents"]], x["t"], [x["context"]], [x["y"]], cache, "cached", seq_len=int(grid.prod()),
                     encoder_hidden_states_image=x["clip"], reference_grid_sizes=grid_ref, origin_len=origin_len,
                     origin_area=origin_area, return_dict=False)[0][0]

    return extract, generate, cache


def timed(fn, device: str) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


@torch.no_grad()
def run_variant(name: str, model, x: dict, args, device: str) -> dict:
    origin_len = (args.ref_frames - 1) * 4 + 1
    extract, generate, cache = passes(model, x, origin_len, [args.height, args.width], args.offload_kv)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    first_extract, _ = timed(extract, device)   # first calls compile
    first_gen, out = timed(generate, device)
    ext_s, _ = timed(extract, device)
    gen = [timed(generate, device)[0] for _ in range(args.iters)]
    row = dict(variant=name, extract_s=round(ext_s, 3), generate_s=round(statistics.median(gen), 3),
               first_calls_s=round(first_extract + first_gen, 1), runs=[round(s, 4) for s in gen])
    if device == "cuda":
        row["peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
    cache.clear()
    return row, out.float().cpu()


def build(args, device: str, dtype):
    from diffusers import WanAnimate2Transformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanAnimate2Transformer3DModel(**(TINY if args.tiny else {}))
    return model.to(dtype).eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="stock compiled,ours,ours compiled")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--ref-frames", type=int, default=20, help="reference latent frames (generation: one more)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--offload-kv", action="store_true", help="ours: keep the reference K/V in CPU memory")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 64x64, 3 reference frames")
    args = parser.parse_args()
    from diffusers_wan_ext.models import WanAnimate2ExtTransformer3DModel

    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    if args.tiny:
        args.height, args.width, args.ref_frames, args.iters = 64, 64, 3, 1
    stock = build(args, device, dtype)
    clip_dim = stock.img_emb.proj[0].weight.shape[0]
    x = make_inputs(dict(stock.config), args.ref_frames, args.height // 8, args.width // 8, device, dtype, clip_dim)
    env = env_info()
    print(env, flush=True)
    rows, ref = [], None
    for variant in args.variants.split(","):
        try:
            if variant.startswith("stock"):
                model = stock
                if variant == "stock compiled" and not args.tiny:
                    model.compile_repeated_blocks()
            else:
                model = WanAnimate2ExtTransformer3DModel.from_stock(stock).eval()
                if variant == "ours compiled" and not args.tiny:
                    model.compile_repeated_blocks()
            row, out = run_variant(variant, model, x, args, device)
            if ref is None:
                ref = out
            row["rel_err_vs_first"] = f"{((out - ref).norm() / ref.norm()).item():.2e}"
        except Exception as exc:  # noqa: BLE001 - report the variant's failure and go on
            row = dict(variant=variant, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        rows.append(row)
        print(row, flush=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        write_json("bench_animate2.json", {"env": env, "args": vars(args), "rows": rows})
    print(f"\n{env.get('gpu', 'cpu')} | Animate-2 {'tiny' if args.tiny else '14B'} {args.height}x{args.width}, "
          f"{args.ref_frames} reference + {args.ref_frames + 1} generation latent frames")
    print(table(rows, ["variant", "extract_s", "generate_s", "peak_gib", "rel_err_vs_first", "first_calls_s", "error"]))


if __name__ == "__main__":
    main()
