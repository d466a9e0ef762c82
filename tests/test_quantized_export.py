"""``diffusers-wan export-dit --format ...`` read back with the reference readers' rules (issue 21, "round trip and
export"), for the Wan core, I2V, VACE, S2V and Animate layouts.  CPU, tiny models.

Every exported file is read twice: by this package's reader (``read_quantized``) and by an independent
re-implementation, written out below, of what the tool it targets does:

* ComfyUI (safetensors): ``comfy/model_detection.py`` ``unet_prefix_from_state_dict`` (a prefix counts when more
  than 5 keys carry it), the Wan branch of ``detect_unet_config`` (``head.modulation`` marks Wan; the model type
  from ``vace_patch_embedding`` / ``control_adapter.conv`` / ``casual_audio_encoder...`` / ``face_adapter...`` /
  ``img_emb.proj.0.bias``; ``dim``, ``ffn_dim``, ``in_dim``, ``out_dim``, ``num_layers`` from shapes),
  ``model_config_from_unet`` (the ``<prefix>scaled_fp8`` marker), ``comfy/utils.py`` ``convert_old_quants``
  (``scale_weight`` -> ``weight_scale`` + a ``comfy_quant`` ``{"format": "float8_e4m3fn"}`` per scaled layer; the
  format is e4m3fn whatever the marker's dtype), ``comfy/quant_ops.py`` ``TensorCoreFP8Layout`` (the weight must
  be stored in the format's dtype; value = ``q * weight_scale``) and ``comfy/ops.py`` (an fp8 weight without
  ``comfy_quant`` is cast as stored);
* Kijai's ComfyUI-WanVideoWrapper ``nodes_model_loading.py`` (the quantization detected from the first fp8
  tensor's dtype, ``_scaled`` for a root ``scaled_fp8`` key or any ``.scale_weight``; the prefix stripped when the
  first key has it) + ``custom_linear.py`` (``weight * scale_weight``), and its ``gguf/gguf.py`` (no
  ``orig_shape``: shapes from the stored arrays);
* city96 ComfyUI-GGUF ``loader.py`` ``gguf_sd_loader`` (``general.architecture`` a STRING in ``IMG_ARCH_LIST``,
  ``model.diffusion_model.`` handled, shape = the INT32 array ``comfy.gguf.orig_shape.<name>`` or the GGUF dims
  reversed, F32 / F16 viewed at that shape) and ``dequant.py`` (the types it dequantizes).

Both readings must agree exactly; against the exported model the error is the format's (relative RMS per
tensor): Q8_0 1e-2, Q5_0 / Q5_1 6e-2, Q4_0 / Q4_1 0.12, F16 1e-3, BF16 4e-3, scaled fp8 e4m3 4e-2, plain fp8
e4m3 0.3 and e5m2 0.5 (tiny N(0, 0.02)-sized weights lose bits below the fp8 normal range without a scale).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

from diffusers_wan_ext_cli import main as cli_main  # noqa: E402
from diffusers_wan_ext.conversion.dit import export_dit_state_dict, load_dit_from_original  # noqa: E402
from diffusers_wan_ext.utils.gguf_files import write_gguf  # noqa: E402
from diffusers_wan_ext.utils.single_file import EXPORT_FORMATS, read_quantized  # noqa: E402

COMFY_PREFIX = "model.diffusion_model."
#: ComfyUI-GGUF dequant.py ``dequantize_functions`` (+ F32 / F16, which the loader views directly)
CITY96_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"}
#: ComfyUI-GGUF loader.py IMG_ARCH_LIST (the Wan entry)
CITY96_ARCH = "wan"
BOUNDS = {"comfy-fp8-scaled": 4e-2, "comfy-fp8": 0.3, "comfy-fp8-e5m2": 0.5, "gguf-q8_0": 1e-2, "gguf-q5_1": 6e-2,
          "gguf-q5_0": 6e-2, "gguf-q4_1": 0.12, "gguf-q4_0": 0.12, "gguf-f16": 1e-3, "gguf-bf16": 4e-3,
          "original": 1e-6}
#: K-quants (rel. RMS of N(0, s) weights: Q6_K 0.018, Q5_K 0.036, Q4_K 0.071, Q3_K 0.15); a mix by its main type
KQUANT_BOUNDS = {"Q6_K": 2.5e-2, "Q5_K": 5e-2, "Q4_K": 0.1, "Q3_K": 0.2}
BOUNDS.update({f"gguf-{m}": KQUANT_BOUNDS[m.upper()[:4]] for m in ("q6_k", "q5_k_m", "q5_k_s", "q5_k", "q4_k_m",
                                                                    "q4_k_s", "q4_k", "q3_k_l", "q3_k_m", "q3_k_s",
                                                                    "q3_k")})
#: the ComfyUI model type each tiny family must be detected as
COMFY_TYPES = {"t2v": "t2v", "i2v": "i2v", "vace": "vace", "s2v": "s2v", "animate": "animate"}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


# ------------------------------------------------------------------------------ ComfyUI's rules, re-implemented
def comfy_unet_prefix(keys) -> str:
    """model_detection.unet_prefix_from_state_dict: the candidate more than 5 keys carry, else 'model.'."""
    counts = {c: sum(k.startswith(c) for k in keys) for c in (COMFY_PREFIX, "model.model.")}
    top = max(counts, key=counts.get)
    return top if counts[top] > 5 else "model."


def comfy_wan_config(sd: dict[str, torch.Tensor]) -> dict:
    """The Wan branch of model_detection.detect_unet_config (on prefix-stripped keys)."""
    assert "head.modulation" in sd, "ComfyUI would not recognise a Wan DiT (no head.modulation)"
    if "vace_patch_embedding.weight" in sd:
        model_type = "vace"
    elif "control_adapter.conv.weight" in sd:
        model_type = "camera" if "img_emb.proj.0.bias" in sd else "camera_2.2"
    elif "casual_audio_encoder.encoder.final_linear.weight" in sd:
        model_type = "s2v"
    elif "audio_proj.audio_proj_glob_1.layer.bias" in sd:
        model_type = "humo"
    elif "face_adapter.fuser_blocks.0.k_norm.weight" in sd:
        model_type = "animate"
    else:
        model_type = "i2v" if "img_emb.proj.0.bias" in sd else "t2v"
    layers = 0
    while any(k.startswith(f"blocks.{layers}.") for k in sd):
        layers += 1
    return {"model_type": model_type, "dim": sd["head.modulation"].shape[-1],
            "out_dim": sd["head.head.weight"].shape[0] // 4, "ffn_dim": sd["blocks.0.ffn.0.weight"].shape[0],
            "in_dim": sd["patch_embedding.weight"].shape[1], "num_layers": layers}


def comfy_convert_old_quants(sd: dict, prefix: str, metadata: dict) -> dict:
    """comfy/utils.py convert_old_quants: the older scaled-fp8 layout -> weight_scale + comfy_quant per layer."""
    layers = None
    if "_quantization_metadata" in metadata:
        layers = json.loads(metadata["_quantization_metadata"])["layers"]
    elif f"{prefix}scaled_fp8" in sd:
        out, layers = {}, {}
        for k, w in sd.items():
            if k == f"{prefix}scaled_fp8":
                continue
            if k.endswith(".scale_weight"):
                layers[k[: -len(".scale_weight")]] = {"format": "float8_e4m3fn"}  # whatever the marker's dtype
                k = k[: -len(".scale_weight")] + ".weight_scale"
            elif k.endswith(".scale_input"):
                if float(w) == 1.0:
                    continue
                k = k[: -len(".scale_input")] + ".input_scale"
            out[k] = w
        sd = out
    for layer, conf in (layers or {}).items():
        sd[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    return sd


def comfy_read(path) -> tuple[dict[str, torch.Tensor], dict]:
    """What ComfyUI's diffusion-model loader computes with: prefix stripped, quantized layers dequantized."""
    sd = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    prefix = comfy_unet_prefix(sd)
    stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = stripped or sd
    sd = comfy_convert_old_quants(sd, "", metadata)
    formats = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}  # quant_ops QUANT_ALGOS
    out = {}
    for k, v in sd.items():
        if k.endswith((".comfy_quant", ".weight_scale", ".input_scale")):
            continue
        layer = k[: -len(".weight")] if k.endswith(".weight") else None
        conf = sd.get(f"{layer}.comfy_quant")
        if conf is not None:
            fmt = json.loads(bytes(conf.tolist()).decode())["format"]
            assert v.dtype == formats[fmt], f"{k}: stored {v.dtype}, ComfyUI's layout for {fmt} needs {formats[fmt]}"
            out[k] = v.float() * sd[f"{layer}.weight_scale"].float()
        else:  # ops.py casts an unquantized (plain fp8 too) weight as it is
            out[k] = v.float()
    return out, comfy_wan_config(out)


