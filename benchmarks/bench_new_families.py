"""Release-size single forwards of the newer families (random weights, bf16): Wan-Dancer global / local DiT and
MOVA-360p / MOVA-720p joint forward (video tower + audio DiT + dual-tower bridge).  No stock Diffusers counterpart
exists, so each row stands alone: median seconds of ``--iters`` forwards after ``--warmup`` ones, peak GiB allocated
(weights included) and the weights' GiB.

Rows (release configs: the classes' defaults are the release values -- ``conversion/dancer.py``, ``conversion/mova.py``
and ``families/dancer.py`` / ``families/mova.py`` declare the same):
  * ``dancer-global`` -- ``WanDancerTransformer3DModel`` (Wan2.1-I2V-14B + music encoder / injection, reference-image
    tokens, global patch embedding / head) at the family's sampling size: 1280x720 portrait, one 149-keyframe segment
    at 7.5 fps -> latents ``[1, 36, 38, 160, 90]`` (136 800 tokens), music features ``[596, 35]`` (19.9 s at 30 per
    second), umT5 ``[1, 512, 4096]``, keyframe CLIP ``[1, 257, 1280]``, reference-image CLIP ``[1, 257, 1280]``;
  * ``dancer-local`` -- the same class on its local path (30 fps): a 149-frame segment, music ``[149, 35]``;
  * ``mova-360p`` / ``mova-720p`` -- ``mova_joint_forward``: ``WanTransformer3DModel`` 14B (Wan2.2-I2V without CLIP,
    36 input channels) + ``MovaAudioTransformer1DModel`` (1536 wide, 30 layers) + ``MovaDualTowerBridge`` ("full"
    interaction, 30 layer pairs), 121 frames at 24 fps: video latents ``[1, 16, 31, 44, 80]`` (27 280 tokens) /
    ``[1, 16, 31, 90, 160]`` (111 600 tokens) + I2V ``y`` (20 channels), audio latents ``[1, 128, 253]`` (48 kHz,
    hop 960).
``--compile`` adds a row per model with ``compile_repeated_blocks(fullgraph=True)`` (the compile step of
``runtime.speed.optimize_transformer``; both MOVA towers), timed after its warm-up (compile) calls; the compile time
is reported separately.  A row that does not fit the GPU is reported as OOM and the next one runs.

Usage (GPU):  python bench_new_families.py                                   # all four rows, eager
              python bench_new_families.py --rows mova-360p --compile --iters 3
CPU smoke:    python bench_new_families.py --tiny
Writes bench_new_families.json under $OUT.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import torch

from _common import env_info, table, write_json

# The Wan 14B DiT shared by the rows (Wan2.1-I2V-14B widths); the classes' defaults are the rest of the release.
DIT_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, text_dim=4096, freq_dim=256,
               ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
DIT_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32,
                ffn_dim=96, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
# row -> latent frames, latent height, latent width, fps, music feature frames (Dancer)
SHAPES = {
    "dancer-global": dict(frames=38, h=160, w=90, fps=7.5, music=596),
    "dancer-local": dict(frames=38, h=160, w=90, fps=30.0, music=149),
    "mova-360p": dict(frames=31, h=44, w=80, fps=24.0, audio=253),
    "mova-720p": dict(frames=31, h=90, w=160, fps=24.0, audio=253),
}
TINY_SHAPES = {
    "dancer-global": dict(frames=3, h=8, w=8, fps=7.5, music=40),
    "dancer-local": dict(frames=3, h=8, w=8, fps=30.0, music=12),
    "mova-360p": dict(frames=3, h=8, w=8, fps=24.0, audio=9),
    "mova-720p": dict(frames=3, h=8, w=12, fps=24.0, audio=9),
}
ROWS = tuple(SHAPES)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(factory, device: torch.device, dtype: torch.dtype):
    """A random-weight model built directly on ``device`` in ``dtype``; its ``_keep_in_fp32_modules`` in fp32 (as
    ``from_pretrained`` keeps them)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = factory()
    finally:
        torch.set_default_dtype(default)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            module.float()
    for name, param in model.named_parameters():
        if name.split(".")[-1] in keep:
            param.data = param.data.float()
    return model.eval().requires_grad_(False)


