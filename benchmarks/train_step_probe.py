"""Run the project's trainer (``diffusers_wan_ext.training.main``) and record when each optimizer step ends and the
peak GPU memory of the process: the entry ``bench_train_launch.py`` hands to ``accelerate launch``.

Each training step of the trainer calls ``Accelerator.backward`` once per micro-batch (gradient accumulation 1
here), so the times between consecutive calls are seconds per step (data loading, forward, backward and the
optimizer step of the previous step included). Written to ``$TRAIN_PROBE_OUT`` (JSON) at exit by rank 0.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

STAMPS: list[float] = []


def _patch_backward() -> None:
    import accelerate

    original = accelerate.Accelerator.backward

    def backward(self, loss, **kwargs):
        out = original(self, loss, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        STAMPS.append(time.perf_counter())
        return out

    accelerate.Accelerator.backward = backward


def _report() -> None:
    path = os.environ.get("TRAIN_PROBE_OUT")
    if not path or int(os.environ.get("RANK", "0")) != 0:
        return
    gaps = [b - a for a, b in zip(STAMPS, STAMPS[1:])]
    data = {"steps": len(STAMPS), "step_seconds": gaps,
            "median_step_s": sorted(gaps)[len(gaps) // 2] if gaps else None}
    if torch.cuda.is_available():
        data.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                    peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    Path(path).write_text(json.dumps(data))


def main() -> None:
    from diffusers_wan_ext.training import main as train_main

    _patch_backward()
    atexit.register(_report)
    train_main(sys.argv[1:])


if __name__ == "__main__":
    main()
