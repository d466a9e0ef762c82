"""ComfyUI / Kijai / GGUF single-file checkpoints (issue 21): real files written with the ``gguf`` writer and with
safetensors in each fp8 convention, read back through ``load_state_dict`` / ``load_dit_from_original`` /
``load_t5_from_original`` / ``diffusers-wan convert`` and ``export-dit --format``.  Everything tiny, on CPU.

Expected error per type (relative RMS of the dequantized weight against the original, random N(0, 0.02) rows of
256; the bound is about twice the measured value): Q8_0 1e-2, Q5_0 / Q5_1 6e-2, Q4_0 / Q4_1 0.12, MXFP4 0.2,
F16 1e-3, BF16 4e-3; fp8 e4m3 (scaled or not) 4e-2, fp8 e5m2 8e-2.  K-quants (Q2_K .. Q6_K) and other types the
``gguf`` package can dequantize but not quantize are written as pre-quantized blocks and must match
``gguf.quants.dequantize`` exactly (the reference reader's rule).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import UMT5EncoderModel

gguf = pytest.importorskip("gguf")

from diffusers_wan_ext_cli import main as cli_main  # noqa: E402
from diffusers_wan_ext.conversion.dit import load_dit_from_original  # noqa: E402
from diffusers_wan_ext.conversion.quantized_dit import load_quantized_dit  # noqa: E402
from diffusers_wan_ext.conversion.text_encoder import (  # noqa: E402
    GGUF_T5_NAMES, convert_t5_state_dict, load_t5_from_original)
from diffusers_wan_ext.conversion.vae import load_vae_from_original  # noqa: E402
from diffusers_wan_ext.utils.fp8_files import fp8_state_dict  # noqa: E402
from diffusers_wan_ext.utils.gguf_files import write_gguf  # noqa: E402
from diffusers_wan_ext.utils.io import ConversionError, load_state_dict  # noqa: E402
from diffusers_wan_ext.utils.single_file import EXPORT_FORMATS, read_quantized  # noqa: E402
from diffusers_wan_ext_cli.parser import EXPORT_FORMATS as PARSER_EXPORT_FORMATS  # noqa: E402

QUANT_BOUNDS = {"Q8_0": 1e-2, "Q5_0": 6e-2, "Q5_1": 6e-2, "Q4_0": 0.12, "Q4_1": 0.12, "MXFP4": 0.2, "F16": 1e-3,
                "BF16": 4e-3}
FP8_BOUNDS = {torch.float8_e4m3fn: 4e-2, torch.float8_e5m2: 8e-2}
PRE_QUANTIZED = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FAMILY_ARCHS = ("t2v", "fun-control", "vace", "s2v", "animate")


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw blocks of ``qtype`` with finite fp16 scales (every odd byte's exponent bits set to 2^-7)."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = np.random.default_rng(seed).integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
    raw[:, 1::2] = (raw[:, 1::2] & 0x83) | 0x20
    return raw


def write_raw_gguf(path, tensors: dict[str, tuple[np.ndarray, str]], orig_shapes: dict | None = None) -> None:
    w = gguf.GGUFWriter(str(path), "wan")
    for key, shape in (orig_shapes or {}).items():
        w.add_array(f"comfy.gguf.orig_shape.{key}", list(shape))
    for key, (data, qtype) in tensors.items():
        w.add_tensor(key, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference_gguf(path) -> dict[str, torch.Tensor]:
    """ComfyUI-GGUF loader.py's rules with the gguf package alone: shape = orig_shape metadata or dims reversed."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        if field is not None:
            assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
            shape = tuple(int(field.parts[i][0]) for i in field.data)
        else:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(values)).float().reshape(shape)
    return out


def reference_fp8(path) -> dict[str, torch.Tensor]:
    """ComfyUI convert_old_quants / quant_ops rules, written out: fp8 * (scale_weight | weight_scale)."""
    sd = load_file(str(path))
    out = {}
    for k, v in sd.items():
        layer, _, suffix = k.rpartition(".")
        if suffix in ("scale_weight", "weight_scale", "scale_input", "input_scale", "scaled_fp8", "comfy_quant") \
                or k == "scaled_fp8":
            continue
        scale = sd.get(f"{layer}.scale_weight", sd.get(f"{layer}.weight_scale")) if suffix == "weight" else None
        out[k] = v.float() * (scale.float() if scale is not None else 1.0)
    return out