def dancer_case(row: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """``(models, forward)`` of a Wan-Dancer row."""
    from diffusers_wan_ext.models import WanDancerTransformer3DModel

    s = (TINY_SHAPES if tiny else SHAPES)[row]
    if tiny:
        cfg = dict(DIT_TINY, in_channels=36, image_dim=40, added_kv_proj_dim=48, text_len=16, music_latent_dim=32,
                   music_ff_size=64, music_inject_layers=(0, 2))
    else:  # release: in 36, CLIP 1280, 8 music-injection layers, reference-image embedder, global modules, ref_conv
        cfg = dict(DIT_14B, in_channels=36, ref_conv_in_channels=16)
    model = build(lambda: WanDancerTransformer3DModel(**cfg), device, dtype)
    c = model.config
    g = torch.Generator().manual_seed(0)
    rand = lambda *size: torch.randn(*size, generator=g).to(device, dtype)  # noqa: E731
    kw = dict(hidden_states=rand(1, c.in_channels, s["frames"], s["h"], s["w"]),
              timestep=torch.tensor([700.0], device=device),
              encoder_hidden_states=rand(1, c.text_len, c.text_dim),
              encoder_hidden_states_image=rand(1, c.image_tokens, c.image_dim),
              reference_image_embeds=rand(1, c.image_tokens, c.image_dim),
              music_features=torch.randn(s["music"], c.music_feature_dim, generator=g).to(device),
              fps=s["fps"], return_dict=False)
    tokens = s["frames"] * (s["h"] // 2) * (s["w"] // 2)
    return {"transformer": model}, (lambda: model(**kw)[0]), tokens


def mova_case(row: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """``(models, forward)`` of a MOVA row (one joint forward of the video expert, the audio DiT and the bridge)."""
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext.models import MovaAudioTransformer1DModel, MovaDualTowerBridge
    from diffusers_wan_ext.models.mova_joint_forward import mova_joint_forward

    s = (TINY_SHAPES if tiny else SHAPES)[row]
    if tiny:
        video_cfg = dict(DIT_TINY, in_channels=36, out_channels=16)
        audio_cfg = dict(num_attention_heads=3, attention_head_dim=12, text_dim=32, freq_dim=24, ffn_dim=60,
                         num_layers=2, rope_max_seq_len=1024)
        bridge_cfg = dict(visual_layers=3, audio_layers=2, visual_hidden_dim=48, audio_hidden_dim=36, head_dim=12)
    else:  # release: Wan2.2-I2V-A14B expert without CLIP; audio DiT and bridge: the classes' defaults
        video_cfg, audio_cfg, bridge_cfg = dict(DIT_14B, in_channels=36, out_channels=16), {}, {}
    video = build(lambda: WanTransformer3DModel(**video_cfg), device, dtype)
    audio = build(lambda: MovaAudioTransformer1DModel(**audio_cfg), device, dtype)
    bridge = build(lambda: MovaDualTowerBridge(**bridge_cfg), device, dtype)
    g = torch.Generator().manual_seed(0)
    rand = lambda *size: torch.randn(*size, generator=g).to(device, dtype)  # noqa: E731
    latents = rand(1, 16, s["frames"], s["h"], s["w"])
    y = rand(1, video.config.in_channels - 16, s["frames"], s["h"], s["w"])
    audio_latents = rand(1, audio.config.in_channels, s["audio"])
    ctx = rand(1, 16 if tiny else 512, video.config.text_dim)
    t = torch.tensor([700.0], device=device)

    def forward():
        return mova_joint_forward(video, audio, bridge, latents, audio_latents, t, ctx, s["fps"], image_condition=y)

    tokens = s["frames"] * (s["h"] // 2) * (s["w"] // 2)
    return {"video": video, "audio": audio, "bridge": bridge}, forward, tokens


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    sync(device)
    return time.perf_counter() - start


def run_row(row: str, compiled: bool, args, device: torch.device, dtype: torch.dtype) -> dict:
    case = dancer_case if row.startswith("dancer") else mova_case
    result = {"row": row, "variant": "compiled" if compiled else "eager"}
    models, forward, tokens = case(row, args.tiny, device, dtype)
    result["tokens"] = tokens
    result["params_b"] = round(sum(p.numel() for m in models.values() for p in m.parameters()) / 1e9, 3)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        result["weights_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    if compiled:
        for name in ("transformer", "video", "audio"):
            if name in models:
                models[name].compile_repeated_blocks(fullgraph=True)
    warm = [timed(forward, device) for _ in range(args.warmup)]
    if compiled and warm:
        result["first_call_s"] = round(warm[0], 2)  # includes the compile
    times = [timed(forward, device) for _ in range(args.iters)]
    result.update(median_s=round(statistics.median(times), 3), min_s=round(min(times), 3), iters=len(times))
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    models.clear()
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--compile", action="store_true", help="also the compile_repeated_blocks row of each model")
    parser.add_argument("--compile-rows", default=None,
                        help="with --compile: only these rows get a compiled variant (default: every row)")
    parser.add_argument("--no-eager", action="store_true", help="with --compile: skip the eager rows")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--tag", default="", help="suffix of the JSON name (several calls in one round)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny widths, every row, eager only")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"unknown --rows {bad}; choose from {', '.join(ROWS)}")
    if args.tiny:
        device, dtype, args.compile, args.iters, args.warmup = torch.device("cpu"), torch.float32, False, 1, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device; run with --tiny for the CPU smoke test")
        device, dtype = torch.device("cuda"), torch.bfloat16
    Path(os.environ.setdefault("OUT", "out")).mkdir(parents=True, exist_ok=True)
    env = env_info()
    compile_rows = set(rows if args.compile_rows is None else args.compile_rows.split(","))
    plan = [(r, False) for r in rows if not (args.compile and args.no_eager)]
    plan += [(r, True) for r in rows if args.compile and r in compile_rows]
    results = []
    for row, compiled in plan:
        try:
            results.append(run_row(row, compiled, args, device, dtype))
        except torch.OutOfMemoryError as e:
            results.append({"row": row, "variant": "compiled" if compiled else "eager", "median_s": "OOM",
                            "note": f"does not fit {env.get('gpu_mem_gib', '?')} GiB in bf16: skipped ("
                                    f"{(str(e).splitlines() or [''])[0][:160]})"})
        except Exception as e:  # noqa: BLE001  (report the failure, go on with the next row)
            results.append({"row": row, "variant": "compiled" if compiled else "eager",
                            "median_s": f"error: {type(e).__name__}", "note": (str(e).splitlines() or [""])[0][:300]})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r = results[-1]
        print(f"{r['row']} {r['variant']}: {r['median_s']} s, peak {r.get('peak_gib', '-')} GiB {r.get('note', '')}",
              flush=True)
        write_json(f"bench_new_families{'_' + args.tag if args.tag else ''}.json",
                   {"env": env, "args": vars(args), "rows": results})
    print(table(results, ["row", "variant", "tokens", "params_b", "median_s", "first_call_s", "weights_gib",
                          "peak_gib", "note"]))
    return results


if __name__ == "__main__":
    main()
