"""Worker of ``tests/test_sliding_window_compose.py``: a tiny ``WanExtPipeline`` with sliding windows, in parallel.

``torchrun --nproc_per_node=2 sliding_window_parallel_worker.py OUT``: every rank builds the same pipeline twice,
runs it with sliding windows under CFG parallel (CFG 2) and under sequence parallel (Ulysses 2), and writes
``OUT/rank<r>.pt`` with both latents, the layouts, and the latent frames of every transformer forward.  The test
imports :func:`build_pipe` and :data:`CALL` to run the same generation in one process for the reference.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from diffusers_wan_ext import WanExtPipeline  # noqa: E402
from diffusers_wan_ext.parallel import enable_parallelism, init_distributed  # noqa: E402
from test_fun_pipelines import make_scheduler, make_text_parts, make_transformer, make_vae  # noqa: E402

#: 21 frames = 6 latent frames of 2 x 2 latents (one token each); windows [0, 3), [2, 5), [4, 6): 3, 3 and 2 tokens
#: per forward (Ulysses 2 pads the 3-token windows, not the shorter last one)
CALL = dict(prompt="a dog running", negative_prompt="blurry", height=16, width=16, num_frames=21,
            num_inference_steps=1, guidance_scale=4.0, output_type="latent", sliding_window_size=3,
            sliding_window_stride=2)


def build_pipe(folder: Path) -> WanExtPipeline:
    """The tiny pipeline (fixed seeds: every process builds the same weights)."""
    tokenizer, text_encoder = make_text_parts(folder / f"umt5-{os.getpid()}")
    transformer = make_transformer(16, clip=False, stock=True, seed=1)
    with torch.no_grad():  # away from the initialization, so that the windows matter
        g = torch.Generator().manual_seed(5)
        for p in transformer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pipe = WanExtPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=make_vae(), scheduler=make_scheduler(),
                          transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**CALL, generator=torch.Generator().manual_seed(0)).frames


def frames_seen(pipe) -> list[int]:
    seen: list[int] = []
    pipe.transformer.patch_embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[2]))
    return seen


def main(out: Path) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not dist.is_initialized():  # a hang in one rank fails the others within a minute
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, _, _ = init_distributed()
    results = {}
    for name, cfg_parallel in (("cfg", True), ("ulysses", False)):
        pipe = build_pipe(out)
        state = enable_parallelism(pipe, cfg_parallel=cfg_parallel)
        seen = frames_seen(pipe)
        results[name] = dict(latents=generate(pipe), frames=seen,
                             layout=[state.cfg_degree, state.ulysses_degree, state.ring_degree])
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()  # (destroy_process_group can hang on gloo subgroups at exit)


if __name__ == "__main__":
    OUT = Path(sys.argv[1])
    OUT.mkdir(parents=True, exist_ok=True)
    main(OUT)