# --------------------------------------------------------------------------------------------- per quant type
def test_gguf_quant_types_within_expected_error(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    tensors = {t: (gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[t]), t) for t in QUANT_BOUNDS}
    tensors.update({t: (random_blocks(t, 8, 512), t) for t in PRE_QUANTIZED})
    write_raw_gguf(tmp_path / "types.gguf", tensors)
    q, info = read_quantized(tmp_path / "types.gguf")
    ref = reference_gguf(tmp_path / "types.gguf")
    assert info.format == "gguf" and set(q) == set(tensors)
    for t, bound in QUANT_BOUNDS.items():
        assert q[t].qtype == t and q[t].shape == (64, 256)
        d = q[t].dequantize(torch.float32)
        assert torch.equal(d, ref[t]), t
        assert rel_rms(d, w) < bound, (t, rel_rms(d, w))
    for t in PRE_QUANTIZED:
        d = q[t].dequantize(torch.float32)
        assert q[t].shape == (8, 512) and torch.isfinite(d).all() and torch.equal(d, ref[t]), t
    sd = load_state_dict(tmp_path / "types.gguf")  # the converters' reader: quantized -> float16
    assert sd["Q8_0"].dtype == torch.float16 and sd["F16"].dtype == torch.float16 and sd["BF16"].dtype == torch.bfloat16
    assert torch.allclose(sd["Q4_K"].float(), ref["Q4_K"], rtol=1e-3, atol=1e-6)


def test_gguf_five_dim_tensors(tmp_path):
    """A 5-D tensor stored F32 at full shape (ComfyUI-GGUF tools/fix_5d_tensors.py) and one flattened to rows of 256
    and quantized with its shape in comfy.gguf.orig_shape (tools/convert.py shape_fix)."""
    torch.manual_seed(1)
    a = torch.randn(48, 16, 1, 2, 2) * 0.02
    b = torch.randn(48, 96, 1, 2, 2) * 0.02
    qb = gguf.quants.quantize(b.reshape(-1, 256).numpy(), gguf.GGMLQuantizationType.Q8_0)
    write_raw_gguf(tmp_path / "5d.gguf", {"patch_embedding.weight": (a.numpy(), "F32"),
                                          "vace_patch_embedding.weight": (qb, "Q8_0")},
                   orig_shapes={"vace_patch_embedding.weight": b.shape})
    sd = load_state_dict(tmp_path / "5d.gguf")
    assert torch.equal(sd["patch_embedding.weight"], a)
    assert sd["vace_patch_embedding.weight"].shape == b.shape
    assert rel_rms(sd["vace_patch_embedding.weight"], b) < QUANT_BOUNDS["Q8_0"]


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("convention", ["scale_weight", "weight_scale", "plain"])
def test_fp8_conventions_within_expected_error(tmp_path, fp8_dtype, convention):
    torch.manual_seed(2)
    sd = {"model.diffusion_model.blocks.0.ffn.0.weight": torch.randn(96, 48) * 0.02,
          "model.diffusion_model.blocks.0.ffn.0.bias": torch.randn(96) * 0.01}
    out, meta = fp8_state_dict(sd, scaled=convention != "plain", prefix="model.diffusion_model.",
                               convention="scale_weight" if convention == "plain" else convention, fp8_dtype=fp8_dtype)
    save_file(out, str(tmp_path / "f.safetensors"), metadata=meta or None)
    q, info = read_quantized(tmp_path / "f.safetensors")
    key = "model.diffusion_model.blocks.0.ffn.0.weight"
    assert q[key].qtype == str(fp8_dtype).replace("torch.", "") and info.prefix == "model.diffusion_model."
    assert info.scaled == (convention != "plain") and (info.convention == convention or convention == "plain")
    if convention == "weight_scale":
        assert "_quantization_metadata" in info.metadata
    loaded = load_state_dict(tmp_path / "f.safetensors")
    assert set(loaded) == set(sd)
    assert torch.allclose(loaded[key].float(), reference_fp8(tmp_path / "f.safetensors")[key], rtol=1e-3, atol=1e-7)
    bound = FP8_BOUNDS[fp8_dtype] * (1 if convention != "plain" else 3)  # unscaled: 0.02-sized values lose bits
    assert rel_rms(loaded[key], sd[key]) < bound


