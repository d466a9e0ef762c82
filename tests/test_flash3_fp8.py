"""CPU tests of the FlashAttention-3 fp8 self-attention option (runtime/flash3_fp8.py) with a fake
``flash_attn_interface``: the fake checks what the kernel would receive (e4m3 q / k / v, fp32 descales of shape
(batch, kv_heads)) and computes the dequantized attention with SDPA, so these tests cover our quantization, the op,
the dispatch registration and ``optimize_transformer(self_attention=...)``; the kernel itself needs a Hopper GPU."""

from __future__ import annotations

import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models import attention_dispatch as ad

from diffusers_wan_ext.runtime import attention_backend_report, optimize_transformer
from diffusers_wan_ext.runtime import flash3_fp8 as f3

#: relative (Frobenius) error bound of attention on e4m3 inputs with per-head scales: e4m3 keeps 3 mantissa bits
#: (relative rounding error <= 2^-4 = 6.25e-2 per element, ~2e-2 on average); measured ~2-3e-2 here
E4M3_REL_BOUND = 6e-2
ALL_HDIMS = {f"FLASHATTENTION_DISABLE_HDIM{d}": False for d in (64, 96, 128, 192, 256)}


class FakeFA3:
    """``flash_attn_interface`` stand-in: checks its inputs and runs SDPA on the dequantized tensors."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, **unused):
        assert q.dtype == k.dtype == v.dtype == torch.float8_e4m3fn
        assert q.dim() == 4 and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1]
        batch, heads, kv_heads = q.shape[0], q.shape[2], k.shape[2]
        for descale in (q_descale, k_descale, v_descale):
            assert descale is not None and descale.dtype == torch.float32
            assert descale.shape == (batch, kv_heads) and descale.is_contiguous()
            assert bool((descale > 0).all())

        def deq(x, descale):
            return x.float() * descale.repeat_interleave(x.shape[2] // kv_heads, dim=1)[:, None, :, None]

        qf, kf, vf = (deq(t, d).transpose(1, 2) for t, d in ((q, q_descale), (k, k_descale), (v, v_descale)))
        out = F.scaled_dot_product_attention(qf, kf, vf, scale=softmax_scale, is_causal=causal,
                                             enable_gqa=kv_heads != heads)
        self.calls.append(dict(q_shape=tuple(q.shape), causal=causal, scale=softmax_scale))
        return out.transpose(1, 2).to(torch.bfloat16), torch.zeros(batch, heads, q.shape[1])  # (out, lse) like 2.x


def _install(monkeypatch, build_flags: dict | None) -> FakeFA3:
    fake = FakeFA3()
    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_func = fake.flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    if build_flags is None:
        monkeypatch.setitem(sys.modules, "flash_attn_config", None)  # an import of it raises ImportError
    else:
        config = types.ModuleType("flash_attn_config")
        config.CONFIG = {"build_flags": {"FLASHATTENTION_DISABLE_FP8": False, **build_flags}}
        monkeypatch.setitem(sys.modules, "flash_attn_config", config)
    return fake


@pytest.fixture
def fake_fa3(monkeypatch):
    """A fake FlashAttention-3 built with every head dim, on a pretend Hopper GPU."""
    monkeypatch.setattr(f3, "_device_capability", lambda device: (9, 0))
    return _install(monkeypatch, ALL_HDIMS)


def _qkv(batch=2, seq=24, heads=4, kv_heads=4, dim=32, dtype=torch.bfloat16, kv_seq=None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, seq, heads, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_seq or seq, kv_heads, dim, generator=g).to(dtype)
    v = (torch.randn(batch, kv_seq or seq, kv_heads, dim, generator=g) * 3).to(dtype)
    return q, k, v


def _sdpa(q, k, v, **kw):
    out = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), **kw)
    return out.transpose(1, 2)


def _rel(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_quantize_fp8_heads():
    x = _qkv()[0] * torch.arange(1, 5).view(1, 1, 4, 1).to(torch.bfloat16)  # a different range per head
    x8, descale = f3.quantize_fp8_heads(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape
    assert descale.dtype == torch.float32 and descale.shape == (2, 4)
    torch.testing.assert_close(descale, x.abs().amax(dim=(1, 3)).float() / 448.0)
    assert x8.float().abs().amax().item() == 448.0  # each head's amax maps onto the e4m3 maximum
    back = x8.float() * descale[:, None, :, None]
    assert _rel(back, x) < 4e-2 and not torch.equal(back, x.float())
    # GQA: one scale per group of query heads, the (batch, kv_heads) shape
    g8, gd = f3.quantize_fp8_heads(x, kv_heads=2)
    assert gd.shape == (2, 2)
    torch.testing.assert_close(gd, x.abs().amax(dim=(1, 3)).float().view(2, 2, 2).amax(-1) / 448.0)
    # an all-zero tensor: a finite scale, zeros out
    z8, zd = f3.quantize_fp8_heads(torch.zeros(1, 3, 2, 16, dtype=torch.bfloat16))
    assert bool((zd > 0).all()) and not z8.float().any()
    with pytest.raises(ValueError, match="4 heads do not split into 3"):
        f3.quantize_fp8_heads(x, kv_heads=3)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_matches_sdpa_within_e4m3_error(fake_fa3, kv_heads):
    q, k, v = _qkv(kv_heads=kv_heads)
    out = f3.flash3_fp8_attention(q, k, v, scale=0.2)
    ref = _sdpa(q, k, v, scale=0.2, enable_gqa=kv_heads != 4)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert 0 < _rel(out, ref) < E4M3_REL_BOUND
    assert fake_fa3.calls == [dict(q_shape=tuple(q.shape), causal=False, scale=0.2)]
    # causal self-attention (equal lengths: FA3's bottom-right and SDPA's top-left masks agree), fp16 in and out
    q, k, v = (t.half() for t in _qkv())
    out = f3.flash3_fp8_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.float16 and fake_fa3.calls[-1]["causal"] is True
    assert _rel(out, _sdpa(q, k, v, is_causal=True)) < E4M3_REL_BOUND


def test_op_under_compile_fullgraph(fake_fa3):
    q, k, v = _qkv()
    eager = f3.flash3_fp8_attention(q, k, v)
    torch._dynamo.reset()
    compiled = torch.compile(f3.flash3_fp8_attention, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), eager)
    assert len(fake_fa3.calls) == 2


def test_dispatch_registration(fake_fa3):
    key = f3.register_flash3_fp8()
    assert f3.register_flash3_fp8() is key and isinstance(key, ad.AttentionBackendName)
    assert key.value == "flash_3_fp8" and ad.AttentionBackendName("flash_3_fp8") is key
    assert pickle.loads(pickle.dumps(key)) is key
    assert "flash_3_fp8" not in [b.value for b in ad.AttentionBackendName]  # members and auto choice unchanged
    q, k, v = _qkv()
    out = ad.dispatch_attention_fn(q, k, v, backend=key)
    assert _rel(out, _sdpa(q, k, v)) < E4M3_REL_BOUND and len(fake_fa3.calls) == 1


def test_masks_lse_context_parallel_and_bad_inputs_are_refused(fake_fa3):
    q, k, v = _qkv()
    key = f3.register_flash3_fp8()
    mask = torch.ones(2, 1, 24, 24, dtype=torch.bool)
    for kwargs in (dict(attn_mask=mask), dict(return_lse=True), dict(_parallel_config=object()),
                   dict(dropout_p=0.1)):
        with pytest.raises(ValueError, match="no attention mask") as info:
            f3.flash3_fp8_backend_fn(q, k, v, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no attention mask"):
        ad.dispatch_attention_fn(q, k, v, attn_mask=mask, backend=key)
    with pytest.raises(ValueError, match="is_causal needs equal query and key lengths"):
        f3.flash3_fp8_attention(*_qkv(kv_seq=16), is_causal=True)
    with pytest.raises(ValueError, match="fp16/bf16"):
        f3.flash3_fp8_attention(*_qkv(dtype=torch.float32))
    assert fake_fa3.calls == []


def test_unavailable_reasons_are_one_line(monkeypatch):
    reasons = {}
    if not torch.cuda.is_available():
        reasons["no cuda"] = (f3.flash3_fp8_unavailable_reason(), "needs a CUDA GPU")
    reasons["cpu"] = (f3.flash3_fp8_unavailable_reason("cpu"), "needs a CUDA GPU (device is cpu)")
    capability = {"value": (8, 9)}
    monkeypatch.setattr(f3, "_device_capability", lambda device: capability["value"])
    reasons["ada"] = (f3.flash3_fp8_unavailable_reason(), "Hopper (sm90) only; this GPU is sm89")
    capability["value"] = (9, 0)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    reasons["missing"] = (f3.flash3_fp8_unavailable_reason(), "flash_attn_interface is not importable")
    _install(monkeypatch, {"FLASHATTENTION_DISABLE_FP8": True})
    reasons["no fp8"] = (f3.flash3_fp8_unavailable_reason(), "built without FP8")
    # the build of benchmarks/fa3_build.sh: head dim 128 only
    _install(monkeypatch, {**ALL_HDIMS, **{f"FLASHATTENTION_DISABLE_HDIM{d}": True for d in (64, 96, 192, 256)}})
    reasons["hdim"] = (f3.flash3_fp8_unavailable_reason(head_dim=64), "no kernel for head dim 64 (built: 128)")
    reasons["hdim align"] = (f3.flash3_fp8_unavailable_reason(head_dim=120), "multiple of 16 (got 120)")
    reasons["fp32"] = (f3.flash3_fp8_unavailable_reason(dtype=torch.float32), "needs fp16/bf16")
    for name, (reason, expected) in reasons.items():
        assert reason is not None and expected in reason and "\n" not in reason, name
    assert f3.flash3_fp8_unavailable_reason(dtype=torch.bfloat16, head_dim=128) is None
    _install(monkeypatch, None)  # a build without flash_attn_config: features not checked
    assert f3.flash3_fp8_unavailable_reason(head_dim=64) is None


def test_attention_backend_report_lists_it_last():
    report = attention_backend_report("cpu", torch.bfloat16)
    assert list(report)[-1] == "flash_3_fp8" and "CUDA" in report["flash_3_fp8"]
    assert report["native"] is None


# ------------------------------------------------------------------------------------------ tiny transformer
def _tiny_dit(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                 text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2).to(dtype).eval()


def _inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, 3, 8, 8, generator=g).to(dtype), torch.tensor([500.0]),
            torch.randn(1, 7, 16, generator=g).to(dtype))


def test_optimize_transformer_routes_only_self_attention(fake_fa3):
    model = _tiny_dit()
    x, t, e = _inputs()
    with torch.no_grad():
        ref = model(x, t, e).sample
        report = optimize_transformer(model, compile=False, verbose=False, self_attention="flash_3_fp8")
        out = model(x, t, e).sample
    assert report["self_attention"] == "flash_3_fp8" and report["self_attention_layers"] == 2
    assert report["attention_backend"] == "native" and report["fused_qk_rope"] == 2
    assert len(fake_fa3.calls) == 2  # one per block: attn1 only
    assert {c["q_shape"] for c in fake_fa3.calls} == {(1, 48, 2, 16)}  # 3 x 4 x 4 video tokens, not the 7 text ones
    for block in model.blocks:
        assert block.attn1.processor._attention_backend.value == "flash_3_fp8"
        assert block.attn2.processor._attention_backend.value == "native"
    assert torch.isfinite(out).all() and 0 < _rel(out, ref) < E4M3_REL_BOUND


def test_optimize_transformer_refuses_when_unavailable(monkeypatch):
    monkeypatch.setattr(f3, "_device_capability", lambda device: None)  # no CUDA, also on a GPU machine
    model = _tiny_dit()
    with pytest.raises(ValueError, match="self_attention='flash_3_fp8' cannot be used for WanTransformer3DModel: "
                                         "needs a CUDA GPU") as info:
        optimize_transformer(model, compile=False, verbose=False, self_attention="flash_3_fp8")
    assert "\n" not in str(info.value)
    assert not model.blocks[0].attn1.fused_projections  # refused before changing anything
    with pytest.raises(ValueError, match="self_attention: expected None or 'flash_3_fp8', got 'sage'"):
        optimize_transformer(model, compile=False, verbose=False, self_attention="sage")


def test_optimize_transformer_refuses_fp32_and_unbuilt_head_dims(monkeypatch):
    monkeypatch.setattr(f3, "_device_capability", lambda device: (9, 0))
    _install(monkeypatch, {**ALL_HDIMS, "FLASHATTENTION_DISABLE_HDIM64": True})
    with pytest.raises(ValueError, match="needs fp16/bf16 activations"):
        optimize_transformer(_tiny_dit(torch.float32), compile=False, verbose=False, self_attention="flash_3_fp8")
    with pytest.raises(ValueError, match="no kernel for head dim 16"):
        optimize_transformer(_tiny_dit(), compile=False, verbose=False, self_attention="flash_3_fp8")


def test_regional_compile_fullgraph_traces_the_backend(fake_fa3):
    """The extra AttentionBackendName instance on the processors and the op trace under compile_repeated_blocks
    (fullgraph=True); aot_eager keeps it fast on the CPU."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _tiny_dit()
    x, t, e = _inputs()
    report = optimize_transformer(model, verbose=False, self_attention="flash_3_fp8", compile_backend="aot_eager")
    assert report["compiled"] == ["WanTransformer3DModel"]
    with torch.no_grad():
        out = model(x, t, e).sample
    assert torch.isfinite(out).all() and len(fake_fa3.calls) == 2
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # the blocks ran compiled


