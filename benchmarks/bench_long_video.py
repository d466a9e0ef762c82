"""Long video on one GPU: full attention against sliding windows (issue 20), same model, same run.

For each video length (pixel frames; latent frames = (frames - 1) / 4 + 1) one DiT forward of the Wan2.1 1.3B
config at 480x832 (random weights, bf16, batch 1, 512 text tokens):
  * full      -- stock ``WanTransformer3DModel`` on all latent frames at once (attention over every token)
  * windows   -- the same model under ``diffusers_wan_ext.hooks.apply_sliding_window(model, S, s)`` (DiffSynth's
                 sliding windows: one forward per window of S latent frames at stride s, blended)
Reported: seconds per forward (= per denoising step without CFG), peak GiB allocated during the forward (weights
excluded: "peak" is measured from the allocation before the forward), windows per forward, time ratio windows / full.

Usage (GPU machine):  python benchmarks/bench_long_video.py --frames 81,161,241 --window 21,16
Prints a table and writes bench_long_video.json under $OUT.
"""

from __future__ import annotations

import argparse

import torch

from _common import DIT_CONFIGS, TEXT_LEN, env_info, table, time_forward, write_json


def build(name: str):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**DIT_CONFIGS[name])
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def inputs(latent_frames: int, height: int, width: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=g).to("cuda", torch.bfloat16)
    ctx = torch.randn(1, TEXT_LEN, 4096, generator=g).to("cuda", torch.bfloat16)
    return dict(hidden_states=x, timestep=torch.full((1,), 500.0, device="cuda"), encoder_hidden_states=ctx,
                return_dict=False)


def main() -> None:
    from diffusers_wan_ext.hooks.sliding_window import apply_sliding_window, remove_sliding_window, sliding_windows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1.3b", choices=sorted(DIT_CONFIGS))
    parser.add_argument("--frames", default="81,161,241", help="pixel frames per video (4n + 1), comma-separated")
    parser.add_argument("--window", default="21,16", help="SIZE,STRIDE in latent frames")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size, stride = (int(v) for v in args.window.split(","))
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build(args.model)
    rows = []
    for frames in (int(f) for f in args.frames.split(",")):
        t = (frames - 1) // 4 + 1
        kw = inputs(t, args.height, args.width)
        full_s, full_gib, _ = time_forward(model, kw, args.repeats)
        apply_sliding_window(model, size, stride)
        try:
            win_s, win_gib, _ = time_forward(model, kw, args.repeats)
        finally:
            remove_sliding_window(model)
        n = len(sliding_windows(t, size, stride))
        tokens = t * (args.height // 16) * (args.width // 16)
        rows.append({"frames": frames, "latent frames": t, "tokens": tokens, "full s": f"{full_s:.3f}",
                     "full peak GiB": f"{full_gib:.2f}", f"windows {size},{stride}": n, "windows s": f"{win_s:.3f}",
                     "windows peak GiB": f"{win_gib:.2f}", "time ratio": f"{win_s / full_s:.2f}",
                     "peak ratio": f"{win_gib / full_gib:.2f}"})
        del kw
        torch.cuda.empty_cache()
    cols = list(rows[0])
    print(f"{torch.cuda.get_device_name()} | {args.model} {args.height}x{args.width}, bf16, one forward")
    print(table(rows, cols))
    write_json("bench_long_video.json", {"env": env_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