# ------------------------------------------------------------------------------------------- whole DiTs per family
def write_formats(sd: dict[str, torch.Tensor], folder) -> dict[str, object]:
    """The DiT in every layout a user meets; returns {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    paths["gguf-q8_0"] = folder / "dit-Q8_0.gguf"
    write_gguf(paths["gguf-q8_0"], sd, "Q8_0", shape_fix=True)
    paths["gguf-q4_0"] = folder / "dit-Q4_0.gguf"
    write_gguf(paths["gguf-q4_0"], sd, "Q4_0")
    for name, prefix, kw in (
        ("fp8-scaled-old", "model.diffusion_model.", dict(convention="scale_weight")),
        ("fp8-scaled-new", "diffusion_model.", dict(convention="weight_scale")),
        ("fp8-e5m2", "", dict(scaled=False, fp8_dtype=torch.float8_e5m2)),
    ):
        out, meta = fp8_state_dict({prefix + k: v for k, v in sd.items()}, prefix=prefix, **kw)
        paths[name] = folder / f"dit-{name}.safetensors"
        save_file({k: v.contiguous() for k, v in out.items()}, str(paths[name]), metadata=meta or None)
    paths["fp16"] = folder / "dit-fp16.safetensors"
    save_file({"model.diffusion_model." + k: v.half().contiguous() for k, v in sd.items()}, str(paths["fp16"]))
    return paths


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_family_dits_load_from_single_files(tiny_release, tmp_path, arch):
    release = tiny_release(arch)
    sd = load_state_dict(release / "diffusion_pytorch_model.safetensors")
    reference_model = load_dit_from_original(release, torch_dtype=torch.float32)
    ref = reference_model.state_dict()
    # no config.json beside the single files: the family comes from the keys.  Only the tiny S2V needs its config
    # (2 blocks: audio_inject_layers differ from the 40-block release default a real S2V file gets)
    cfg = json.loads((release / "config.json").read_text()) if arch == "s2v" else None
    for name, path in write_formats(sd, tmp_path).items():
        model = load_dit_from_original(path, original_config=cfg, torch_dtype=torch.float32)
        assert type(model) is type(reference_model), (arch, name)
        deq = reference_gguf(path) if name.startswith("gguf") else reference_fp8(path)
        expect = load_dit_from_original({k: v.float() for k, v in deq.items()}, cfg, torch.float32).state_dict()
        got = model.state_dict()
        assert set(got) == set(ref)
        for k in got:  # the reader = the reference rules (up to the float16 of dequantized tensors)
            assert torch.allclose(got[k], expect[k], rtol=2e-3, atol=1e-6), (arch, name, k)
        worst = max(rel_rms(got[k], ref[k]) for k in got if ref[k].numel() > 1)
        assert worst < {"gguf-q4_0": 0.12, "fp8-e5m2": 0.25}.get(name, 6e-2), (arch, name, worst)


def llama_quantize_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape llama.cpp's ``llama-quantize`` writes (city96's GGUF workflow): the trailing GGML dims of size 1
    dropped (``ggml_n_dims``: the leading PyTorch 1s), except the ``.modulation`` / ``img_emb.emb_pos`` tensors its
    Wan patch (``tools/lcpp.patch``) sets back to 3 dims."""
    ne = list(reversed(shape))
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    if (".modulation" in key or key == "img_emb.emb_pos") and len(ne) >= 3:
        n = max(n, 3)
    return tuple(reversed(ne[:n]))


