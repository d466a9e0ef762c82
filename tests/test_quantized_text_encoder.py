"""The umT5 text encoder kept quantized (issue 21): ComfyUI's scaled-fp8 ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``
layout and a llama.cpp-named umT5 GGUF load as a ``UMT5EncoderModel`` whose Linear weights stay as stored
(``Fp8Linear`` / Diffusers ``GGUFLinear``), and ``convert --keep-quantized`` writes them into the pipeline folder's
``text_encoder/`` for this package's loader.  CPU, tiny models, real files.

Expected error (against the bf16 release encoder, relative RMS of the last hidden state): scaled fp8 e4m3 < 0.1,
Q8_0 < 3e-2 (the bounds of ``test_single_file_formats.test_comfy_umt5_files``); against the same file read
dequantized (float16 dequantization there, the stored values here) < 1e-2; a folder written and read back gives the
loaded model's output exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

gguf = pytest.importorskip("gguf")

from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.quantizers.gguf.utils import GGUFLinear  # noqa: E402
from transformers import UMT5EncoderModel  # noqa: E402

from diffusers_wan_ext_cli import main as cli_main  # noqa: E402
from diffusers_wan_ext.conversion.quantized_dit import QUANTIZED_FOLDER_NOTE, load_quantized_folder  # noqa: E402
from diffusers_wan_ext.conversion.quantized_pipeline import (  # noqa: E402
    load_quantized_pipeline, quantized_components)
from diffusers_wan_ext.conversion.quantized_text_encoder import (  # noqa: E402
    TEXT_ENCODER_FP8_WEIGHTS, load_quantized_t5, save_quantized_text_encoder)
from diffusers_wan_ext.conversion.text_encoder import (  # noqa: E402
    GGUF_T5_NAMES, convert_t5_state_dict, load_t5_from_original)
from diffusers_wan_ext.models.quantized_linear import Fp8Linear  # noqa: E402
from diffusers_wan_ext.utils.fp8_files import fp8_state_dict  # noqa: E402
from diffusers_wan_ext.utils.gguf_files import write_gguf  # noqa: E402
from diffusers_wan_ext.utils.io import ConversionError, load_state_dict  # noqa: E402
from diffusers_wan_ext.utils.single_file import read_quantized  # noqa: E402

BOUNDS = {"umt5_xxl_fp8_e4m3fn_scaled.safetensors": 0.1, "umt5-Q8_0.gguf": 3e-2}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt().clamp_min(1e-12))


@pytest.fixture(scope="module")
def umt5_files(tiny_release, tmp_path_factory):
    """The tiny release's umT5 as ComfyUI's scaled fp8 file (``scale_weight`` on every linear weight + the
    ``scaled_fp8`` marker, transformers names, the ``spiece_model`` blob) and as a llama.cpp-named Q8_0 GGUF."""
    root = tmp_path_factory.mktemp("umt5")
    original = load_state_dict(tiny_release("t2v") / "models_t5_umt5-xxl-enc-bf16.pth")
    hf = {k: v for k, v in convert_t5_state_dict(original).items() if k != "encoder.embed_tokens.weight"}
    blocks = {k.replace("encoder.block.", "encoder.blocks."): v for k, v in hf.items()}  # fp8_state_dict: blocks.*
    out, _ = fp8_state_dict(blocks)
    out = {k.replace("encoder.blocks.", "encoder.block."): v for k, v in out.items()}
    out["spiece_model"] = torch.zeros(5, dtype=torch.uint8)
    save_file(out, str(root / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    named = {}
    for k, v in hf.items():
        for old, new in reversed(GGUF_T5_NAMES):
            k = k.replace(new, old)
        named[k] = v
    write_gguf(root / "umt5-Q8_0.gguf", named, "Q8_0", arch="t5encoder")
    return root, original


def encode(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).last_hidden_state


IDS = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(BOUNDS))
def test_umt5_file_loads_kept_quantized(umt5_files, tmp_path, name):
    root, original = umt5_files
    model = load_quantized_t5(root / name, torch_dtype=torch.float32)
    kept = Fp8Linear if name.endswith(".safetensors") else GGUFLinear
    attn, ff = model.encoder.block[1].layer[0].SelfAttention, model.encoder.block[1].layer[1].DenseReluDense
    stored_types = {k: q.qtype for k, q in read_quantized(root / name)[0].items()}
    for leaf, layer in (("attn_q", attn.q), ("attn_k", attn.k), ("attn_v", attn.v), ("attn_o", attn.o),
                        ("ffn_gate", ff.wi_0), ("ffn_up", ff.wi_1)):
        # the GGUF writer keeps tensors of <= 1024 values (the tiny 32 x 32 projections) in F32, as city96's does
        quantized = kept is Fp8Linear or stored_types[f"enc.blk.1.{leaf}.weight"] == "Q8_0"
        assert isinstance(layer, kept) == quantized, (name, leaf, type(layer))
    assert isinstance(ff.wi_0, kept) and isinstance(ff.wi_1, kept)
    assert type(ff.wo) is torch.nn.Linear and ff.wo.weight.dtype == torch.float32  # _keep_in_fp32_modules
    if kept is Fp8Linear:  # the file's fp8 values and scale, as stored
        stored = load_file(str(root / name))
        key = "encoder.block.1.layer.0.SelfAttention.q"
        assert torch.equal(attn.q.weight.view(torch.uint8), stored[f"{key}.weight"].view(torch.uint8))
        assert torch.equal(attn.q.weight_scale, stored[f"{key}.scale_weight"].float().reshape(()))
    got = encode(model, IDS)
    assert rel_rms(got, encode(load_t5_from_original(original), IDS)) < BOUNDS[name]
    assert rel_rms(got, encode(load_t5_from_original(root / name), IDS)) < 1e-2
    note = save_quantized_text_encoder(model, tmp_path / "te", torch.float32)
    assert note["storage"] == ("fp8" if kept is Fp8Linear else "gguf") and note["library"] == "transformers"
    assert not (tmp_path / "te" / "model.safetensors").exists()
    again = load_quantized_folder(tmp_path / "te")
    assert isinstance(again.encoder.block[1].layer[1].DenseReluDense.wi_0, kept)
    assert {n for n, m in again.named_modules() if isinstance(m, kept)} == {
        n for n, m in model.named_modules() if isinstance(m, kept)}
    assert torch.equal(encode(again, IDS), got)


def test_convert_keeps_the_umt5_quantized(tiny_release, umt5_files, tmp_path):
    """A GGUF DiT and ComfyUI's scaled fp8 umT5 kept quantized in one pipeline folder; stock transformers refuses
    the text encoder folder (no model.safetensors) rather than loading fp8 values without their scales;
    load_quantized_pipeline passes both kept components in."""
    release = tiny_release("t2v")
    root, _ = umt5_files
    dit = tmp_path / "dit-Q8_0.gguf"
    write_gguf(dit, load_state_dict(release / "diffusion_pytorch_model.safetensors"), "Q8_0")
    umt5 = root / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    for keep, name in ((True, "kept"), (False, "dense")):
        assert cli_main(["convert", str(release), str(tmp_path / name), "--dtype", "fp32", "--transformer", str(dit),
                         "--text-encoder", str(umt5), *(["--keep-quantized"] if keep else [])]) == 0
    kept = tmp_path / "kept"
    assert quantized_components(kept) == ["text_encoder", "transformer"]
    note = json.loads((kept / "text_encoder" / QUANTIZED_FOLDER_NOTE).read_text())
    assert note["storage"] == "fp8" and (kept / "text_encoder" / TEXT_ENCODER_FP8_WEIGHTS).exists()
    with pytest.raises(OSError, match="model.safetensors"):
        UMT5EncoderModel.from_pretrained(kept / "text_encoder")
    pipe = load_quantized_pipeline(kept)
    assert isinstance(pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q, Fp8Linear)
    assert type(pipe.transformer.blocks[0].ffn.net[2].weight).__name__ == "GGUFParameter"
    dense = DiffusionPipeline.from_pretrained(tmp_path / "dense")
    call = dict(num_inference_steps=2, height=16, width=16, num_frames=5, output_type="pt")
    frames = [p("a cat", generator=torch.Generator().manual_seed(0), **call).frames for p in (pipe, dense)]
    assert torch.allclose(frames[0], frames[1], atol=1e-3)  # the same stored values; float16 dequantization there


def test_kept_text_encoder_errors(umt5_files, tmp_path):
    root, _ = umt5_files
    model = load_quantized_t5(root / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", torch_dtype=torch.float32)
    save_quantized_text_encoder(model, tmp_path / "te", torch.float32)
    weights = tmp_path / "te" / TEXT_ENCODER_FP8_WEIGHTS
    tensors = load_file(str(weights))
    del tensors["encoder.block.0.layer.0.SelfAttention.k.weight_scale"]
    save_file(tensors, str(weights))
    with pytest.raises(ConversionError, match=r"encoder\.block\.0\.layer\.0\.SelfAttention\.k\.weight has no .*"
                                              r"weight_scale"):
        load_quantized_folder(tmp_path / "te")
    weights.unlink()
    with pytest.raises(ConversionError, match=TEXT_ENCODER_FP8_WEIGHTS):
        load_quantized_folder(tmp_path / "te")
    stored = load_file(str(root / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    stored["encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.zeros(4, 4)
    save_file(stored, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConversionError, match=r"SelfAttention\.extra"):
        load_quantized_t5(tmp_path / "bad.safetensors")