def test_scaled_fp8_file_with_fp8_gemms_and_flash3_fp8(fake_fa3, tmp_path):
    """The combination the 14B benchmark runs: a ComfyUI scaled-fp8 file kept in fp8 (Fp8Linear layers, some
    float32 modules), ``optimize_transformer(fp8=True, self_attention="flash_3_fp8")``: accepted (the model's dtype
    is the activations' bf16), attn1 only on the kernel, output within the e4m3 error of the same file without it."""
    from diffusers_wan_ext.conversion.dit import export_dit_state_dict
    from diffusers_wan_ext.conversion.quantized_dit import load_quantized_dit
    from diffusers_wan_ext.utils.single_file import write_single_file

    tiny = _tiny_dit(torch.float32)
    path = tmp_path / "dit_fp8_scaled.safetensors"
    write_single_file(path, export_dit_state_dict(tiny.state_dict()), "comfy-fp8-scaled",
                      prefix="model.diffusion_model.")
    config = {"dim": 32, "num_heads": 2, "ffn_dim": 32, "freq_dim": 16, "text_dim": 16, "in_dim": 4, "out_dim": 4,
              "num_layers": 2}
    ref_model, model = (load_quantized_dit(path, config, torch_dtype=torch.bfloat16) for _ in range(2))
    x, t, e = _inputs()
    with torch.no_grad():
        ref = ref_model(x, t, e).sample
        report = optimize_transformer(model, compile=False, verbose=False, fp8=True, self_attention="flash_3_fp8")
        out = model(x, t, e).sample
    assert report["self_attention_layers"] == 2 and len(fake_fa3.calls) == 2
    assert torch.isfinite(out).all() and 0 < _rel(out, ref) < E4M3_REL_BOUND