@pytest.mark.parametrize("arch", ["s2v", "animate"])
def test_gguf_with_unit_dims_dropped_by_llama_quantize(tiny_release, tmp_path, arch):
    """S2V's ``casual_audio_encoder.weights`` [1, L, 1, 1] / ``padding_tokens`` [1, 1, 1, dim] and Animate's
    ``padding_tokens`` / motion-encoder biases [1, C, 1, 1] come back from llama-quantize without their leading 1s;
    both loaders put them back (the 5-D tensors added F32 at full shape as fix_5d_tensors.py does)."""
    release = tiny_release(arch)
    sd = load_state_dict(release / "diffusion_pytorch_model.safetensors")
    cfg = json.loads((release / "config.json").read_text())
    tensors, dropped = {}, []
    for k, v in sd.items():
        shape = tuple(v.shape) if v.ndim > 4 else llama_quantize_shape(k, tuple(v.shape))
        dropped += [k] if shape != tuple(v.shape) else []
        arr = v.float().numpy().reshape(shape)
        quantize = arr.ndim == 2 and arr.shape[-1] % 32 == 0 and arr.size > 1024 and k.endswith("weight")
        tensors[k] = (gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), "Q8_0") if quantize else (arr, "F32")
    assert any("padding_tokens" in k for k in dropped), dropped
    write_raw_gguf(tmp_path / "dit-Q8_0.gguf", tensors)
    deq = {k: v.reshape(sd[k].shape) for k, v in reference_gguf(tmp_path / "dit-Q8_0.gguf").items()}
    expect = load_dit_from_original(deq, cfg, torch.float32).state_dict()
    got = load_dit_from_original(tmp_path / "dit-Q8_0.gguf", cfg, torch.float32).state_dict()
    assert set(got) == set(expect)
    for k in got:
        assert torch.allclose(got[k], expect[k], rtol=2e-3, atol=1e-6), k
    kept = load_quantized_dit(tmp_path / "dit-Q8_0.gguf", cfg, torch.float32)
    assert any(hasattr(p, "quant_type") for p in kept.parameters())
    for k, v in kept.state_dict().items():
        if not hasattr(v, "quant_type"):
            assert torch.allclose(v.float(), expect[k], rtol=2e-3, atol=1e-6), k


