"""Streaming generation (krea realtime-like): time to first frame and frames per second of ``WanStreamingPipeline``.

A random-weight Wan2.1-T2V-14B-shaped transformer (built from its config, no downloads) and a random Wan2.1 VAE run
:meth:`diffusers_wan_ext.WanStreamingPipeline.stream` with krea's realtime settings: blocks of 3 latent frames,
4 distilled steps (shift 5), block-causal attention over a KV cache of all earlier blocks, each block decoded (streaming
VAE decode) and copied to the host (``output_type="np"``) before it counts as available.  The text encoder is not
timed: a random umT5-sized context (512 x 4096) is passed as ``prompt_embeds``.

Measured per run (after ``--warmup`` untimed streams of the same length, so every cache length is warm):
  * time to first frame (TTFF): from calling ``stream`` to block 0's frames on the host;
  * per-block latency and the time at which each block's frames were available;
  * overall fps (all frames / time to the last frame) and steady-state fps (frames of blocks 1.. / time between the
    first and the last block), compared with the 16 fps playback rate of Wan;
  * peak GPU memory (weights + KV cache + activations).
  * ``--baseline``: the same video generated non-causally in one go (4 steps over all latent frames with full
    attention, then one VAE decode), i.e. what a plain few-step ``WanPipeline`` run does: its first frame arrives with
    its last.

Usage (GPU):   python benchmarks/bench_streaming.py                         # 480x832, 7 blocks = 81 frames
               python benchmarks/bench_streaming.py --blocks 9 --baseline --attention-backend auto
CPU smoke:     python benchmarks/bench_streaming.py --tiny
Prints a table and writes bench_streaming.json under $OUT (if set).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from _common import DIT_CONFIGS, env_info, table, write_json

TINY_DIT = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
                text_dim=64, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pipeline(args, device: torch.device):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from diffusers_wan_ext import WanStreamingPipeline

    torch.manual_seed(0)
    with torch.device(device):
        transformer = WanTransformer3DModel(**(TINY_DIT if args.tiny else DIT_CONFIGS["14b"]))
        vae = AutoencoderKLWan(**TINY_VAE) if args.tiny else AutoencoderKLWan()  # defaults = Wan2.1 VAE
    # built in fp32 on the device (14B: 57 GiB, fits an H100), then cast; the fp32 copy is freed before timing
    transformer = transformer.to(DTYPES[args.dtype]).eval().requires_grad_(False)
    vae = vae.to(DTYPES[args.vae_dtype]).eval().requires_grad_(False)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pipe = WanStreamingPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=args.shift))
    backend = "native"
    if args.attention_backend:
        backend = pipe.set_attention_backend(args.attention_backend, verbose=False)
    if args.compile:
        transformer.compile_repeated_blocks(dynamic=True)
    return pipe, backend


def run_stream(pipe, args, prompt_embeds, device) -> dict:
    blocks = []
    generator = torch.Generator(device="cpu").manual_seed(0)
    sync(device)
    start = time.perf_counter()
    last = start
    for chunk in pipe.stream(prompt_embeds=prompt_embeds, num_blocks=args.blocks,
                             num_frames_per_block=args.frames_per_block, height=args.height, width=args.width,
                             num_inference_steps=args.steps, shift=args.shift, generator=generator,
                             max_context_frames=args.max_context_frames, output_type="np"):
        now = time.perf_counter()  # "np" frames are on the host: the block is available
        blocks.append({"block": chunk.block_index, "frames": int(chunk.frames.shape[1]),
                       "available_s": now - start, "latency_s": now - last})
        last = now
    total = blocks[-1]["available_s"]
    frames = sum(b["frames"] for b in blocks)
    steady_frames = sum(b["frames"] for b in blocks[1:])
    steady_time = total - blocks[0]["available_s"]
    return {
        "ttff_s": blocks[0]["available_s"],
        "total_s": total,
        "frames": frames,
        "fps": frames / total,
        "steady_fps": steady_frames / steady_time if len(blocks) > 1 else None,
        "blocks": blocks,
    }


@torch.no_grad()
def run_baseline(pipe, args, prompt_embeds, device) -> dict:
    """Non-causal few-step generation of the same latent length in one go (full attention, one decode)."""
    from diffusers_wan_ext.vae import denormalize_latents
    from diffusers_wan_ext.pipelines.pipeline_wan_streaming import self_forcing_schedule

    t = pipe.transformer
    latent_frames = args.blocks * args.frames_per_block
    shape = (1, 16, latent_frames, args.height // 8, args.width // 8)
    timesteps, sigmas = self_forcing_schedule(args.steps, args.shift)
    sync(device)
    start = time.perf_counter()
    x = torch.randn(shape, device=device)
    for i in range(len(timesteps)):
        v = t(x.to(t.dtype), timesteps[i:i + 1].to(device), prompt_embeds, return_dict=False)[0]
        x0 = x - float(sigmas[i]) * v.float()
        x = x0 if i + 1 == len(timesteps) else (1 - float(sigmas[i + 1])) * x0 + float(sigmas[i + 1]) * torch.randn_like(x0)
    video = pipe.vae.decode(denormalize_latents(pipe.vae, x0.to(pipe.vae.dtype)), return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")
    total = time.perf_counter() - start
    return {"ttff_s": total, "total_s": total, "frames": int(frames.shape[1]), "fps": frames.shape[1] / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models at 32x32 (CPU smoke test)")
    parser.add_argument("--blocks", type=int, default=None, help="blocks per stream (default 7 = 81 frames; tiny 3)")
    parser.add_argument("--frames-per-block", type=int, default=3, help="latent frames per block (krea: 3)")
    parser.add_argument("--steps", type=int, default=4, help="distilled steps per block (krea realtime: 4)")
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--max-context-frames", type=int, default=None, help="sliding window (default: all frames)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES)
    parser.add_argument("--vae-dtype", default="bf16", choices=DTYPES)
    parser.add_argument("--attention-backend", default=None,
                        help="e.g. auto, native, _native_cudnn, _flash_3 (default: Diffusers' default, SDPA)")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the transformer blocks")
    parser.add_argument("--warmup", type=int, default=1, help="untimed streams before the timed ones")
    parser.add_argument("--runs", type=int, default=2, help="timed streams (the best is reported)")
    parser.add_argument("--baseline", action="store_true", help="also time non-causal one-shot generation")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if args.tiny:
        args.height, args.width = args.height or 32, args.width or 32
        args.blocks = args.blocks or 3
        if device.type == "cpu":
            args.dtype = args.vae_dtype = "fp32"
    args.height, args.width, args.blocks = args.height or 480, args.width or 832, args.blocks or 7
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    env = env_info()
    print(env, flush=True)
    pipe, backend = build_pipeline(args, device)
    text_dim = pipe.transformer.config.text_dim
    prompt_embeds = torch.randn(1, 512, text_dim, generator=torch.Generator().manual_seed(1)).to(device,
                                                                                                  pipe.transformer.dtype)
    for _ in range(args.warmup):
        run_stream(pipe, args, prompt_embeds, device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    runs = [run_stream(pipe, args, prompt_embeds, device) for _ in range(args.runs)]
    best = min(runs, key=lambda r: r["total_s"])
    best["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = {"env": env, "args": vars(args), "attention_backend": backend, "stream": best, "all_runs": runs}

    rows = [{"mode": "stream", "TTFF s": f"{best['ttff_s']:.3f}", "total s": f"{best['total_s']:.3f}",
             "frames": best["frames"], "fps": f"{best['fps']:.2f}",
             "steady fps": f"{best['steady_fps']:.2f}" if best["steady_fps"] else "-",
             "x realtime (16 fps)": f"{(best['steady_fps'] or best['fps']) / 16:.2f}",
             "peak GiB": f"{best['peak_gib']:.1f}" if best["peak_gib"] else "-"}]
    if args.baseline:
        run_baseline(pipe, args, prompt_embeds, device)  # warm-up
        base = run_baseline(pipe, args, prompt_embeds, device)
        result["baseline"] = base
        rows.append({"mode": "one-shot (non-causal)", "TTFF s": f"{base['ttff_s']:.3f}",
                     "total s": f"{base['total_s']:.3f}", "frames": base["frames"], "fps": f"{base['fps']:.2f}",
                     "steady fps": "-", "x realtime (16 fps)": f"{base['fps'] / 16:.2f}", "peak GiB": "-"})
    shape = "tiny" if args.tiny else "Wan2.1-14B"
    print(f"\n{shape} {args.height}x{args.width}, {args.blocks} blocks x {args.frames_per_block} latent frames, "
          f"{args.steps} steps, {args.dtype}, attention {backend}{', compiled' if args.compile else ''}, "
          f"device {device}")
    print(table(rows, list(rows[0])))
    print("per block (s available / latency):",
          ", ".join(f"{b['available_s']:.2f}/{b['latency_s']:.2f}" for b in best["blocks"]))
    write_json("bench_streaming.json", result)


if __name__ == "__main__":
    main()
