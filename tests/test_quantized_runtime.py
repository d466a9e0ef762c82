"""Running a DiT single file with its weights kept quantized (issue 21, "load directly"): ``load_quantized_dit`` and
``load_release(keep_quantized=True)``.  CPU, tiny models, real files (the ``gguf`` writer; safetensors fp8 in each
convention).

The reference is the same file dequantized to float32 by the reader (``read_quantized(...).dequantize``) and loaded
through ``load_dit_from_original``: fp8 layers compute ``weight.to(dtype) * scale`` -- the same values, so outputs
agree to fp32 rounding (1e-5); GGUF layers use Diffusers' torch dequantization (``GGUFLinear``), which rounds the
block products to float16 as Diffusers does (Q8_0: exact; K-quants: relative 2e-3), and match stock
``from_single_file(..., quantization_config=GGUFQuantizationConfig(...))`` to fp32 rounding (once the float32
time-embedder Linears, which stock dequantizes in float16 steps and this loader in float32, are the same).
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import GGUFQuantizationConfig, WanTransformer3DModel
from safetensors.torch import save_file

gguf = pytest.importorskip("gguf")

from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor  # noqa: E402

from diffusers_wan_ext.conversion.dit import load_dit_from_original  # noqa: E402
from helpers import write_wide_t2v_gguf  # noqa: E402
from diffusers_wan_ext.conversion.quantized_dit import load_quantized_dit  # noqa: E402
from diffusers_wan_ext.models.quantized_linear import Fp8Linear, quantized_weight_bytes  # noqa: E402
from diffusers_wan_ext.release_converter import load_release  # noqa: E402
from diffusers_wan_ext.utils.fp8_files import fp8_state_dict  # noqa: E402
from diffusers_wan_ext.utils.gguf_files import write_gguf  # noqa: E402
from diffusers_wan_ext.utils.io import ConversionError, load_state_dict  # noqa: E402
from diffusers_wan_ext.utils.single_file import read_quantized  # noqa: E402

K_TYPES = ("Q4_K", "Q6_K", "Q5_K")


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


def dequantized_reference(path, cfg=None):
    """The file's values dequantized to float32 by the reader, loaded the dequantized way."""
    tensors, _ = read_quantized(path)
    return load_dit_from_original({k: q.dequantize(torch.float32) for k, q in tensors.items()}, cfg, torch.float32)


def core_inputs(channels: int = 16, text_dim: int = 32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, channels, 2, 8, 8, generator=g), torch.tensor([500.0]),
            torch.randn(1, 7, text_dim, generator=g))


def run(model, x, t, ctx, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t, ctx, return_dict=False, **kw)[0]


# ------------------------------------------------------------------------------------------------------ GGUF
@pytest.fixture(scope="module")
def wide_t2v_gguf(tmp_path_factory):
    """A core T2V DiT of width 256 (K-quant blocks fit its rows) as a GGUF of Q8_0 / Q4_K / Q6_K / Q5_K / F32."""
    path = tmp_path_factory.mktemp("wide") / "wan-wide-mixed.gguf"
    return path, {key: qtype for key, (_, qtype) in write_wide_t2v_gguf(path).items()}


