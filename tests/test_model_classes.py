"""What Diffusers' own model tests expect of a model, for every model class we ship (cases: ``model_cases.py``).

Save / load (sharded, variants), determinism, ``_keep_in_fp32_modules``, layerwise casting, group offloading
(block and leaf level, to disk), accelerate CPU offload, gradient checkpointing through every block, regional and
full-graph compilation without recompiles, PEFT LoRA / DoRA save-load and hot-swap, step caches (FirstBlockCache,
MagCache, TaylorSeer, PAB) and the context-parallel declarations.  All on CPU with tiny models.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os

import pytest
import torch
from diffusers import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

from model_cases import ModelCase, model_cases

CASES = model_cases()
IDS = [c.name for c in CASES]
WEIGHTS = "pytorch_lora_weights.safetensors"


def _skip_if(case: ModelCase, test: str) -> None:
    if test in case.skip:
        pytest.skip(case.skip[test])


def _run(case: ModelCase, model: torch.nn.Module, seed: int = 1, **overrides) -> torch.Tensor:
    inputs = {**case.make_inputs(seed), **overrides}
    with torch.no_grad():
        return case.output(model(**inputs))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    """``a`` and ``b`` agree to ``rel`` of ``b``'s scale (and are finite)."""
    assert torch.isfinite(a).all(), "non-finite output"
    err = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x {scale:.3g}"


@pytest.fixture(params=CASES, ids=IDS)
def case(request) -> ModelCase:
    return request.param


@pytest.fixture
def model_and_ref(case):
    model = case.build()
    return model, _run(case, model)


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(case, model_and_ref, tmp_path):
    model, ref = model_and_ref
    model.save_pretrained(tmp_path / "plain")
    loaded = case.model_class.from_pretrained(tmp_path / "plain").eval()
    torch.testing.assert_close(_run(case, loaded), ref, rtol=0, atol=0)

    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]
    assert len(shards) > 1 and any(f.endswith(".index.json") for f in os.listdir(tmp_path / "sharded"))
    loaded = case.model_class.from_pretrained(tmp_path / "sharded").eval()
    torch.testing.assert_close(_run(case, loaded), ref, rtol=0, atol=0)

    model.save_pretrained(tmp_path / "variant", variant="v1")
    assert any(".v1." in f for f in os.listdir(tmp_path / "variant"))
    with pytest.raises(OSError):
        case.model_class.from_pretrained(tmp_path / "variant")
    loaded = case.model_class.from_pretrained(tmp_path / "variant", variant="v1").eval()
    torch.testing.assert_close(_run(case, loaded), ref, rtol=0, atol=0)


def test_determinism(case, model_and_ref):
    model, ref = model_and_ref
    torch.testing.assert_close(_run(case, model), ref, rtol=0, atol=0)
    torch.testing.assert_close(_run(case, case.build()), ref, rtol=0, atol=0)
    assert (_run(case, model, seed=2) - ref).abs().max() > 1e-4  # the inputs matter


def _keep_fp32(model: torch.nn.Module, name: str) -> bool:
    return any(k in name.split(".") for k in (model._keep_in_fp32_modules or []))


def test_keep_in_fp32_modules_in_bf16(case, model_and_ref, tmp_path):
    model, ref = model_and_ref
    model.save_pretrained(tmp_path)
    low = case.model_class.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    for name, p in low.named_parameters():
        assert p.dtype == (torch.float32 if _keep_fp32(low, name) else torch.bfloat16), name
    if case.model_class._keep_in_fp32_modules:
        assert any(_keep_fp32(low, n) for n, _ in low.named_parameters()), "no fp32 module matched"
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in case.make_inputs(1).items()}
    with torch.no_grad():
        _close(case.output(low(**inputs)), ref, 0.1)


def test_layerwise_casting_matches_fp32(case, model_and_ref):
    model, ref = model_and_ref
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    _close(_run(case, model), ref, 0.05)
    stored = {p.dtype for p in model.parameters()}
    assert torch.bfloat16 in stored and torch.float32 in stored  # stored low, skipped patterns kept


# ------------------------------------------------------------------------------------------------ offloading
@pytest.mark.parametrize("kind", ["block", "leaf", "block_disk", "leaf_disk"])
def test_group_offloading(case, model_and_ref, kind, tmp_path):
    model, ref = model_and_ref
    kwargs = dict(onload_device=torch.device("cpu"), offload_type=kind.split("_")[0] + "_level")
    if kind.startswith("block"):
        kwargs["num_blocks_per_group"] = 1
    if kind.endswith("disk"):
        kwargs["offload_to_disk_path"] = str(tmp_path)
    model.enable_group_offload(**kwargs)
    if kind.endswith("disk"):
        assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path))
    torch.testing.assert_close(_run(case, model), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_run(case, model), ref, rtol=1e-5, atol=1e-5)  # hooks survive a second call


