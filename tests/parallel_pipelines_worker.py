"""Worker of tests/test_parallel_pipelines.py: every pipeline of ``tests/pipeline_cases.py`` in one process.

``python parallel_pipelines_worker.py reference FOLDERS OUT``: each pipeline in a single process (CFG batching, the
default); writes ``OUT/reference.pt`` with each output and its transformer forwards.

``torchrun --nproc_per_node=N parallel_pipelines_worker.py parallel FOLDERS OUT``: each rank builds the same
pipelines, enables parallelism (gloo; CFG parallel where the pipeline declares it, Ulysses over the rest) and runs
them again; writes ``OUT/rank<r>.pt`` with, per pipeline, the layout, the output, the forwards, and the messages of
the refusals (CFG parallel on a pipeline that does not support it; sequence parallel on a transformer that cannot
be split or a pipeline that declares it cannot run it).  A forward is recorded as ``(batch size, cache context)``:
the batch of ``hidden_states`` before any sequence split, and the ``cache_context`` the pipeline's loop opened
around it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from diffusers_wan_ext.parallel import enable_parallelism, init_distributed  # noqa: E402
from pipeline_cases import pipeline_cases  # noqa: E402


class ForwardLog:
    """``(batch, cache context)`` of every forward of the pipeline's transformers."""

    def __init__(self, pipe):
        self.calls: list[tuple[int, str | None]] = []
        self.context: str | None = None
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name, None)
            if model is None:
                continue
            model.register_forward_pre_hook(self._hook, with_kwargs=True)
            if hasattr(model, "cache_context"):
                model.cache_context = self._wrap(model.cache_context)

    def _wrap(self, original):
        @contextlib.contextmanager
        def cache_context(name, *args, **kwargs):
            outer, self.context = self.context, name
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                self.context = outer

        return cache_context

    def _hook(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.calls.append((int(hidden.shape[0]), self.context))


def as_tensor(frames) -> torch.Tensor:
    """A pipeline's ``frames`` (array, tensor, or nested lists of PIL images) as a float tensor."""
    if torch.is_tensor(frames):
        return frames.detach().float().cpu()
    if isinstance(frames, list):
        return torch.stack([as_tensor(f) for f in frames])
    return torch.as_tensor(np.asarray(frames, dtype=np.float32))


def run(pipe, kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return as_tensor(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames)


def reference(folders: Path, out: Path) -> None:
    results = {}
    for case in pipeline_cases():
        try:
            pipe, kwargs = case.factory(folders)
            log = ForwardLog(pipe)
            results[case.name] = dict(output=run(pipe, kwargs), calls=log.calls)
        except Exception:  # noqa: BLE001  (reported per pipeline by the test)
            results[case.name] = dict(error=traceback.format_exc()[-3000:])
    torch.save(results, out / "reference.pt")


def parallel_case(case, folders: Path, world: int) -> dict:
    pipe, kwargs = case.factory(folders)
    res: dict = {}
    if not case.cfg_parallel:
        try:
            enable_parallelism(pipe, cfg_parallel=True)
            res["cfg_refused"] = None
        except ValueError as e:
            res["cfg_refused"] = str(e)
        if world > 2 and case.sequence_parallel:  # 4-way Ulysses needs 4 | heads (the tiny models have 2)
            return res
    try:
        state = enable_parallelism(pipe)
    except ValueError as e:
        res["refused"] = str(e)
        return res
    log = ForwardLog(pipe)
    res.update(layout=[state.cfg_degree, state.ulysses_degree, state.ring_degree], cfg_rank=state.cfg_rank,
               decodes=state.decodes, output=run(pipe, kwargs), calls=log.calls)
    return res


def parallel(folders: Path, out: Path) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not dist.is_initialized():  # a hang in one rank fails the others within a minute
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world, _ = init_distributed()
    results = {}
    for case in pipeline_cases():
        try:
            results[case.name] = parallel_case(case, folders, world)
        except Exception:  # noqa: BLE001  (reported per pipeline by the test)
            results[case.name] = dict(error=traceback.format_exc()[-3000:])
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()  # (destroy_process_group can hang on gloo subgroups at exit)


if __name__ == "__main__":
    MODE, FOLDERS, OUT = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    if MODE == "reference":
        reference(FOLDERS, OUT)
    else:
        parallel(FOLDERS, OUT)