# ------------------------------------------------------------------------- city96's ComfyUI-GGUF rules, re-implemented
def city96_read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """loader.py gguf_sd_loader + dequant.py: dequantized tensors and their stored types (prefix stripped)."""
    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("general.architecture")
    assert field.types == [gguf.GGUFValueType.STRING], field.types
    assert bytes(field.parts[field.data[-1]]).decode() == CITY96_ARCH
    names = [t.name for t in reader.tensors]
    has_prefix = any(n.startswith(COMFY_PREFIX) for n in names)
    out, types = {}, {}
    for t in reader.tensors:
        if has_prefix and not t.name.startswith(COMFY_PREFIX):
            continue
        key = t.name[len(COMFY_PREFIX):] if has_prefix else t.name
        shape_field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        if shape_field is not None:
            assert shape_field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32], shape_field.types
            shape = tuple(int(shape_field.parts[i][0]) for i in shape_field.data)
        else:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        assert t.tensor_type.name in CITY96_TYPES, f"{t.name}: ComfyUI-GGUF cannot dequantize {t.tensor_type.name}"
        out[key] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float().reshape(shape)
        types[key] = t.tensor_type.name
    return out, types


# --------------------------------------------------------------------- Kijai's WanVideoWrapper rules, re-implemented
def kijai_read(path) -> tuple[dict[str, torch.Tensor], str]:
    """nodes_model_loading.py (WanVideoModelLoader) + custom_linear.py: the quantization it detects (from the first
    fp8 tensor's dtype; '_scaled' with a root 'scaled_fp8' key or any '.scale_weight'), the prefix stripped when the
    first key carries it, and the weights it computes with (``weight * scale_weight``)."""
    sd = load_file(str(path))
    quantization = "disabled"
    for v in sd.values():
        if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            quantization = "fp8_e4m3fn" if v.dtype == torch.float8_e4m3fn else "fp8_e5m2"
            break
    scaled = "scaled_fp8" in sd or any(k.endswith(".scale_weight") for k in sd)
    if "fp8" in quantization and scaled:
        quantization += "_scaled"
    if next(iter(sd)).startswith(COMFY_PREFIX):
        sd = {k[len(COMFY_PREFIX):]: v for k, v in sd.items()}
    assert "patch_embedding.weight" in sd and "blocks.0.self_attn.k.weight" in sd  # what the loader reads dims from
    out = {}
    for k, v in sd.items():
        if k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8":
            continue
        scale = sd.get(k[: -len("weight")] + "scale_weight") if k.endswith(".weight") else None
        out[k] = v.float() * (scale.float() if scale is not None else 1.0)
    return out, quantization