def test_gguf_linears_stay_packed_and_match(wide_t2v_gguf, tmp_path):
    path, types = wide_t2v_gguf
    model = load_quantized_dit(path, torch_dtype=torch.float32)
    assert type(model) is WanTransformer3DModel
    packed = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert "blocks.0.ffn.net.0.proj" in packed and "blocks.1.attn2.to_out.0" in packed
    assert not any("time_embedder" in n for n in packed)  # Diffusers' _keep_in_fp32_modules stay dequantized
    expected_bytes = 0
    for name, layer in packed.items():
        w = layer.weight
        assert isinstance(w, GGUFParameter) and w.dtype == torch.uint8, name
        block, size = gguf.GGML_QUANT_SIZES[w.quant_type]
        assert w.numel() == layer.out_features * layer.in_features // block * size, name
        assert w.numel() * 4 < layer.out_features * layer.in_features * 4 * 0.3 * 4, name  # >= 3.7x under fp32
        expected_bytes += w.numel()
    assert {w.quant_type.name for w in (m.weight for m in packed.values())} == {"Q8_0", *K_TYPES}
    assert quantized_weight_bytes(model) == expected_bytes

    x, t, ctx = core_inputs(text_dim=256)
    got = run(model, x, t, ctx)
    assert rel_rms(got, run(dequantized_reference(path), x, t, ctx)) < 2e-3
    model.save_config(tmp_path / "repo" / "transformer")
    stock = WanTransformer3DModel.from_single_file(
        str(path), config=str(tmp_path / "repo"), subfolder="transformer", torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    assert rel_rms(got, run(stock, x, t, ctx)) < 2e-3
    # the one difference: Linears Diffusers keeps in float32 (the time embedder) are dequantized here by the gguf
    # package in float32, by Diffusers in float16 steps; with those equal, the outputs are Diffusers' GGUF path's
    for name in ("linear_1", "linear_2"):
        getattr(stock.condition_embedder.time_embedder, name).weight = torch.nn.Parameter(
            getattr(model.condition_embedder.time_embedder, name).weight.detach().clone())
    assert torch.allclose(got, run(stock, x, t, ctx), rtol=1e-5, atol=1e-6)


def test_gguf_model_behaves_like_stock(wide_t2v_gguf, tmp_path):
    model = load_quantized_dit(wide_t2v_gguf[0], torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="not serializable"):  # stock GGUF models refuse save_pretrained too
        model.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="quantized model"):
        model.to(torch.bfloat16)
    model.to("meta")  # an offload-style device move: the blocks move packed
    layer = model.blocks[0].ffn.net[0].proj
    assert isinstance(layer.weight, GGUFParameter) and layer.weight.dtype == torch.uint8 and layer.weight.is_meta


