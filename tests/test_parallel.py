"""Multi-process context parallel + CFG parallel on CPU (gloo): N ranks give the single-process result.

``tests/parallel_worker.py`` runs under a real ``torchrun`` launch.  Checked: Ulysses sequence parallel for stock
Wan (tokens dividing the degree and padded ones), Wan2.2 TI2V per-token timesteps, Wan-Fun reference-image tokens +
camera adapter + CLIP branch, VACE control tokens; and a two-expert ``WanExtPipeline`` on 4 ranks (CFG 2 x Ulysses
2) whose latents equal the single-process run, with only rank 0 decoding.  Ring attention needs a kernel that
returns the log-sum-exp, which Diffusers has only on CUDA: ring and hybrid degrees are checked by
``tests/test_gpu_runtime.py::test_parallel_ring_and_hybrid`` and ``benchmarks/bench_parallel.py`` on GPUs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_wan_ext.parallel import (
    choose_degrees,
    cp_plan_for,
    register_cp_plan,
    self_attention_patterns,
    supports_cfg_parallel,
    supports_sequence_parallel,
)
from helpers import src_env

HERE = Path(__file__).resolve().parent
TOL = 2e-5


def launch(case: str, nproc: int, out: Path) -> list[dict]:
    env = src_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(HERE / "parallel_worker.py"), case, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_models_ulysses_two_ranks_equal_single_process(tmp_path):
    ranks = launch("models", 2, tmp_path)
    for r, res in enumerate(ranks):
        assert set(res) == {"t2v_even", "t2v_padded", "t2v_padded_compiled", "ti2v_per_token_padded", "fun_reference_camera", "vace_padded"}
        for name, d in res.items():
            assert d < TOL, f"rank {r}: {name} differs from the single-process output by {d}"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_local_flash4_backend_runs_ulysses_and_ring(tmp_path):
    """Our flash_4_hub backend stays selected under context parallelism (Diffusers 0.42's own refuses it) and gives
    the single-process result with Ulysses and with Ring (log-sum-exp merge), on a stand-in kernel."""
    ranks = launch("flash4_cp", 2, tmp_path)
    for r, res in enumerate(ranks):
        assert res["flash4_ulysses_kept"] and res["flash4_ring_kept"], (r, res)
        for name in ("flash4_ulysses", "flash4_ring"):
            assert res[name] < TOL, f"rank {r}: {name} differs from the single-process output by {res[name]}"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_pipeline_cfg_parallel_times_ulysses_four_ranks(tmp_path):
    ranks = launch("pipeline", 4, tmp_path)
    for r, res in enumerate(ranks):
        assert res["layout"] == [2, 2, 1]
        assert res["latents"] < TOL and res["no_cfg"] < TOL, (r, res)
        assert res["decoded"] == (r == 0), f"rank {r}: only rank 0 decodes"
        if r == 0:
            assert res["video"] < TOL


def test_choose_degrees():
    assert choose_degrees(2, 12) == (1, 2, 1)
    assert choose_degrees(8, 12) == (1, 4, 2)  # 1.3B: 12 heads -> hybrid
    assert choose_degrees(8, 40) == (1, 8, 1)  # 14B
    assert choose_degrees(8, 40, cfg_parallel=True) == (2, 4, 1)
    assert choose_degrees(4, 12, ring_degree=4) == (1, 1, 4)
    with pytest.raises(ValueError, match="must divide the 12 attention heads"):
        choose_degrees(8, 12, ulysses_degree=8)
    with pytest.raises(ValueError, match="must equal the sequence-parallel size 4"):
        choose_degrees(8, 12, cfg_parallel=True, ulysses_degree=2, ring_degree=1)
    with pytest.raises(ValueError, match="even number of ranks"):
        choose_degrees(3, 12, cfg_parallel=True)


def test_cp_plans_for_every_transformer_class():
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    from diffusers_wan_ext import (
        WanExtTransformer3DModel,
        WanFunTransformer3DModel,
        WanS2VTransformer3DModel,
        WanVideoAsPromptTransformer3DModel,
    )

    small = dict(num_attention_heads=2, attention_head_dim=8, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1)
    stock = cp_plan_for(WanTransformer3DModel(**small))
    assert cp_plan_for(WanExtTransformer3DModel(**small)) is stock
    assert cp_plan_for(WanFunTransformer3DModel(**small, in_channels=16)) is stock
    vace = WanVACETransformer3DModel(**small, vace_layers=[0], vace_in_channels=8)
    assert set(cp_plan_for(vace)["vace_blocks.0"]) == {"hidden_states", "control_hidden_states"}
    assert self_attention_patterns(vace) == ("blocks.*.attn1", "vace_blocks.*.attn1")  # registered stock class
    assert self_attention_patterns(WanTransformer3DModel(**small)) == ("blocks.*.attn1",)
    with pytest.raises(ValueError, match="no context-parallel plan for Linear"):
        cp_plan_for(torch.nn.Linear(2, 2))
    for cls in (WanVideoAsPromptTransformer3DModel, WanS2VTransformer3DModel):  # the reason is the class's own
        with pytest.raises(ValueError, match=f"not supported for {cls.__name__}: "
                           f"{re.escape(cls._cp_unsupported_reason)}.*CFG parallel only"):
            cp_plan_for(cls.__new__(cls))
    assert "vap_blocks.*.attn1" in self_attention_patterns(WanVideoAsPromptTransformer3DModel.__new__(
        WanVideoAsPromptTransformer3DModel))


def test_plans_come_from_the_classes_and_registrations():
    plan = {"blocks.0": {}}

    class Unsplittable(torch.nn.Module):
        _cp_plan = None
        _cp_unsupported_reason = "its tokens talk to a global state"

    class Splittable(Unsplittable):  # a subclass's own declaration wins over its parent's
        _cp_plan = plan
        _cp_self_attention_modules = ("layers.*.self_attn",)

    class Plain(Splittable):
        pass

    class Stock(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="not supported for Unsplittable: its tokens talk to a global state"):
        cp_plan_for(Unsplittable())
    assert cp_plan_for(Splittable()) is plan and cp_plan_for(Plain()) is plan
    assert self_attention_patterns(Plain()) == ("layers.*.self_attn",)
    with pytest.raises(ValueError, match="no context-parallel plan for Stock.*register_cp_plan"):
        cp_plan_for(Stock())
    register_cp_plan(Stock, plan, self_attention_modules=("blocks.*.attn1", "extra.*.attn1"))
    assert cp_plan_for(Stock()) == plan and self_attention_patterns(Stock()) == ("blocks.*.attn1", "extra.*.attn1")
    assert cp_plan_for(type("StockChild", (Stock,), {})()) == plan  # subclasses of a registered class inherit


def test_cfg_parallel_is_what_the_pipeline_declares():
    from diffusers import WanPipeline

    from diffusers_wan_ext import WanExtPipeline, WanStreamingPipeline

    assert supports_cfg_parallel(WanExtPipeline.__new__(WanExtPipeline))
    assert not supports_cfg_parallel(WanStreamingPipeline.__new__(WanStreamingPipeline))
    assert not supports_cfg_parallel(WanPipeline.__new__(WanPipeline))  # stock: sequence parallel only
    assert not supports_cfg_parallel(torch.nn.Linear(2, 2))
    assert supports_sequence_parallel(WanExtPipeline.__new__(WanExtPipeline))
    assert supports_sequence_parallel(WanPipeline.__new__(WanPipeline))
    assert not supports_sequence_parallel(WanStreamingPipeline.__new__(WanStreamingPipeline))  # block-causal cache


def test_enable_parallelism_needs_distributed():
    from diffusers_wan_ext.parallel import enable_parallelism

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        enable_parallelism(torch.nn.Linear(2, 2))
