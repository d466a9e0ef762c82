"""fp8 GEMMs for Fp8Linear (issue 21, "run fast"): path selection, activation scales, the fused projections and
``optimize_transformer(fp8=...)`` on CPU (where the layers upcast); the GEMM itself against the upcast path on a
CUDA GPU of compute capability 8.9+ (skipped elsewhere)."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from diffusers_wan_ext.models.quantized_linear import (Fp8Linear, fp8_scaled_linear, quantize_fp8_input,
                                                       select_fp8_gemm)
from diffusers_wan_ext.runtime import optimize_transformer

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
HOPPER = (9, 0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("args, expected", [
    (("rowwise", E4M3, False, 64, 32, "cuda", HOPPER), "rowwise"),
    (("tensorwise", E4M3, False, 64, 32, "cuda", HOPPER), "tensorwise"),
    (("tensorwise", E4M3, True, 64, 32, "cuda", HOPPER), "rowwise"),  # per-row weight scale needs row scales
    (("upcast", E4M3, False, 64, 32, "cuda", HOPPER), "upcast"),
    (("rowwise", E4M3, False, 64, 32, "cpu", None), "upcast"),
    (("rowwise", E4M3, False, 64, 32, "cuda", (8, 6)), "upcast"),  # Ampere: no fp8 tensor cores
    (("rowwise", E4M3, False, 64, 32, "cuda", (8, 9)), "rowwise"),  # Ada
    (("rowwise", E5M2, False, 64, 32, "cuda", HOPPER), "upcast"),
    (("rowwise", E4M3, False, 72, 32, "cuda", HOPPER), "upcast"),
    (("rowwise", E4M3, False, 64, 40, "cuda", HOPPER), "upcast"),
    (("rowwise", E4M3, False, 64, 32, "cuda", HOPPER, torch.float16), "upcast"),
])
def test_select_fp8_gemm(args, expected):
    assert select_fp8_gemm(*args) == expected


def test_select_fp8_gemm_rejects_unknown_mode():
    with pytest.raises(ValueError, match="fp8_gemm"):
        select_fp8_gemm("columnwise", E4M3, False, 64, 32, "cuda", HOPPER)
    with pytest.raises(ValueError, match="fp8_gemm"):
        Fp8Linear(64, 32).set_fp8_gemm("fast")


@pytest.mark.parametrize("rowwise", [False, True])
def test_quantize_fp8_input_maps_amax_onto_448(rowwise):
    x = torch.randn(6, 64) * torch.arange(1, 7).reshape(6, 1)
    q, scale = quantize_fp8_input(x, rowwise)
    assert q.dtype == E4M3
    expected = x.abs().amax(dim=-1, keepdim=True) / 448 if rowwise else x.abs().amax() / 448
    assert scale.shape == expected.shape and scale.dtype == torch.float32
    torch.testing.assert_close(scale, expected)
    assert q.float().abs().max() == 448  # the largest magnitude lands on the top of the range
    assert _rel(q.float() * scale, x) < 0.05  # e4m3: 3 mantissa bits


def _layer(out_features=32, in_features=64, seed=0) -> tuple[Fp8Linear, torch.nn.Linear]:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    return Fp8Linear.from_linear(linear), linear


def test_from_linear_stores_a_per_tensor_scale_like_scaled_files():
    layer, linear = _layer()
    assert layer.weight.dtype == E4M3 and layer.weight_scale.shape == ()
    torch.testing.assert_close(layer.weight_scale, linear.weight.abs().amax() / 448)
    assert _rel(layer.dequantized_weight(torch.float32), linear.weight) < 0.05


def test_cpu_input_takes_the_upcast_path_with_the_same_output():
    layer, _ = _layer()
    x = torch.randn(2, 5, 64)
    upcast = layer(x)
    layer.set_fp8_gemm("rowwise")
    assert layer.gemm_path(x) == "upcast"
    torch.testing.assert_close(layer(x), upcast, rtol=0, atol=0)
    assert "fp8_gemm=rowwise" in repr(layer)


def _scaled_mm_on_cpu(rowwise: bool) -> bool:
    a = torch.zeros(16, 16, dtype=E4M3)
    scale_a, scale_b = (torch.ones(16, 1), torch.ones(1, 16)) if rowwise else (torch.tensor(1.0), torch.tensor(1.0))
    try:
        torch._scaled_mm(a, a.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("mode", ["tensorwise", "rowwise"])
def test_fp8_scaled_linear_math_on_cpu(mode):
    """The fp8 GEMM routine itself (CPU kernel of torch._scaled_mm): the quantized operands times their scales."""
    if not _scaled_mm_on_cpu(mode == "rowwise"):
        pytest.skip(f"this torch ({torch.__version__}) has no CPU torch._scaled_mm with {mode} scales")
    layer, linear = _layer()
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    out = fp8_scaled_linear(x, layer.weight, layer.weight_scale, layer.bias, mode, torch.bfloat16)
    assert out.shape == (3, 7, 32) and out.dtype == torch.bfloat16
    q, s = quantize_fp8_input(x.reshape(-1, 64), mode == "rowwise")
    emulated = (q.float() * s) @ (layer.weight.float() * layer.weight_scale).T + layer.bias.float()
    assert _rel(out.reshape(-1, 32), emulated) < 1e-2  # only the bf16 output rounding
    assert _rel(out, linear(x.float())) < 6e-2  # fp8 error of both operands


def test_concatenated_layers_match_the_parts():
    parts = [_layer(out_features=n, seed=i)[0] for i, n in enumerate((32, 16, 48))]
    fused = Fp8Linear.concatenated(parts)
    assert fused.weight_scale.shape == (96,)
    x = torch.randn(4, 64)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    with pytest.raises(ValueError, match="differ"):
        Fp8Linear.concatenated([parts[0], _layer(in_features=32)[0]])


def _tiny_dit():
    torch.manual_seed(0)
    return WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                 text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2).eval().requires_grad_(False)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 7, 32, generator=g), return_dict=False)


def test_optimize_transformer_fp8_quantizes_and_fuses_block_linears():
    model = _tiny_dit()
    ref = model(**_inputs())[0]
    report = optimize_transformer(model, compile=False, verbose=False, fp8="tensorwise")
    assert report["fp8"] == "tensorwise" and report["fused_gelu"] is False
    linears = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Fp8Linear) for m in linears)
    attn1, attn2 = model.blocks[0].attn1, model.blocks[0].attn2
    assert isinstance(attn1.to_qkv, Fp8Linear) and attn1.to_qkv.weight_scale.shape == (96,)
    assert isinstance(attn2.to_kv, Fp8Linear) and attn2.to_kv.fp8_gemm == "tensorwise"
    # one copy: the separate layers' weights are row views of the fused weight
    assert attn1.to_k.weight.data_ptr() == attn1.to_qkv.weight[32:].data_ptr()
    out = model(**_inputs())[0]
    assert 0 < _rel(out, ref) < 5e-2


def test_optimize_transformer_fp8_true_keeps_the_files_weights_and_scales():
    model = _tiny_dit()
    quantized = {}
    for name, module in list(model.blocks.named_modules()):
        if type(module) is torch.nn.Linear:
            parent, _, child = name.rpartition(".")
            layer = Fp8Linear.from_linear(module)
            layer.weight_scale = layer.weight_scale * 1.5  # a scale no requantization would produce
            layer.weight.data = (layer.weight.float() / 1.5).to(E4M3)
            setattr(model.blocks.get_submodule(parent), child, layer)
            quantized[name] = (layer.weight.clone(), layer.weight_scale.clone())
    ref = model(**_inputs())[0]
    report = optimize_transformer(model, compile=False, verbose=False, fp8=True)
    assert report["fp8"] == "rowwise"
    for name, (weight, scale) in quantized.items():
        layer = model.blocks.get_submodule(name)
        assert layer.fp8_gemm == "rowwise"
        assert torch.equal(layer.weight.view(torch.uint8), weight.view(torch.uint8))
        assert torch.equal(layer.weight_scale, scale)
    torch.testing.assert_close(model(**_inputs())[0], ref, rtol=1e-5, atol=1e-5)  # CPU: same upcast math


def test_optimize_transformer_rejects_unknown_fp8_value():
    with pytest.raises(ValueError, match="fp8"):
        optimize_transformer(_tiny_dit(), compile=False, verbose=False, fp8="int4")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 GEMMs need a CUDA GPU of compute capability 8.9+")
@pytest.mark.parametrize("mode", ["tensorwise", "rowwise"])
def test_fp8_gemm_matches_upcast_on_gpu(mode):
    layer, linear = _layer(out_features=256, in_features=512)
    layer, linear = layer.cuda(), linear.cuda().to(torch.bfloat16)
    x = torch.randn(4, 300, 512, device="cuda", dtype=torch.bfloat16)
    upcast = layer(x)
    layer.set_fp8_gemm(mode)
    assert layer.gemm_path(x) == mode
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == upcast.shape
    assert _rel(out, upcast) < 4e-2
    compiled = torch.compile(layer, fullgraph=True)
    assert _rel(compiled(x), out) < 1e-2