def kijai_gguf_shapes(path) -> dict[str, tuple[int, ...]]:
    """gguf/gguf.py load_gguf: no orig_shape; F32 / F16 at the reader's array shape, other types as Diffusers-style
    GGUFParameters whose logical shape comes from the byte shape of the rows."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(t.data.shape)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            shape = (*shape[:-1], shape[-1] // size * block)
        out[t.name] = shape
    return out


# -------------------------------------------------------------------------------------------------------- tests
def ours(path) -> dict[str, torch.Tensor]:
    """This package's reader, dequantized to float32, the ComfyUI prefix stripped."""
    tensors, info = read_quantized(path)
    return {k[len(info.prefix):]: q.dequantize(torch.float32) for k, q in tensors.items()}


@pytest.fixture(scope="module")
def exported(tiny_release, tmp_path_factory):
    """Factory: (source original-layout state dict, source model, path) of ``export-dit --format fmt`` of a family."""
    cache = {}

    def make(arch: str, fmt: str):
        if arch not in cache:
            release = tiny_release(arch)
            cfg = json.loads((release / "config.json").read_text())
            model = load_dit_from_original(release, torch_dtype=torch.float32)
            folder = tmp_path_factory.mktemp(f"export-{arch}")
            model.save_pretrained(folder / "transformer")
            cache[arch] = (export_dit_state_dict(model.state_dict()), model, folder, cfg)
        sd, model, folder, cfg = cache[arch]
        dst = folder / f"{fmt}.{'gguf' if fmt.startswith('gguf') else 'safetensors'}"
        prefix = [] if fmt.startswith("gguf") else ["--prefix", COMFY_PREFIX]
        assert cli_main(["export-dit", str(folder / "transformer"), str(dst), "--format", fmt, *prefix]) == 0
        return sd, model, dst, cfg

    return make


