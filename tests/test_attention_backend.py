"""Attention backend auto-selection (``diffusers_wan_ext.runtime.attention``) on CPU.

Availability is what Diffusers' own requirement check says (``_check_attention_backend_requirements``), so the
selection order is tested by flipping Diffusers' ``_CAN_USE_*`` flags and pretending CUDA / a Hopper GPU; what the
processors receive is checked by spying on ``dispatch_attention_fn`` in stock ``transformer_wan`` and in our
``WanTextLenAttnProcessor`` module.
"""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from diffusers.models import attention_dispatch as ad
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from diffusers_wan_ext import WanExtPipeline, WanFunInpaintPipeline
from diffusers_wan_ext.runtime import attention as rt
from diffusers_wan_ext.runtime import (
    ATTENTION_PREFERENCE,
    available_attention_backends,
    reset_attention_backend,
    select_attention_backend,
    set_attention_backend,
)
from helpers import latents_of
from test_fun_pipelines import H, W, build, make_scheduler, make_text_parts, make_transformer, make_vae, picture
from test_fun_pipelines import parts  # noqa: F401  (fixture)
from test_fun_pipelines import run as run_fun

F = 5


# --------------------------------------------------------------------------------------------- selection
@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend a CUDA GPU (compute capability settable) with cuDNN SDPA available and enabled."""
    state = {"capability": (9, 0), "cudnn": True, "cudnn_sdp": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: state["cudnn"])
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: state["cudnn_sdp"])
    return state


def test_preference_table():
    assert [c.backend for c in ATTENTION_PREFERENCE] == [
        "_flash_3", "flash_4_hub", "flash", "sage", "_native_cudnn", "native"]
    valid = {b.value for b in AttentionBackendName}
    assert all(c.backend in valid for c in ATTENTION_PREFERENCE)
    # the only Hub name is served by the locally installed flash-attn 4 package, never by a download
    assert [c.label for c in ATTENTION_PREFERENCE if c.backend.endswith("_hub")] == ["flash-attn 4 (local)"]


def test_flash4_local_needs_the_package_and_cuda():
    from diffusers_wan_ext.runtime.flash4 import flash4_unavailable_reason

    assert "CUDA" in flash4_unavailable_reason("cpu")
    report = rt.attention_backend_report("cpu", torch.bfloat16)
    assert report["flash_4_hub"] is not None and select_attention_backend("cpu") == "native"


def test_cpu_auto_is_native():
    assert select_attention_backend("cpu") == "native"
    assert select_attention_backend("cpu", torch.bfloat16) == "native"
    assert available_attention_backends("cpu")[-1] == "native"
    if not torch.cuda.is_available():
        assert select_attention_backend() == "native"
        assert available_attention_backends() == ["native"]


def test_order_with_pretended_packages(monkeypatch, fake_cuda):
    bf16 = torch.bfloat16
    for flag in ("_CAN_USE_FLASH_ATTN_3", "_CAN_USE_FLASH_ATTN", "_CAN_USE_SAGE_ATTN"):
        monkeypatch.setattr(ad, flag, False)
    assert select_attention_backend("cuda", bf16) == "_native_cudnn"  # Hopper + cuDNN SDPA
    monkeypatch.setattr(ad, "_CAN_USE_SAGE_ATTN", True)
    assert select_attention_backend("cuda", bf16) == "sage"
    monkeypatch.setattr(ad, "_CAN_USE_FLASH_ATTN", True)
    assert select_attention_backend("cuda", bf16) == "flash"
    monkeypatch.setattr(ad, "_CAN_USE_FLASH_ATTN_3", True)
    assert select_attention_backend("cuda", bf16) == "_flash_3"
    assert available_attention_backends("cuda", bf16) == ["_flash_3", "flash", "sage", "_native_cudnn", "native"]
    # packages installed but the model is fp32, or on the CPU: SDPA
    assert select_attention_backend("cuda", torch.float32) == "native"
    assert select_attention_backend("cpu", bf16) == "native"


def test_cudnn_needs_hopper_and_enabled_sdp(monkeypatch, fake_cuda):
    for flag in ("_CAN_USE_FLASH_ATTN_3", "_CAN_USE_FLASH_ATTN", "_CAN_USE_SAGE_ATTN"):
        monkeypatch.setattr(ad, flag, False)
    assert select_attention_backend("cuda") == "_native_cudnn"
    fake_cuda["capability"] = (8, 0)
    assert select_attention_backend("cuda") == "native"
    assert "compute capability 8.0 < 9.0" in rt.attention_backend_report("cuda")["_native_cudnn"]
    fake_cuda["capability"] = (9, 0)
    fake_cuda["cudnn_sdp"] = False
    assert select_attention_backend("cuda") == "native"
    fake_cuda["cudnn_sdp"] = True
    fake_cuda["cudnn"] = False
    assert select_attention_backend("cuda") == "native"


def test_sage_version_too_old_is_reported(monkeypatch, fake_cuda):
    """Diffusers refuses sageattention 1.0.6 (needs >= 2.1.1): importable is not enough."""
    monkeypatch.setattr(ad, "_CAN_USE_SAGE_ATTN", False)
    real = rt._dist_version
    monkeypatch.setattr(rt, "_dist_version", lambda dist: "1.0.6" if dist == "sageattention" else real(dist))
    report = rt.attention_backend_report("cuda", torch.bfloat16)
    assert report["sage"] == f"sageattention 1.0.6 < {ad._REQUIRED_SAGE_VERSION}"
    assert select_attention_backend("cuda", torch.bfloat16) != "sage"


# ------------------------------------------------------------------------------------------- tiny pipeline
@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    tokenizer, text_encoder = make_text_parts(tmp_path_factory.mktemp("tok") / "umt5")
    return WanExtPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=make_vae(), scheduler=make_scheduler(),
        transformer=make_transformer(16, clip=False, stock=True, seed=1),
        transformer_2=make_transformer(16, clip=False, seed=2), boundary_ratio=0.875,
    )


run_t2v = partial(latents_of, height=H, width=W, num_frames=F, num_inference_steps=2)


def processor_backends(model):
    return {m.processor._attention_backend for m in model.modules() if hasattr(getattr(m, "processor", None),
                                                                                  "_attention_backend")}


@pytest.fixture
def dispatch_spy(monkeypatch):
    """Record the ``backend`` every processor passes to ``dispatch_attention_fn`` (stock and ours)."""
    import diffusers.models.transformers.transformer_wan as stock_wan

    import diffusers_wan_ext.models.attention_processor as ours

    calls = []

    def spy(origin, fn):
        def wrapped(*args, **kwargs):
            calls.append((origin, kwargs.get("backend")))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(stock_wan, "dispatch_attention_fn", spy("WanAttnProcessor", stock_wan.dispatch_attention_fn))
    monkeypatch.setattr(ours, "dispatch_attention_fn", spy("WanTextLenAttnProcessor", ours.dispatch_attention_fn))
    return calls


def test_set_on_pipeline_every_transformer_and_output_unchanged(t2v, caplog):
    reset_attention_backend(t2v)
    before = run_t2v(t2v)
    active = _AttentionBackendRegistry._active_backend
    with caplog.at_level(logging.WARNING, logger="diffusers_wan_ext"):
        assert t2v.set_attention_backend() == "native"
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("diffusers_wan_ext:")]
    assert len(line) == 1 and "attention backend 'native' on transformer, transformer_2" in line[0]
    if not torch.cuda.is_available():
        assert "flash-attn 3: not installed" in line[0] or "flash-attn 3: needs" in line[0]
        assert "cuDNN SDPA: needs a CUDA GPU" in line[0]
    for model in (t2v.transformer, t2v.transformer_2):
        assert processor_backends(model) == {AttentionBackendName.NATIVE}
    assert _AttentionBackendRegistry._active_backend == active  # the choice stays with this pipeline
    torch.testing.assert_close(run_t2v(t2v), before, rtol=0, atol=0)

    t2v.reset_attention_backend()
    for model in (t2v.transformer, t2v.transformer_2):
        assert processor_backends(model) == {None}


def test_explicit_backend_reaches_dispatch_and_differs_only_by_rounding(parts, dispatch_spy):  # noqa: F811
    """Stock WanAttnProcessor (self-attention) and our WanTextLenAttnProcessor (CLIP cross-attention) both pass the
    pipeline's backend to the dispatch."""
    pipe = build(WanFunInpaintPipeline, parts, make_transformer(36), clip=True)
    reset_attention_backend(pipe)
    base = run_fun(pipe, image=picture(1))
    assert {b for _, b in dispatch_spy} == {None}
    dispatch_spy.clear()

    assert set_attention_backend(pipe, "_native_math", verbose=False) == "_native_math"
    math = run_fun(pipe, image=picture(1))
    assert {o for o, _ in dispatch_spy} == {"WanAttnProcessor", "WanTextLenAttnProcessor"}
    assert {b for _, b in dispatch_spy} == {AttentionBackendName._NATIVE_MATH}
    torch.testing.assert_close(math, base, rtol=1e-5, atol=1e-5)

    dispatch_spy.clear()
    set_attention_backend(pipe.transformer, "native", verbose=False)  # a model works too
    run_fun(pipe, image=picture(1))
    assert {b for _, b in dispatch_spy} == {AttentionBackendName.NATIVE}
    reset_attention_backend(pipe.transformer)
    assert processor_backends(pipe.transformer) == {None}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only messages")
