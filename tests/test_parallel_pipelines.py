"""Every pipeline we ship under ``enable_parallelism`` on 2 and 4 gloo ranks (CPU), against the single process.

The tiny pipelines come from ``tests/pipeline_cases.py``; ``tests/parallel_pipelines_worker.py`` runs all of them in
one process for the reference, then in one ``torchrun`` launch per world size.  Checked per pipeline and rank:

* the layout follows what the classes declare: CFG parallel where the pipeline declares ``supports_cfg_parallel``
  (2 ranks: CFG 2; 4 ranks: CFG 2 x Ulysses 2), sequence parallel only for the others (stock ``WanPipeline``,
  streaming: 2 ranks = Ulysses 2), and asking for CFG parallel there is refused with a one-line error naming the
  class;
* a transformer that declares ``_cp_unsupported_reason`` (Video-As-Prompt, S2V, Animate) is refused on 4 ranks with
  its reason, and runs CFG parallel on 2; streaming (``supports_sequence_parallel = False``, no CFG) is refused on
  2 and 4;
* the rank that decodes returns the single-process video (the others may return latents);
* the transformer forwards: the single process runs one forward of batch ``2B`` per step (CFG batching,
  ``cache_context("cond_uncond")``); under CFG parallel each rank runs the same number of forwards, of batch ``B``,
  for its own branch only (``"cond"`` on CFG rank 0, ``"uncond"`` on CFG rank 1).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import src_env
from pipeline_cases import PipelineCase, pipeline_cases, prepare_folders

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

HERE = Path(__file__).resolve().parent
WORKER = HERE / "parallel_pipelines_worker.py"
TOL = 2e-5
CASES = pipeline_cases()


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=src_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    return prepare_folders(tmp_path_factory.mktemp("pipeline-folders"))


@pytest.fixture(scope="module")
def reference(folders, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    _run([sys.executable, str(WORKER), "reference", str(folders), str(out)])
    return torch.load(out / "reference.pt")


@pytest.fixture(scope="module")
def launched(folders, tmp_path_factory):
    """``launched(world)`` -> the per-rank results of one ``torchrun`` launch over every pipeline (cached)."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"ranks{world}")
            _run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--standalone",
                  str(WORKER), "parallel", str(folders), str(out)])
            cache[world] = [torch.load(out / f"rank{r}.pt") for r in range(world)]
        return cache[world]

    return get


def check_refusals(case: PipelineCase, world: int, res: dict) -> bool:
    """The refusals the case's declarations call for; True when the pipeline ran in parallel (more to check)."""
    if not case.cfg_parallel:
        message = res["cfg_refused"]
        assert message is not None and f"CFG parallel is not supported by {case.name}" in message, message
        assert "\n" not in message
        if world > 2 and case.sequence_parallel:  # 4-way Ulysses needs 4 | heads (the tiny models have 2)
            return False
    if world > (2 if case.cfg_parallel else 1) and not case.sequence_parallel:
        message = res.get("refused")
        assert message is not None, f"{case.name}: sequence parallel was not refused on {world} ranks"
        assert case.refusal in message and "\n" not in message, message
        return False
    assert "refused" not in res, res["refused"]
    return True


def expected_layout(case: PipelineCase, world: int) -> list[int]:
    cfg = 2 if case.cfg_parallel else 1
    return [cfg, world // cfg, 1]


def check_forwards(case: PipelineCase, ref_calls: list, res: dict) -> None:
    if not case.cfg_parallel:
        assert res["calls"] == ref_calls
        return
    assert ref_calls and all(context == "cond_uncond" for _, context in ref_calls), (
        f"single process: one batched cond + uncond forward per step expected, got {ref_calls}")
    branch = "cond" if res["cfg_rank"] == 0 else "uncond"
    want = [(batch // 2, branch) for batch, _ in ref_calls]
    assert res["calls"] == want, f"CFG rank {res['cfg_rank']}: forwards {res['calls']}, expected {want}"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pipeline_on_ranks_equals_single_process(case, world, reference, launched):
    ref = reference[case.name]
    assert "error" not in ref, f"single process:\n{ref['error']}"
    for rank, results in enumerate(launched(world)):
        res = results[case.name]
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
        if not check_refusals(case, world, res):
            continue
        assert res["layout"] == expected_layout(case, world), (rank, res["layout"])
        assert res["decodes"] == (rank == 0)
        output, want = res["output"], ref["output"]
        if output.shape == want.shape:  # a rank that decodes (the others may return latents)
            diff = (output - want).abs().max().item()
            assert diff < TOL, f"rank {rank}: differs from the single-process output by {diff}"
        else:
            assert not res["decodes"], f"rank {rank} returned {tuple(output.shape)}, not the decoded video"
        check_forwards(case, ref["calls"], res)