def test_lora_on_a_gguf_model(wide_t2v_gguf):
    pytest.importorskip("peft")
    path = wide_t2v_gguf[0]
    g = torch.Generator().manual_seed(1)
    lora = {}
    for module, (out_f, in_f) in {"blocks.0.ffn.net.0.proj": (512, 256), "blocks.1.attn1.to_q": (256, 256)}.items():
        lora[f"{module}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.3
        lora[f"{module}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.3
    x, t, ctx = core_inputs(text_dim=256)
    outs, models = [], (load_quantized_dit(path, torch_dtype=torch.float32), dequantized_reference(path))
    for model in models:
        before = run(model, x, t, ctx)
        model.load_lora_adapter(dict(lora), adapter_name="test", prefix=None)
        after = run(model, x, t, ctx)
        assert rel_rms(after, before) > 1e-2  # the LoRA acts
        outs.append(after)
    layer = models[0].blocks[0].ffn.net[0].proj
    assert isinstance(layer.base_layer, GGUFLinear) and isinstance(layer.base_layer.weight, GGUFParameter)
    assert rel_rms(*outs) < 2e-3


# ------------------------------------------------------------------------------------------------------- fp8
def fp8_file(sd, path, prefix="", **kw):
    out, meta = fp8_state_dict({prefix + k: v for k, v in sd.items()}, prefix=prefix, **kw)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata=meta or None)
    return path


@pytest.mark.parametrize("name,kw", [
    ("scale_weight", dict(convention="scale_weight")),
    ("weight_scale", dict(convention="weight_scale")),
    ("e5m2-plain", dict(scaled=False, fp8_dtype=torch.float8_e5m2)),
])
def test_fp8_linears_stay_fp8_and_match(tiny_release, tmp_path, name, kw):
    sd = load_state_dict(tiny_release("t2v") / "diffusion_pytorch_model.safetensors")
    path = fp8_file(sd, tmp_path / f"dit-{name}.safetensors", prefix="model.diffusion_model.", **kw)
    model = load_quantized_dit(path, torch_dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert "blocks.0.attn1.to_q" in layers and "blocks.1.ffn.net.2" in layers
    fp8 = torch.float8_e5m2 if "e5m2" in name else torch.float8_e4m3fn
    assert all(m.weight.dtype == fp8 for m in layers.values())
    assert quantized_weight_bytes(model) == sum(m.weight.numel() + 4 * m.weight_scale.numel() for m in layers.values())
    dense = sum(m.weight.numel() * 4 for m in layers.values())
    assert quantized_weight_bytes(model) < dense / 3.5  # 1 byte a weight against 4
    x, t, ctx = core_inputs()
    assert torch.allclose(run(model, x, t, ctx), run(dequantized_reference(path), x, t, ctx), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="not serializable"):  # Diffusers could not read the scales back
        model.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="quantized model"):
        model.to(torch.bfloat16)
    model.to("meta")  # device moves keep fp8 storage and the float32 scale
    layer = model.blocks[0].attn1.to_q
    assert layer.weight.dtype == fp8 and layer.weight.is_meta and layer.weight_scale.dtype == torch.float32


def test_fp8_model_dequantizes_to_plain_linears(tiny_release, tmp_path):
    sd = load_state_dict(tiny_release("t2v") / "diffusion_pytorch_model.safetensors")
    model = load_quantized_dit(fp8_file(sd, tmp_path / "dit.safetensors"), torch_dtype=torch.float32)
    x, t, ctx = core_inputs()
    want = run(model, x, t, ctx)
    model.dequantize()
    assert not any(isinstance(m, Fp8Linear) for m in model.modules()) and quantized_weight_bytes(model) == 0
    assert torch.allclose(run(model, x, t, ctx), want, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path / "plain")


def test_lora_on_an_fp8_model(tiny_release, tmp_path):
    pytest.importorskip("peft")
    sd = load_state_dict(tiny_release("t2v") / "diffusion_pytorch_model.safetensors")
    path = fp8_file(sd, tmp_path / "dit.safetensors")
    g = torch.Generator().manual_seed(1)
    lora = {"blocks.0.ffn.net.0.proj.lora_A.weight": torch.randn(4, 48, generator=g) * 0.3,
            "blocks.0.ffn.net.0.proj.lora_B.weight": torch.randn(96, 4, generator=g) * 0.3}
    x, t, ctx = core_inputs()
    outs, models = [], (load_quantized_dit(path, torch_dtype=torch.float32), dequantized_reference(path))
    for model in models:
        before = run(model, x, t, ctx)
        model.load_lora_adapter(dict(lora), adapter_name="test", prefix=None)
        outs.append(run(model, x, t, ctx))
        assert rel_rms(outs[-1], before) > 1e-2
    layer = models[0].blocks[0].ffn.net[0].proj
    assert isinstance(layer.base_layer, Fp8Linear) and layer.base_layer.weight.dtype == torch.float8_e4m3fn
    assert layer.lora_A["test"].weight.dtype == torch.float32  # PEFT keeps the adapter out of fp8
    assert torch.allclose(*outs, rtol=1e-5, atol=1e-5)


def test_fp8_layer_keeps_storage_on_dtype_casts():
    layer = Fp8Linear.from_quantized(torch.randn(8, 16).to(torch.float8_e4m3fn), torch.tensor(0.5), torch.zeros(8))
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------- another family
def test_vace_keeps_gguf_and_fp8_linears(tiny_release, tmp_path):
    sd = load_state_dict(tiny_release("vace") / "diffusion_pytorch_model.safetensors")
    paths = {"gguf": tmp_path / "vace-Q8_0.gguf", "fp8": tmp_path / "vace-fp8.safetensors"}
    write_gguf(paths["gguf"], sd, "Q8_0")  # width 48: the Q8_0 rows (32) fit the 96-wide ffn.2 inputs
    fp8_file(sd, paths["fp8"], prefix="diffusion_model.", convention="weight_scale")
    x, t, ctx = core_inputs()
    for kind, path in paths.items():
        model = load_quantized_dit(path, torch_dtype=torch.float32)
        assert type(model).__name__ == "WanVACETransformer3DModel"
        cls = GGUFLinear if kind == "gguf" else Fp8Linear
        assert isinstance(model.vace_blocks[0].ffn.net[2], cls) and isinstance(model.blocks[1].ffn.net[2], cls)
        assert quantized_weight_bytes(model) > 0
        control = torch.randn(1, model.config.vace_in_channels, 2, 8, 8, generator=torch.Generator().manual_seed(2))
        got = run(model, x, t, ctx, control_hidden_states=control)
        want = run(dequantized_reference(path), x, t, ctx, control_hidden_states=control)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), kind