def test_core_dit_output_matches_dequantized_reference(tiny_release, tmp_path):
    release = tiny_release("t2v")
    sd = load_state_dict(release / "diffusion_pytorch_model.safetensors")
    original = load_dit_from_original(release, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 7, 32, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        want = original(x, t, ctx, return_dict=False)[0]
        for name, path in write_formats(sd, tmp_path).items():
            model = load_dit_from_original(path, torch_dtype=torch.float32)
            deq = reference_gguf(path) if name.startswith("gguf") else reference_fp8(path)
            ref_model = load_dit_from_original({k: v.float() for k, v in deq.items()}, torch_dtype=torch.float32)
            got, ref = model(x, t, ctx, return_dict=False)[0], ref_model(x, t, ctx, return_dict=False)[0]
            assert rel_rms(got, ref) < 5e-3, name  # float16 dequantization only
            bound = {"gguf-q4_0": 0.15, "fp8-e5m2": 0.3, "fp16": 1e-3}.get(name, 6e-2)
            assert rel_rms(got, want) < bound, (name, rel_rms(got, want))


# -------------------------------------------------------------------------------------------- umT5 and VAE files
def test_comfy_umt5_files(tiny_release, tmp_path):
    release = tiny_release("t2v")
    original_sd = load_state_dict(release / "models_t5_umt5-xxl-enc-bf16.pth")
    original = load_t5_from_original(original_sd)
    hf = convert_t5_state_dict(original_sd)  # Comfy's umt5_xxl_*.safetensors use these (transformers) names
    hf = {k: v for k, v in hf.items() if k != "encoder.embed_tokens.weight"}
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(ids).last_hidden_state
    save_file({k: v.half().contiguous() for k, v in hf.items()}, str(tmp_path / "umt5_xxl_fp16.safetensors"))
    blocks = {k.replace("encoder.block.", "encoder.blocks."): v for k, v in hf.items()}  # fp8 on the linear weights
    out, meta = fp8_state_dict(blocks)
    out = {k.replace("encoder.blocks.", "encoder.block."): v for k, v in out.items()}
    out["spiece_model"] = torch.zeros(5, dtype=torch.uint8)
    save_file(out, str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    new, meta = fp8_state_dict(blocks, convention="weight_scale")  # the newer convention (comfy quant metadata)
    new = {k.replace("encoder.blocks.", "encoder.block."): v for k, v in new.items()}
    meta = {"_quantization_metadata": meta["_quantization_metadata"].replace("encoder.blocks.", "encoder.block.")}
    save_file(new, str(tmp_path / "umt5_xxl_fp8_weight_scale.safetensors"), metadata=meta)
    gg = {}
    for k, v in hf.items():  # llama.cpp names, as a umT5 GGUF stores them
        for old, new in reversed(GGUF_T5_NAMES):
            k = k.replace(new, old)
        gg[k] = v
    write_gguf(tmp_path / "umt5-Q8_0.gguf", gg, "Q8_0", arch="t5encoder")
    q, _ = read_quantized(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    assert q["encoder.block.0.layer.0.SelfAttention.q.weight"].scale is not None
    q, info = read_quantized(tmp_path / "umt5_xxl_fp8_weight_scale.safetensors")
    assert info.convention == "weight_scale" and q["encoder.block.1.layer.1.DenseReluDense.wo.weight"].scale is not None
    for name, bound in (("umt5_xxl_fp16.safetensors", 2e-3), ("umt5_xxl_fp8_e4m3fn_scaled.safetensors", 0.1),
                        ("umt5_xxl_fp8_weight_scale.safetensors", 0.1), ("umt5-Q8_0.gguf", 3e-2)):
        with torch.no_grad():
            got = load_t5_from_original(tmp_path / name)(ids).last_hidden_state
        assert rel_rms(got, want) < bound, (name, rel_rms(got, want))


def test_comfy_vae_file_has_the_original_keys(tiny_release, tmp_path):
    release = tiny_release("t2v")
    sd = load_state_dict(release / "Wan2.1_VAE.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "wan_2.1_vae.safetensors"))
    a = load_vae_from_original(sd).state_dict()
    b = load_vae_from_original(tmp_path / "wan_2.1_vae.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_convert_mixes_single_files_with_original_files(tiny_release, tmp_path):
    release = tiny_release("t2v")
    sd = load_state_dict(release / "diffusion_pytorch_model.safetensors")
    write_gguf(tmp_path / "wan-t2v-Q8_0.gguf", sd, "Q8_0", shape_fix=True)
    vae = load_state_dict(release / "Wan2.1_VAE.pth")
    save_file({k: v.contiguous() for k, v in vae.items()}, str(tmp_path / "wan_2.1_vae.safetensors"))
    t5 = load_state_dict(release / "models_t5_umt5-xxl-enc-bf16.pth")  # ComfyUI's umt5_xxl_fp8_e4m3fn_scaled
    hf = {k.replace("encoder.block.", "encoder.blocks."): v for k, v in convert_t5_state_dict(t5).items()
          if k != "encoder.embed_tokens.weight"}
    out, _ = fp8_state_dict(hf)
    save_file({k.replace("encoder.blocks.", "encoder.block."): v for k, v in out.items()},
              str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    rc = cli_main(["convert", str(release), str(tmp_path / "out"), "--dtype", "fp32",
                   "--transformer", str(tmp_path / "wan-t2v-Q8_0.gguf"),
                   "--text-encoder", str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
                   "--vae", str(tmp_path / "wan_2.1_vae.safetensors")])
    assert rc == 0
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_t5_from_original(t5)(ids).last_hidden_state
        got = UMT5EncoderModel.from_pretrained(tmp_path / "out" / "text_encoder")(ids).last_hidden_state
    assert rel_rms(got, want) < 0.1  # scaled fp8 e4m3 weights (bound as in test_comfy_umt5_files)
    tr = WanTransformer3DModel.from_pretrained(tmp_path / "out" / "transformer")
    ref = load_dit_from_original(release, torch_dtype=torch.float32).state_dict()
    got = tr.state_dict()
    assert max(rel_rms(got[k], ref[k]) for k in ref if ref[k].numel() > 1) < QUANT_BOUNDS["Q8_0"] * 2
    folder = tmp_path / "comfy-folder"  # a folder holding one GGUF DiT is found without --transformer
    folder.mkdir()
    (folder / "wan-t2v-Q8_0.gguf").symlink_to(tmp_path / "wan-t2v-Q8_0.gguf")
    assert cli_main(["convert", str(folder), str(tmp_path / "out2"), "--transformer-only", "--dtype", "fp32"]) == 0
    tr2 = WanTransformer3DModel.from_pretrained(tmp_path / "out2")  # --transformer-only: the model folder itself
    assert all(torch.equal(tr2.state_dict()[k], got[k]) for k in got)


# ------------------------------------------------------------------------------------------------------- export
def test_export_dit_formats_read_back_with_the_reference_rules(tiny_release, tmp_path, capsys):
    release = tiny_release("vace")
    model = load_dit_from_original(release, torch_dtype=torch.float32)
    model.save_pretrained(tmp_path / "transformer")
    ref = model.state_dict()
    assert EXPORT_FORMATS == PARSER_EXPORT_FORMATS
    for fmt in EXPORT_FORMATS:
        dst = tmp_path / f"out-{fmt}.{'gguf' if fmt.startswith('gguf') else 'safetensors'}"
        prefix = [] if fmt.startswith("gguf") else ["--prefix", "model.diffusion_model."]
        assert cli_main(["export-dit", str(tmp_path / "transformer"), str(dst), "--format", fmt, *prefix]) == 0
        if fmt.startswith("gguf"):
            reader = gguf.GGUFReader(str(dst))
            arch = reader.get_field("general.architecture")
            assert bytes(arch.parts[arch.data[-1]]).decode() == "wan"  # ComfyUI-GGUF IMG_ARCH_LIST
            deq = reference_gguf(dst)
            assert deq["patch_embedding.weight"].ndim == 5
        else:
            deq = reference_fp8(dst)
            with safe_open(str(dst), "pt") as f:
                keys = set(f.keys())
            assert ("model.diffusion_model.scaled_fp8" in keys) == (fmt == "comfy-fp8-scaled")
        back = load_dit_from_original({k: v.float() for k, v in deq.items()}, torch_dtype=torch.float32).state_dict()
        bound = {"gguf-q4_0": 0.12, "gguf-q4_1": 0.12, "gguf-q5_0": 6e-2, "gguf-q5_1": 6e-2, "comfy-fp8": 0.3,
                 "comfy-fp8-e5m2": 0.5}.get(fmt, 4e-2)
        worst = max(rel_rms(back[k], ref[k]) for k in ref if ref[k].numel() > 1)
        assert worst < bound, (fmt, worst)
    assert cli_main(["export-dit", str(tmp_path / "transformer"), str(tmp_path / "x.safetensors"),
                     "--format", "gguf-q8_0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.safetensors" in err[0] and ".gguf" in err[0]


def test_exported_gguf_loads_in_stock_diffusers(tiny_release, tmp_path):
    """Stock Diffusers' GGUF path (from_single_file + GGUFQuantizationConfig) reads what export-dit writes."""
    from diffusers import GGUFQuantizationConfig

    model = load_dit_from_original(tiny_release("t2v"), torch_dtype=torch.float32)
    model.save_pretrained(tmp_path / "repo" / "transformer")
    assert cli_main(["export-dit", str(tmp_path / "repo" / "transformer"), str(tmp_path / "t2v-Q8_0.gguf"),
                     "--format", "gguf-q8_0"]) == 0
    stock = WanTransformer3DModel.from_single_file(
        str(tmp_path / "t2v-Q8_0.gguf"), config=str(tmp_path / "repo"), subfolder="transformer",
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        assert rel_rms(stock(x, t, ctx, return_dict=False)[0], model(x, t, ctx, return_dict=False)[0]) < 1e-2


# ---------------------------------------------------------------------------------------------------- bad files
def one_line_error(path, *words):
    with pytest.raises(ConversionError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_bad_gguf_files(tmp_path):
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    write_raw_gguf(tmp_path / "ok.gguf", {"blocks.0.ffn.0.weight": (gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), "Q8_0"),
                                          "blocks.0.ffn.2.weight": (w, "F32")})
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    one_line_error(tmp_path / "cut.gguf", "truncated", "blocks.0.ffn.2.weight")
    name = b"blocks.0.ffn.0.weight"
    at = data.index(name) + len(name)  # n_dims u32, dims u64 x n, type u32
    n_dims = struct.unpack_from("<I", data, at)[0]
    patched = bytearray(data)
    struct.pack_into("<I", patched, at + 4 + 8 * n_dims, 99)
    (tmp_path / "unknown.gguf").write_bytes(bytes(patched))
    one_line_error(tmp_path / "unknown.gguf", "blocks.0.ffn.0.weight", "unknown GGML quant type id 99")
    struct.pack_into("<I", patched, at + 4 + 8 * n_dims, int(gguf.GGMLQuantizationType.Q8_K))  # rows of 64
    (tmp_path / "rows.gguf").write_bytes(bytes(patched))
    one_line_error(tmp_path / "rows.gguf", "blocks.0.ffn.0.weight", "rows of 64 values do not fit Q8_K blocks of 256")
    q8k = np.zeros((1, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K][1]), dtype=np.uint8)
    write_raw_gguf(tmp_path / "q8k.gguf", {"blocks.0.x.weight": (q8k, "Q8_K")})
    one_line_error(tmp_path / "q8k.gguf", "blocks.0.x.weight", "Q8_K")
    (tmp_path / "text.gguf").write_bytes(b"this is not a gguf file at all" * 10)
    one_line_error(tmp_path / "text.gguf", "not a readable GGUF file")
    q = gguf.quants.quantize(np.zeros((8, 256), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    write_raw_gguf(tmp_path / "shape.gguf", {"blocks.0.ffn.0.weight": (q, "Q8_0")},
                   orig_shapes={"blocks.0.ffn.0.weight": (48, 96)})  # 4608 values recorded, 2048 stored
    one_line_error(tmp_path / "shape.gguf", "blocks.0.ffn.0.weight", "2048 values stored", "(48, 96)")
    w = gguf.GGUFWriter(str(tmp_path / "shape-str.gguf"), "wan")
    w.add_string("comfy.gguf.orig_shape.blocks.0.ffn.0.weight", "8,256")  # not an INT32 array
    w.add_tensor("blocks.0.ffn.0.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    one_line_error(tmp_path / "shape-str.gguf", "comfy.gguf.orig_shape.blocks.0.ffn.0.weight", "not an integer array")


def test_dit_key_errors_name_the_file(tiny_release, tmp_path):
    sd = load_state_dict(tiny_release("t2v") / "diffusion_pytorch_model.safetensors")
    sd["blocks.1.ffn.0.weight"] = sd["blocks.1.ffn.0.weight"][:40]
    write_gguf(tmp_path / "bad-Q8_0.gguf", sd, "Q8_0")
    for load in (load_dit_from_original, load_quantized_dit):
        with pytest.raises(ConversionError) as e:
            load(tmp_path / "bad-Q8_0.gguf", torch_dtype=torch.float32)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(tmp_path / "bad-Q8_0.gguf")) and "ffn" in msg, msg


def test_bad_fp8_files(tmp_path):
    sd = {f"model.diffusion_model.blocks.0.{n}.weight": torch.randn(32, 32) * 0.02 for n in ("ffn.0", "ffn.2")}
    old, _ = fp8_state_dict(sd, prefix="model.diffusion_model.")
    del old["model.diffusion_model.blocks.0.ffn.2.scale_weight"]
    save_file(old, str(tmp_path / "old.safetensors"))
    one_line_error(tmp_path / "old.safetensors", "blocks.0.ffn.2.weight", "scale_weight", "missing")
    new, meta = fp8_state_dict(sd, convention="weight_scale")
    del new["model.diffusion_model.blocks.0.ffn.0.weight_scale"]
    save_file(new, str(tmp_path / "new.safetensors"), metadata=meta)
    one_line_error(tmp_path / "new.safetensors", "blocks.0.ffn.0.weight", "weight_scale", "missing")
    new, meta = fp8_state_dict(sd, convention="weight_scale")
    save_file(new, str(tmp_path / "nvfp4.safetensors"),
              metadata={"_quantization_metadata": meta["_quantization_metadata"].replace("float8_e4m3fn", "nvfp4")})
    one_line_error(tmp_path / "nvfp4.safetensors", "nvfp4", "blocks.0.ffn")
    orphan = {"blocks.0.ffn.0.weight": torch.randn(4, 4).to(torch.float8_e4m3fn),
              "blocks.0.ffn.2.scale_weight": torch.tensor(1.0), "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
              "blocks.0.ffn.0.scale_weight": torch.tensor(1.0)}
    save_file(orphan, str(tmp_path / "orphan.safetensors"))
    one_line_error(tmp_path / "orphan.safetensors", "blocks.0.ffn.2.weight")
    unscaled_table = {"shared.weight": torch.randn(16, 8).to(torch.float8_e4m3fn),  # ComfyUI scales Linear only
                      "patch_embedding.weight": torch.randn(8, 4, 1, 2, 2).to(torch.float8_e4m3fn),
                      "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    save_file(unscaled_table, str(tmp_path / "table.safetensors"))
    assert set(load_state_dict(tmp_path / "table.safetensors")) == {"shared.weight", "patch_embedding.weight"}
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "old.safetensors").read_bytes()[:-64])
    raw = (tmp_path / "old.safetensors").read_bytes()
    header = json.loads(raw[8: 8 + struct.unpack_from("<Q", raw)[0]])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    one_line_error(tmp_path / "cut.safetensors", "truncated", f"tensor {last} runs past the end")
    with pytest.raises(ValueError, match=f"tensor {last} runs past the end"):  # the raw reader names it too
        read_quantized(tmp_path / "cut.safetensors")
