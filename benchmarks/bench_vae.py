"""Wan VAE decode, bf16: stock ``AutoencoderKLWan.decode`` against ours (``optimize_vae``: channels-last convs, the
fused Triton norm + SiLU and the fast streaming decode), same weights, same run.

Default: the Wan2.1 VAE at 480x832x81 (latents 16x21x60x104); ``--config wan2.2`` is the Wan2.2 VAE at 1280x704x121
(latents 48x31x44x80). Prints seconds, peak allocated GiB (and the meta-device estimate of ``estimate_decode_peak``
next to it), the relative difference of each variant to stock bf16 and to a stock fp32 decode of the same latent
(ours should be no further from fp32 than stock bf16 is), and ``optimize_vae``'s report.
"""

import argparse
import copy
import time

import torch

from _common import cuda_time, env_info, peak_memory, table, write_json

CONFIGS = {
    "wan2.1": (dict(), (1, 16, 21, 60, 104), "480x832x81"),
    "wan2.2": (dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2, in_channels=12,
                    out_channels=12, scale_factor_spatial=16), (1, 48, 31, 44, 80), "1280x704x121"),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{((a.float() - b.float()).norm() / b.float().norm()).item():.1e}"


def main() -> None:
    from diffusers import AutoencoderKLWan

    from diffusers_wan_ext.runtime import optimize_vae
    from diffusers_wan_ext.vae import estimate_decode_peak

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="wan2.1")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 reference decode")
    # peaks are absolute (weights + latent + decode); references are kept on the CPU
    args = parser.parse_args()
    config, shape, label = CONFIGS[args.config]

    env = env_info()
    print(env, flush=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLWan(**config).eval()
    z = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    ref32 = None
    with torch.no_grad():
        if not args.no_fp32:
            ref32 = copy.deepcopy(vae).decode(z.float(), return_dict=False)[0].cpu()  # off the GPU: peaks stay ours
            torch.cuda.empty_cache()
    vae = vae.to(torch.bfloat16)
    rows, ref, base, report = [], None, None, None
    with torch.no_grad():
        for variant in ("stock", "ours"):
            if variant == "ours":
                t0 = time.time()
                report = optimize_vae(vae)
                print("optimize_vae:", report, flush=True)
                vae.decode(z, return_dict=False)
                torch.cuda.synchronize()
                print(f"ours: first call (Triton compiles the norm kernels) {time.time() - t0:.1f} s", flush=True)
            estimate = estimate_decode_peak(vae, shape, torch.bfloat16, fast=variant == "ours")
            torch.cuda.empty_cache()
            with peak_memory() as pm:
                t = cuda_time(lambda: vae.decode(z, return_dict=False), warmup=1, iters=args.iters)["median_s"]
            out = vae.decode(z, return_dict=False)[0].cpu()
            ref = out if ref is None else ref
            base = base or t
            rows.append(dict(variant=variant, s=round(t, 3), peak_gib=round(pm["peak_gib"], 2),
                             est_peak_gib=round(estimate["peak_gib"], 2), speedup=round(base / t, 2),
                             rel_diff=rel(out, ref), rel_to_fp32=rel(out, ref32) if ref32 is not None else "-"))
            print(rows[-1], flush=True)
            del out
    write_json(f"bench_vae_{args.config}.json" if args.config != "wan2.1" else "bench_vae.json",
               {"env": env, "config": args.config, "shape": list(shape), "report": report, "rows": rows})
    print(f"\n{env.get('gpu')} | {args.config} VAE decode {label} bf16")
    print(table(rows, ["variant", "s", "peak_gib", "est_peak_gib", "speedup", "rel_diff", "rel_to_fp32"]))


if __name__ == "__main__":
    main()