def effective_weights(model) -> dict[str, torch.Tensor]:
    """The weights a model computes with: packed layers dequantized as their forward does."""
    out = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            out[f"{name}.weight"] = module.dequantized_weight(torch.float32)
            del out[f"{name}.weight_scale"]
            out.pop(f"{name}.input_scale", None)
        elif isinstance(module, GGUFLinear):
            out[f"{name}.weight"] = dequantize_gguf_tensor(module.weight).float()
    return out


@pytest.mark.parametrize("arch", ["i2v", "fun-control", "s2v", "animate"])
def test_every_family_loads_kept_quantized(tiny_release, tmp_path, arch):
    """The same key tables as the dequantized loader (Animate's adapter converted by its rules, dequantized)."""
    release = tiny_release(arch)
    sd = load_state_dict(release / "diffusion_pytorch_model.safetensors")
    cfg = json.loads((release / "config.json").read_text())
    gguf_path = tmp_path / f"{arch}-Q8_0.gguf"
    write_gguf(gguf_path, sd, "Q8_0", shape_fix=True)  # rows of 256 + orig_shape (5-D patch embedding included)
    fp8_path = fp8_file(sd, tmp_path / f"{arch}-fp8.safetensors", prefix="model.diffusion_model.",
                        convention="scale_weight")
    for path, cls in ((gguf_path, GGUFLinear), (fp8_path, Fp8Linear)):
        model = load_quantized_dit(path, cfg, torch_dtype=torch.float32)
        reference = dequantized_reference(path, cfg)
        assert type(model) is type(reference) and isinstance(model.blocks[0].ffn.net[2], cls), (arch, path.name)
        got, want = effective_weights(model), reference.state_dict()
        assert set(got) == set(want)
        for k in want:  # GGUF: Diffusers' float16 block products against the gguf package's float32
            assert torch.allclose(got[k], want[k].float(), rtol=0, atol=1e-3 * float(want[k].abs().max())), (arch, k)


# ----------------------------------------------------------------------------------------- pipeline helper
def test_load_release_keeps_a_gguf_dit_quantized(tiny_release, tmp_path):
    release = tiny_release("t2v")
    path = tmp_path / "dit-Q8_0.gguf"
    write_gguf(path, load_state_dict(release / "diffusion_pytorch_model.safetensors"), "Q8_0")
    frames = []
    for keep in (True, False):
        loaded = load_release(release, transformer=path, dtype="fp32", keep_quantized=keep, progress=False)
        pipe = loaded.build_pipeline()
        assert (quantized_weight_bytes(pipe.transformer) > 0) == keep
        assert pipe.text_encoder.dtype == torch.float32
        frames.append(pipe("a cat", num_inference_steps=2, height=16, width=16, num_frames=5, output_type="pt",
                           generator=torch.Generator().manual_seed(0)).frames)
    assert torch.allclose(frames[0], frames[1], atol=1e-4)


def test_errors(tiny_release, tmp_path):
    sd = load_state_dict(tiny_release("t2v") / "diffusion_pytorch_model.safetensors")
    path = fp8_file(sd, tmp_path / "dit.safetensors")
    with pytest.raises(ValueError, match="torch_dtype"):
        load_quantized_dit(path, torch_dtype=torch.int8)
    with pytest.raises(ValueError, match="device 'gpu0'"):
        load_quantized_dit(path, device="gpu0")
    bad = tmp_path / "not-a-dit.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ConversionError, match="patch_embedding"):
        load_quantized_dit(bad)