def test_accelerate_cpu_offload(case, model_and_ref):
    """What ``enable_sequential_cpu_offload`` does to a component: weights on the meta device, streamed in."""
    from accelerate import cpu_offload

    model, ref = model_and_ref
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in model.parameters())
    torch.testing.assert_close(_run(case, model), ref, rtol=1e-5, atol=1e-5)


def test_device_map_auto(case, model_and_ref, tmp_path):
    model, ref = model_and_ref
    assert model._no_split_modules is not None
    model.save_pretrained(tmp_path)
    loaded = case.model_class.from_pretrained(tmp_path, device_map="auto").eval()
    torch.testing.assert_close(_run(case, loaded), ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ training
def _loss_and_grads(case, model):
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = case.output(model(**case.make_inputs(1)))
        out.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_runs_through_every_block(case):
    if not case.model_class._supports_gradient_checkpointing:
        model = case.build()
        with pytest.raises(ValueError):
            model.enable_gradient_checkpointing()
        pytest.skip(case.skip.get("gradient_checkpointing", "declares no gradient checkpointing"))
    model = case.build().train()
    plain = _loss_and_grads(case, model)
    model.enable_gradient_checkpointing()
    calls = []
    inner = model._gradient_checkpointing_func

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return inner(fn, *args, **kwargs)

    model._gradient_checkpointing_func = counting
    ckpt = _loss_and_grads(case, model)
    # every block, once per pass over the blocks, through the function
    assert [id(b) for b in calls] == [id(b) for b in model.blocks] * case.block_passes
    # (the reference stream after the last MoT layer feeds nothing: only its attention inputs get gradients)
    block_params = {n for n, _ in model.named_parameters() if n.startswith("blocks.")}
    assert block_params <= plain.keys() and plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ compile
@pytest.fixture
def no_recompiles():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def test_regional_compile_without_recompiles(case, model_and_ref, no_recompiles):
    _skip_if(case, "compile")
    model, ref = model_and_ref
    if not getattr(model, "_repeated_blocks", None):
        pytest.skip("no _repeated_blocks")
    other = _run(case, model, seed=2)
    model.compile_repeated_blocks(backend="eager", fullgraph=True)
    torch.testing.assert_close(_run(case, model), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_run(case, model, seed=2), other, rtol=1e-5, atol=1e-5)


def test_fullgraph_compile_without_recompiles(case, model_and_ref, no_recompiles):
    _skip_if(case, "compile")
    model, ref = model_and_ref
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(_run(case, compiled), ref, rtol=1e-5, atol=1e-5)
    other = _run(case, model, seed=2)
    torch.testing.assert_close(_run(case, compiled, seed=2), other, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ LoRA
def _lora_config(case, seed_rank: int = 4, dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(r=seed_rank, lora_alpha=seed_rank, target_modules=list(case.lora_targets),
                      init_lora_weights=False, use_dora=dora)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_save_load(case, model_and_ref, dora, tmp_path):
    model, ref = model_and_ref
    torch.manual_seed(3)
    model.add_adapter(_lora_config(case, dora=dora))
    adapted = _run(case, model)
    assert (adapted - ref).abs().max() > 1e-4  # the adapter is live
    model.save_lora_adapter(tmp_path, adapter_name="default")
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    fresh = case.build()
    fresh.load_lora_adapter(tmp_path, prefix=None, adapter_name="default", weight_name=WEIGHTS)
    torch.testing.assert_close(_run(case, fresh), adapted, rtol=1e-5, atol=1e-6)


def test_lora_hotswap(case, model_and_ref, tmp_path):
    model, ref = model_and_ref
    outs = []
    for k in range(2):
        m = case.build()
        torch.manual_seed(10 + k)
        m.add_adapter(_lora_config(case))
        outs.append(_run(case, m))
        m.save_lora_adapter(tmp_path / str(k), adapter_name="default")
    model.load_lora_adapter(tmp_path / "0", prefix=None, adapter_name="default", weight_name=WEIGHTS)
    torch.testing.assert_close(_run(case, model), outs[0], rtol=1e-5, atol=1e-6)
    model.load_lora_adapter(tmp_path / "1", prefix=None, adapter_name="default", weight_name=WEIGHTS,
                             hotswap=True)
    torch.testing.assert_close(_run(case, model), outs[1], rtol=1e-5, atol=1e-6)
    assert (outs[0] - outs[1]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ step caches
def _cache_configs():
    return {
        "fbc": lambda **kw: FirstBlockCacheConfig(threshold=1e9, **kw),
        "mag": lambda **kw: MagCacheConfig(threshold=1e9, max_skip_steps=3, retention_ratio=0.0, num_inference_steps=4,
                                      mag_ratios=[1.0] * 4, **kw),
        # (its default patterns, fullmatch "^blocks.*attn", match no "blocks.N.attn1": name the attentions)
        "taylorseer": lambda **kw: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                                         taylor_factors_dtype=torch.float32,
                                                         cache_identifiers=[r"blocks\.\d+\.attn\d"], **kw),
        "pab": lambda **kw: PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                            spatial_attention_timestep_skip_range=(-1, 1001),
                                                            current_timestep_callback=lambda: 500, **kw),
    }


@pytest.mark.parametrize("cache", ["fbc", "mag", "taylorseer", "pab"])
def test_step_caches_apply_and_skip_work(case, cache):
    """Step 0 is computed in full (equals the uncached forward); a later step is served (at least partly) from the
    cache, so it differs from the full forward while staying finite and of the same scale."""
    _skip_if(case, "caches")
    model = case.build()
    steps = 3

    def step_inputs(i):
        x = case.make_inputs(1)
        x["hidden_states"] = x["hidden_states"] * (1 + 0.02 * i)
        x["timestep"] = x["timestep"] - 100 * i
        return x

    with torch.no_grad():
        full = [case.output(model(**step_inputs(i))) for i in range(steps)]
        model.enable_cache(_cache_configs()[cache](**case.cache_kwargs.get(cache, {})))
        with model.cache_context("cond"):
            cached = [case.output(model(**step_inputs(i))) for i in range(steps)]
        model.disable_cache()
        torch.testing.assert_close(case.output(model(**step_inputs(2))), full[2])  # removed cleanly
    torch.testing.assert_close(cached[0], full[0], rtol=1e-5, atol=1e-5)
    assert any((c - f).abs().max() > 1e-6 for c, f in zip(cached[1:], full[1:])), "the cache never served a step"
    for c, f in zip(cached, full):
        _close(c, f, 1.0)


def test_video_as_prompt_refuses_a_cached_reference_attention_clearly():
    """PAB's default identifiers also catch ``vap_blocks``: a skipped reference attention is named, not a crash."""
    case = next(c for c in CASES if c.name == "vap")
    model = case.build()
    model.enable_cache(PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                       spatial_attention_timestep_skip_range=(-1, 1001),
                                                       current_timestep_callback=lambda: 500))
    with torch.no_grad(), model.cache_context("cond"), pytest.raises(RuntimeError, match="spatial_attention_block"):
        for _ in range(3):
            model(**case.make_inputs(1))


# ------------------------------------------------------------------------------------------------ context parallel
def test_context_parallel_declarations(case):
    cls = case.model_class
    if not case.is_transformer:
        assert not hasattr(cls, "_cp_self_attention_modules")
        return
    model = case.build()
    patterns = cls._cp_self_attention_modules
    assert patterns and all(isinstance(p, str) for p in patterns)
    names = [n for n, _ in model.named_modules()]
    for pattern in patterns:
        assert any(fnmatch.fnmatchcase(n, pattern.replace("*", "[0-9]*")) for n in names), pattern
    if cls._cp_plan is None:
        assert isinstance(cls._cp_unsupported_reason, str) and len(cls._cp_unsupported_reason) > 20
        return
    assert not hasattr(cls, "_cp_unsupported_reason")
    for name in cls._cp_plan:
        assert name == "" or name in names, name
    json.dumps(sorted(cls._cp_plan))  # plan keys are module names
    copy.deepcopy(cls._cp_plan)


#: Model classes a family declares that have no case in ``model_cases.py`` yet, each with the reason (skipped, not
#: passed: the coverage test below fails for any other class without a case).
PENDING_CASES: dict[str, str] = {}


def _declared_model_classes() -> dict[str, type]:
    from diffusers_wan_ext.families import FAMILIES

    return {cls.__name__: cls for f in FAMILIES for cls in f.model_classes
            if cls.__module__.split(".")[0] == "diffusers_wan_ext"}


def test_every_declared_model_class_has_a_case():
    covered = {c.model_class.__name__ for c in model_cases()}
    missing = sorted(set(_declared_model_classes()) - covered - set(PENDING_CASES))
    assert not missing, f"model classes declared by a family without a case in tests/model_cases.py: {missing}"


@pytest.mark.parametrize("name", sorted(PENDING_CASES))
def test_pending_model_cases(name):
    assert name in _declared_model_classes(), f"{name} is no longer declared: drop it from PENDING_CASES"
    pytest.skip(f"{name}: {PENDING_CASES[name]}")
