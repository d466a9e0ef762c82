"""One Wan generation spread over several GPUs: sequence parallel (Ulysses / Ring) x CFG parallel.

    torchrun --nproc_per_node=4 examples/parallel/generate.py --model /ckpt/Wan2.1-T2V-14B-diffusers \
        --prompt "a cat surfing a wave" --height 720 --width 1280 --output out.mp4
    # explicit degrees: --ulysses 2 --ring 2 --no-cfg-parallel; fastest: --fast (optimize_transformer + optimize_vae)

Every rank loads the pipeline and runs the same call (same seed); rank 0 decodes and writes the video.  Without
``--model`` a tiny original-layout checkpoint is built and converted first (CPU-friendly smoke test; gloo on CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import diffusers_wan_ext  # noqa: F401  (registers our classes with Diffusers)
from diffusers_wan_ext import WanExtPipeline
from diffusers_wan_ext.demo import write_video
from diffusers_wan_ext.parallel import init_distributed


def tiny_model(folder: Path) -> Path:
    from diffusers_wan_ext.release_converter import convert_release
    from diffusers_wan_ext.demo import make_tiny_release

    dst = folder / "converted"
    if dist.get_rank() == 0 and not (dst / "model_index.json").exists():  # a finished earlier conversion is reused
        convert_release(make_tiny_release(folder / "release"), dst, dtype="fp32", overwrite=True)
    dist.barrier()
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="converted Diffusers folder (default: a tiny built-in checkpoint)")
    p.add_argument("--prompt", default="a red panda eating bamboo in the snow")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ulysses", type=int, default=None)
    p.add_argument("--ring", type=int, default=None)
    p.add_argument("--no-cfg-parallel", dest="cfg_parallel", action="store_false", default=None)
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the transformer blocks")
    p.add_argument("--fast", action="store_true",
                   help="our runtime defaults on CUDA: optimize_transformer (flash-attn 4 when installed, fused "
                        "kernels, regional compile) and optimize_vae, applied before the parallel hooks")
    p.add_argument("--output", default="parallel.mp4")
    args = p.parse_args()

    rank, world, device = init_distributed()
    tiny = args.model is None
    model = args.model or tiny_model(Path(tempfile.gettempdir()) / "dwe-parallel-tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = WanExtPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    fast = args.fast and device.type == "cuda"
    if fast:
        from diffusers_wan_ext.runtime import optimize_transformer, optimize_vae

        optimize_transformer(pipe, verbose=rank == 0)
        optimize_vae(pipe.vae)
    elif device.type == "cuda":
        pipe.set_attention_backend("auto", verbose=rank == 0)
    state = pipe.enable_parallelism(ulysses_degree=args.ulysses, ring_degree=args.ring, cfg_parallel=args.cfg_parallel)
    if args.compile and not fast:
        for name in ("transformer", "transformer_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).compile_repeated_blocks(fullgraph=True)
    size = dict(height=32, width=32, num_frames=9, num_inference_steps=4) if tiny else dict(
        height=480, width=832, num_frames=81, num_inference_steps=50)
    for key, value in (("height", args.height), ("width", args.width), ("num_frames", args.num_frames),
                       ("num_inference_steps", args.steps)):
        if value is not None:
            size[key] = value
    start = time.perf_counter()
    frames = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale,
                  generator=torch.Generator().manual_seed(args.seed), **size).frames
    seconds = time.perf_counter() - start
    if state.decodes and rank == 0:
        print(f"{state.describe()}: {seconds:.1f} s -> {write_video(frames[0], args.output, fps=16)}")
    dist.barrier()


if __name__ == "__main__":
    main()
