"""Wan2.1 VAE decode of 480x832x81 (latents 16x21x60x104), bf16: stock ``AutoencoderKLWan.decode`` against ours
(``optimize_vae``: channels-last convs + fused norm/SiLU), same weights, same run. Prints seconds, peak GiB and the
relative difference of ours to stock."""

import time

import torch

from _common import cuda_time, env_info, peak_memory, table, write_json


def main() -> None:
    from diffusers import AutoencoderKLWan

    from diffusers_wan_ext.runtime import optimize_vae

    env = env_info()
    print(env, flush=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLWan().to(torch.bfloat16).eval()
    z = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    rows, ref, base = [], None, None
    with torch.no_grad():
        for variant in ("stock", "ours"):
            if variant == "ours":
                t0 = time.time()
                optimize_vae(vae)
                vae.decode(z, return_dict=False)
                torch.cuda.synchronize()
                print(f"ours: first call (compiles the fused norm) {time.time() - t0:.1f} s", flush=True)
            torch.cuda.empty_cache()
            with peak_memory() as pm:
                t = cuda_time(lambda: vae.decode(z, return_dict=False), warmup=1, iters=3)["median_s"]
            out = vae.decode(z, return_dict=False)[0].float()
            ref = out if ref is None else ref
            base = base or t
            rows.append(dict(variant=variant, s=round(t, 3), peak_gib=round(pm["peak_gib"], 2),
                             speedup=round(base / t, 2), rel_diff=f"{((out - ref).norm() / ref.norm()).item():.1e}"))
            print(rows[-1], flush=True)
    write_json("bench_vae.json", {"env": env, "rows": rows})
    print(f"\n{env.get('gpu')} | Wan2.1 VAE decode 480x832x81 bf16")
    print(table(rows, ["variant", "s", "peak_gib", "speedup", "rel_diff"]))


if __name__ == "__main__":
    main()