CASES = [(arch, fmt) for fmt in EXPORT_FORMATS for arch in ("t2v", "vace")] + [
    (arch, fmt) for arch in ("i2v", "s2v", "animate") for fmt in ("comfy-fp8-scaled", "gguf-q8_0")]


@pytest.mark.parametrize("arch,fmt", CASES)
def test_export_reads_back_by_the_reference_rules(exported, arch, fmt):
    sd, model, dst, cfg = exported(arch, fmt)
    if fmt.startswith("gguf"):
        ref, types = city96_read(dst)
        assert types["patch_embedding.weight"] == "F32" and ref["patch_embedding.weight"].ndim == 5  # fix_5d rule
        assert all(types[k] == "F32" for k in ref if k.endswith(".modulation") or ref[k].ndim == 1)
        quantized = {t for t in types.values() if t not in ("F32", "F16")}
        assert quantized <= {fmt.split("-")[1].upper()}, quantized
        comfy_type = comfy_wan_config(ref)
        assert kijai_gguf_shapes(dst) == {k: tuple(v.shape) for k, v in ref.items()}  # no orig_shape needed
    else:
        ref, comfy_type = comfy_read(dst)
        with safe_open(str(dst), "pt") as f:
            keys = set(f.keys())
            fp8 = {k for k in keys if str(f.get_slice(k).get_dtype()).startswith("F8")}
        assert (f"{COMFY_PREFIX}scaled_fp8" in keys) == (fmt == "comfy-fp8-scaled")
        if fmt == "comfy-fp8-scaled":  # every fp8 weight has a scale, so every one gets ComfyUI's comfy_quant
            assert fp8 and all(k[: -len("weight")] + "scale_weight" in keys for k in fp8 if k.endswith(".weight"))
        elif fmt.startswith("comfy-fp8"):
            assert fp8 and not any(k.endswith(("scale_weight", "weight_scale")) for k in keys)
        kijai, quantization = kijai_read(dst)
        assert quantization == {"comfy-fp8-scaled": "fp8_e4m3fn_scaled", "comfy-fp8": "fp8_e4m3fn",
                                "comfy-fp8-e5m2": "fp8_e5m2", "original": "disabled"}[fmt]
        assert set(kijai) == set(ref) and all(torch.equal(kijai[k], ref[k]) for k in ref)
    assert comfy_type["model_type"] == COMFY_TYPES[arch] and comfy_type["num_layers"] == model.config.num_layers
    assert comfy_type["dim"] == 48 and comfy_type["in_dim"] == sd["patch_embedding.weight"].shape[1]
    mine = ours(dst)
    assert set(mine) == set(ref) == set(sd)
    for k in ref:  # the two readings agree exactly
        assert torch.equal(mine[k], ref[k]), (arch, fmt, k)
    worst = max((rel_rms(ref[k], sd[k]), k) for k in sd if sd[k].numel() > 1)
    assert worst[0] < BOUNDS[fmt], (arch, fmt, worst)
    back = load_dit_from_original(dst, original_config=cfg if arch == "s2v" else None, torch_dtype=torch.float32)
    assert type(back) is type(model)


