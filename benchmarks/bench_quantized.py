"""Quantized DiT single files kept quantized on the GPU (issue 21): bf16 against GGUF Q8_0 and scaled fp8, same run.

A random-weight Wan2.1 DiT of the given config is exported to the original layout and written as a GGUF Q8_0 file
and a ComfyUI scaled-fp8 file (``utils.single_file.write_single_file``); each is loaded with
``conversion.quantized_dit.load_quantized_dit`` (GGUF packed in Diffusers' GGUFLinear, fp8 in our Fp8Linear:
dequantized per layer at compute) and timed against the bf16 model on one forward at the config's benchmark size
(1.3B: 480x832x81, 14B: 1280x720x81; 512 text tokens).
Reported: seconds per forward, weight GiB on the GPU, peak GiB during the forward, relative error vs bf16.

Usage (GPU machine):  python benchmarks/bench_quantized.py --model 1.3b
Prints a table and writes bench_quantized.json under $OUT.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from _common import DIT_CONFIGS, env_info, make_dit_inputs, table, time_forward, write_json


def weight_gib(model) -> float:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 2**30


def main() -> None:
    from diffusers import WanTransformer3DModel

    from diffusers_wan_ext.conversion.dit import export_dit_state_dict
    from diffusers_wan_ext.conversion.quantized_dit import load_quantized_dit
    from diffusers_wan_ext.utils.single_file import write_single_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1.3b", choices=["1.3b", "14b"])
    parser.add_argument("--formats", default="gguf-q8_0,comfy-fp8-scaled")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = WanTransformer3DModel(**DIT_CONFIGS[args.model]).to(torch.bfloat16).eval().requires_grad_(False)
    original = export_dit_state_dict(model.state_dict())
    work = Path(tempfile.mkdtemp())
    files = {}
    for fmt in args.formats.split(","):
        t0 = time.perf_counter()
        path = work / f"dit_{fmt}.{'gguf' if fmt.startswith('gguf') else 'safetensors'}"
        write_single_file(path, original, fmt)
        files[fmt] = path
        print(f"wrote {fmt} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s", flush=True)
    del original
    kw = make_dit_inputs(args.model)
    model.to("cuda")
    ref_s, ref_peak, ref = time_forward(model, kw, args.repeats)
    rows = [{"weights": "bf16", "s": f"{ref_s:.3f}", "weight GiB": f"{weight_gib(model):.2f}",
             "peak GiB": f"{ref_peak:.2f}", "rel err": "-", "time ratio": "1.00"}]
    model.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    for fmt, path in files.items():
        q = load_quantized_dit(path, torch_dtype=torch.bfloat16, device="cuda").eval()
        s, peak, out = time_forward(q, kw, args.repeats)
        err = ((out - ref).norm() / ref.norm()).item()
        rows.append({"weights": fmt, "s": f"{s:.3f}", "weight GiB": f"{weight_gib(q):.2f}", "peak GiB": f"{peak:.2f}",
                     "rel err": f"{err:.2e}", "time ratio": f"{s / ref_s:.2f}"})
        print(rows[-1], flush=True)
        del q
        gc.collect()
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()} | {args.model} DiT, benchmark size, one forward, eager")
    print(table(rows, list(rows[0])))
    write_json("bench_quantized.json", {"env": env_info(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