def test_explicit_unavailable_backend_raises_helpfully(t2v):
    with pytest.raises(ValueError) as e:
        t2v.set_attention_backend("flash")
    msg = str(e.value)
    assert "'flash' cannot be used here: flash-attn is not installed" in msg
    assert "Use one of native or backend='auto'" in msg
    assert "pip install 'flash-attn>=" in msg and "no prebuilt wheel" in msg
    assert "sage ('sage'): not installed" in msg or "sage ('sage'): needs" in msg
    with pytest.raises(ValueError, match="cuDNN|CUDA GPU"):
        set_attention_backend(t2v, "_native_cudnn")
    with pytest.raises(ValueError, match="unknown attention backend 'fastest'"):
        set_attention_backend(t2v, "fastest")
    # nothing was changed by the failed calls
    t2v.reset_attention_backend()
    assert processor_backends(t2v.transformer) == {None}


def test_explicit_backend_with_pretended_package_names_the_cuda_requirement(monkeypatch):
    monkeypatch.setattr(ad, "_CAN_USE_FLASH_ATTN", True)
    model = make_transformer(16, clip=False, stock=True)
    with pytest.raises(ValueError, match="'flash' cannot be used here: needs a CUDA GPU"):
        set_attention_backend(model, "flash", device="cpu")


def test_models_without_dispatch_are_refused():
    with pytest.raises(ValueError, match="no attention processors that use Diffusers' attention dispatch"):
        set_attention_backend(make_vae(), "native")
    with pytest.raises(TypeError, match="takes a Diffusers pipeline or model"):
        set_attention_backend(object(), "native")