def test_city96_orig_shape_metadata_is_int32(tiny_release, tmp_path):
    """The shape_fix path (rows of 256 + comfy.gguf.orig_shape, what tools/convert.py writes for some
    architectures): the loader insists on an INT32 array; the 5-D tensor flattened this way comes back at full
    shape."""
    release = tiny_release("t2v")
    sd = export_dit_state_dict(load_dit_from_original(release, torch_dtype=torch.float32).state_dict())
    sd["vace_like.weight"] = torch.randn(48, 96, 1, 2, 2) * 0.02  # a 5-D tensor of 256-divisible size
    write_gguf(tmp_path / "fixed.gguf", sd, "Q8_0", shape_fix=True)
    ref, types = city96_read(tmp_path / "fixed.gguf")
    assert types["vace_like.weight"] == "Q8_0" and ref["vace_like.weight"].shape == (48, 96, 1, 2, 2)
    assert rel_rms(ref["vace_like.weight"], sd["vace_like.weight"]) < BOUNDS["gguf-q8_0"]
    mine = ours(tmp_path / "fixed.gguf")
    assert all(torch.equal(mine[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------------- K-quant GGUF files
@pytest.fixture(scope="module")
def wide_dit(tmp_path_factory):
    """A one-layer Wan DiT whose linear rows are 256 wide (K-quants need rows of QK_K = 256), as a Diffusers
    folder, and its original-layout state dict."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=256, num_layers=1,
                                  rope_max_seq_len=32).eval()
    folder = tmp_path_factory.mktemp("wide") / "transformer"
    model.save_pretrained(folder)
    return model, folder, export_dit_state_dict(model.state_dict())


#: (format, main type, type of the attention .v.weight s in file order, type of .ffn.2.weight): city96's lcpp.patch
#: rules; the two mixes hold all four K types (tests/test_gguf_kquants.py checks every mix's rules)
KQUANT_CASES = [("gguf-q4_k_m", "Q4_K", ["Q6_K"] * 2, "Q6_K"), ("gguf-q3_k_m", "Q3_K", ["Q5_K"] * 2, "Q4_K")]


@pytest.mark.parametrize("fmt,main,v_types,ffn_down", KQUANT_CASES)
def test_kquant_export_round_trip(wide_dit, tmp_path, fmt, main, v_types, ffn_down):
    """export-dit --format gguf-<K-quant> -> city96's reading and ours agree exactly, each tensor within its type's
    error, the types as city96's patched llama-quantize picks them, and the model loaded back from the file runs
    within the main type's bound of the source model."""
    model, folder, sd = wide_dit
    dst = tmp_path / f"wide-{fmt}.gguf"
    assert cli_main(["export-dit", str(folder), str(dst), "--format", fmt]) == 0
    ref, types = city96_read(dst)
    mine = ours(dst)
    assert set(mine) == set(ref) == set(sd) and all(torch.equal(mine[k], ref[k]) for k in ref)
    assert types["patch_embedding.weight"] == "F32" and ref["patch_embedding.weight"].ndim == 5
    assert [types[k] for k in sd if k.endswith(".v.weight")] == v_types
    assert {types[k] for k in sd if k.endswith(".ffn.2.weight")} == {ffn_down}
    assert {types[k] for k in sd if k.endswith((".q.weight", ".k.weight", ".o.weight", ".ffn.0.weight"))} == {main}
    assert all(types[k] == "F16" for k in sd if k.startswith(("text_embedding.", "time_embedding.", "head.head"))
               and sd[k].ndim == 2)  # the tensors lcpp.patch never quantizes
    for k in sd:
        bound = KQUANT_BOUNDS.get(types[k], 1e-3 if types[k] == "F16" else 1e-6)
        assert rel_rms(ref[k], sd[k]) < bound, (fmt, k, types[k], rel_rms(ref[k], sd[k]))
    back = load_dit_from_original(dst, torch_dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=gen), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=gen), return_dict=False)
    with torch.no_grad():
        want, got = model(**inputs)[0], back(**inputs)[0]
    assert rel_rms(got, want) < BOUNDS[fmt], (fmt, rel_rms(got, want))
