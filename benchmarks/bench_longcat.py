"""LongCat-Video DiT (13.6B) on one GPU: forward time, memory, the KV cache's saving, bf16 vs fp32 agreement.

Random weights at the release config (hidden 4096, 48 layers, 32 heads, umT5 width 4096), bf16, 480x832 and 93
frames (24 latent frames x 1560 tokens), a 512-token caption with padding.  Timed, each with the fastest installed
attention (``set_attention_backend("auto")``) and with SDPA (``native``):

  * t2v cfg        -- one forward of batch 2 (conditional + unconditional), 24 noisy frames
  * vc no-cache    -- continuation, 13 conditioning frames = 4 clean latent frames in the sequence, batch 2
  * vc cached      -- the same with the conditioning frames in a KV cache (20 noisy frames), + the cache build
  * vc cached == no-cache: max |difference| of the two continuation outputs on the noisy frames (bf16)

``--check-fp32`` also runs a 4-layer model in fp32 vs bf16 on the same inputs (relative error of the bf16 output).
``--tiny`` runs everything on a tiny model on the CPU (to check the script).

Usage (GPU machine):  python benchmarks/bench_longcat.py [--layers 48] [--check-fp32]
Prints a table and writes bench_longcat.json under $OUT.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import cuda_time, env_info, peak_memory, table, write_json

RELEASE = dict(num_attention_heads=32, attention_head_dim=128, num_layers=48, text_dim=4096, freq_dim=256,
               time_embed_dim=512, ffn_dim=11008)
TINY = dict(num_attention_heads=2, attention_head_dim=24, num_layers=2, text_dim=32, freq_dim=32, time_embed_dim=32,
            ffn_dim=256)


def build(config: dict, device, dtype):
    from diffusers_wan_ext import LongCatVideoTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = LongCatVideoTransformer3DModel(**config)
    with torch.no_grad():  # default init leaves the adaLN near zero; give every layer some signal
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.normal_(0, 0.01)
    model = model.to(dtype)
    for name, module in model.named_modules():  # as from_pretrained(dtype=...) does
        if any(keep in name.split(".") for keep in model._keep_in_fp32_modules):
            module.float()
    return model.eval().requires_grad_(False)


def inputs(config: dict, device, dtype, frames: int, height: int, width: int, text_len: int, batch: int = 2):
    g = torch.Generator(device="cpu").manual_seed(0)
    lat = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=g).to(device, dtype)
    lat = lat.expand(batch, -1, -1, -1, -1)  # CFG: the same latents in both halves
    ctx = torch.randn(batch, text_len, config["text_dim"], generator=g).to(device, dtype)
    mask = torch.zeros(batch, text_len, dtype=torch.long, device=device)
    mask[:, : text_len // 4] = 1
    return lat, torch.full((batch,), 700.0, device=device), ctx, mask


def timer(device, iters):
    if device == "cuda":
        return lambda fn: cuda_time(fn, warmup=1, iters=iters)["median_s"]

    def cpu(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters

    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--backends", default="auto,native")
    parser.add_argument("--check-fp32", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (script check)")
    args = parser.parse_args()
    from diffusers_wan_ext.runtime.attention import set_attention_backend

    tiny = args.tiny or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    config = dict(TINY) if tiny else dict(RELEASE, num_layers=args.layers)
    frames, height, width, text_len = (21, 64, 64, 16) if tiny else (93, 480, 832, 512)
    env = env_info()
    print(env, flush=True)
    model = build(config, device, dtype)
    lat, t, ctx, mask = inputs(config, device, dtype, frames, height, width, text_len)
    k = 4  # 13 conditioning frames
    time_it = timer(device, args.iters)
    rows, full = [], {"env": env, "config": config, "shape": [frames, height, width], "results": []}
    for backend in args.backends.split(","):
        name = set_attention_backend(model, backend, verbose=False, device=device)
        row = {"backend": name}
        with torch.no_grad():
            def t2v():
                return model(lat, t, ctx, encoder_attention_mask=mask).sample

            def vc():
                return model(lat, t, ctx, encoder_attention_mask=mask, num_cond_latents=k).sample

            cache = model.build_kv_cache(lat[:1, :, :k])

            def vc_cached():
                return model(lat[:, :, k:], t, ctx, encoder_attention_mask=mask, kv_cache=cache).sample

            if device == "cuda":
                with peak_memory() as mem:
                    t2v()
                row["t2v peak GiB"] = round(mem["peak_gib"], 2)
            row["t2v cfg s"] = round(time_it(t2v), 4)
            row["vc no-cache s"] = round(time_it(vc), 4)
            row["vc cached s"] = round(time_it(vc_cached), 4)
            row["cache build s"] = round(time_it(lambda: model.build_kv_cache(lat[:1, :, :k])), 4)
            row["cached vs no-cache"] = f"{(vc()[:, :, k:] - vc_cached()).abs().max().item():.2e}"
        rows.append(row)
        full["results"].append(row)
        print(table([row], list(row)), flush=True)
    if args.check_fp32:
        small = dict(config, num_layers=min(4, config["num_layers"]))
        ref = build(small, device, torch.float32)
        low = build(small, device, dtype)
        with torch.no_grad():
            a = ref(lat.float(), t, ctx.float(), encoder_attention_mask=mask, num_cond_latents=k).sample
            b = low(lat, t, ctx, encoder_attention_mask=mask, num_cond_latents=k).sample.float()
        full["fp32_vs_low_rel_err"] = ((a - b).norm() / a.norm()).item()
        print(f"{dtype} vs fp32 ({small['num_layers']} layers): relative error {full['fp32_vs_low_rel_err']:.3e}")
    print(table(rows, list(rows[0])))
    write_json("bench_longcat.json", full)


if __name__ == "__main__":
    main()
