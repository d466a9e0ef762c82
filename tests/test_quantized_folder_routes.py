"""The other ``convert --keep-quantized`` folder routes (issue 21): fp8 weights that keep their file's scales
(``--fp8-storage torchao``: Diffusers' ``TorchAoConfig`` serialization) and GGUF DiTs of classes stock Diffusers'
``from_single_file`` does not take (S2V), read back by this package's ``load_quantized_folder``.  CPU, tiny models,
real files (safetensors fp8 in ComfyUI's scaled convention, the ``gguf`` writer).

Expected error:

* torchao folder: the stored e4m3 values and their scales as they are, so the model loaded back (stock
  ``from_pretrained`` with torchao, or this package's reader without it) gives the output of
  ``load_quantized_dit`` on the file (rtol 1e-5) -- within the fp8 file's own error (4e-2 relative RMS of the
  weights) of the bf16 source, nothing rounded again.
* S2V GGUF folder: the file's Q8_0 blocks byte for byte, so the weights equal ``load_quantized_dit``'s exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

gguf = pytest.importorskip("gguf")

from diffusers_wan_ext_cli import main as cli_main  # noqa: E402
from diffusers_wan_ext.conversion import quantized_torchao  # noqa: E402
from diffusers_wan_ext.conversion.quantized_dit import (  # noqa: E402
    GGUF_FOLDER_WEIGHTS, PACKAGE_LOADER, QUANTIZED_FOLDER_NOTE, load_quantized_dit, load_quantized_folder)
from diffusers_wan_ext.models.quantized_linear import Fp8Linear  # noqa: E402
from diffusers_wan_ext.utils.fp8_files import fp8_state_dict  # noqa: E402
from diffusers_wan_ext.utils.gguf_files import write_gguf  # noqa: E402
from diffusers_wan_ext.utils.io import ConversionError, load_state_dict  # noqa: E402

HAS_TORCHAO = quantized_torchao.torchao_version() is not None and (
    quantized_torchao.torchao_version() >= quantized_torchao.TORCHAO_MIN_VERSION)
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao >= 0.16 is not installed (the torchao fp8 "
                                                           "storage is written through it)")

#: a fresh interpreter that imports only Diffusers: the stock load of a torchao folder
STOCK = r"""
import json, sys, torch, diffusers
folder, out = sys.argv[1:]
cfg = json.load(open(f"{folder}/config.json"))
tr = getattr(diffusers, cfg["_class_name"]).from_pretrained(folder, torch_dtype=torch.float32)
w = tr.blocks[0].ffn.net[2].weight
g = torch.Generator().manual_seed(0)
x = torch.randn(1, cfg["in_channels"], 2, 8, 8, generator=g)
ctx = torch.randn(1, 7, cfg["text_dim"], generator=g)
control = torch.randn(1, cfg["vace_in_channels"], 2, 8, 8, generator=g)
with torch.no_grad():
    y = tr(x, torch.tensor([500.0]), ctx, control_hidden_states=control, return_dict=False)[0]
torch.save({"y": y, "x": x, "ctx": ctx, "control": control, "qdata": w.qdata.view(torch.uint8).clone(),
            "scale": w.scale.clone(), "type": type(w).__name__}, out)
"""


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt().clamp_min(1e-12))


def forward(model, x, ctx, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), ctx, return_dict=False, **kw)[0]


@pytest.fixture(scope="module")
def scaled_vace(tiny_release, tmp_path_factory):
    """A VACE DiT as a ComfyUI scaled-fp8 file (``scale_weight`` + ``scaled_fp8`` marker, e4m3)."""
    sd = load_state_dict(tiny_release("vace") / "diffusion_pytorch_model.safetensors")
    tensors, meta = fp8_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()},
                                   prefix="model.diffusion_model.", convention="scale_weight")
    path = tmp_path_factory.mktemp("scaled") / "vace_fp8_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta or None)
    return path


@pytest.fixture(scope="module")
def torchao_folder(scaled_vace, tmp_path_factory):
    if not HAS_TORCHAO:
        pytest.skip("torchao >= 0.16 is not installed (the torchao fp8 storage is written through it)")
    folder = tmp_path_factory.mktemp("torchao") / "transformer"
    assert cli_main(["convert", str(scaled_vace), str(folder), "--transformer-only", "--keep-quantized",
                     "--fp8-storage", "torchao", "--dtype", "fp32"]) == 0
    return folder


@needs_torchao
def test_torchao_folder_keeps_the_scales_and_loads_with_stock_diffusers(torchao_folder, scaled_vace, tmp_path):
    note = json.loads((torchao_folder / QUANTIZED_FOLDER_NOTE).read_text())
    assert note["storage"] == "torchao" and note["storage_dtype"] == "float8_e4m3fn"
    assert note["scaled_layers"] == note["fp8_layers"] > 0
    config = json.loads((torchao_folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    out = tmp_path / "stock.pt"
    done = subprocess.run([sys.executable, "-c", STOCK, str(torchao_folder), str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stock = torch.load(out)
    ours = load_quantized_dit(scaled_vace, torch_dtype=torch.float32)
    layer = ours.blocks[0].ffn.net[2]
    assert stock["type"] == "Float8Tensor"
    assert torch.equal(stock["qdata"], layer.weight.view(torch.uint8))  # the file's fp8 values, bit for bit
    assert torch.equal(stock["scale"].reshape(-1), layer.weight_scale.expand(layer.out_features))  # its scale
    want = forward(ours, stock["x"], stock["ctx"], control_hidden_states=stock["control"])
    assert torch.allclose(stock["y"], want, rtol=1e-5, atol=1e-6)
    again = load_quantized_folder(torchao_folder)  # the same stock call, as the helper
    assert type(again.blocks[0].ffn.net[2].weight).__name__ == "Float8Tensor"
    assert torch.equal(forward(again, stock["x"], stock["ctx"], control_hidden_states=stock["control"]), stock["y"])


@needs_torchao
def test_torchao_folder_reads_without_torchao(torchao_folder, scaled_vace, monkeypatch):
    """Where torchao is absent the package reads the same folder into Fp8Linear layers (same values and scales)."""
    monkeypatch.setattr(quantized_torchao, "torchao_version", lambda: None)
    model = load_quantized_folder(torchao_folder)
    ours = load_quantized_dit(scaled_vace, torch_dtype=torch.float32)
    for name, layer in ours.named_modules():
        if isinstance(layer, Fp8Linear):
            got = model.get_submodule(name)
            assert isinstance(got, Fp8Linear), name
            assert torch.equal(got.weight.view(torch.uint8), layer.weight.view(torch.uint8)), name
            assert torch.equal(got.weight_scale, layer.weight_scale), name
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 7, model.config.text_dim, generator=g)
    control = torch.randn(1, model.config.vace_in_channels, 2, 8, 8, generator=g)
    assert torch.equal(forward(model, x, ctx, control_hidden_states=control),
                       forward(ours, x, ctx, control_hidden_states=control))


@needs_torchao
def test_torchao_folder_errors(torchao_folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setattr(quantized_torchao, "torchao_version", lambda: None)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", QUANTIZED_FOLDER_NOTE):
        (broken / name).write_text((torchao_folder / name).read_text())
    tensors = load_file(str(torchao_folder / "diffusion_pytorch_model.safetensors"))
    del tensors["blocks.0.ffn.net.2._weight_scale"]
    save_file(tensors, str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConversionError, match=r"blocks\.0\.ffn\.net\.2\._weight_qdata has no .*_weight_scale"):
        load_quantized_folder(broken)
    (broken / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ConversionError, match="no diffusion_pytorch_model"):
        load_quantized_folder(broken)


def test_fp8_storage_arguments(tiny_release, scaled_vace, tmp_path, capsys, monkeypatch):
    release = tiny_release("t2v")
    assert cli_main(["convert", str(release), str(tmp_path / "a"), "--fp8-storage", "torchao"]) == 2
    assert "--fp8-storage applies to --keep-quantized" in capsys.readouterr().err
    monkeypatch.setattr(quantized_torchao, "torchao_version", lambda: None)  # as where torchao is not installed
    assert cli_main(["convert", str(scaled_vace), str(tmp_path / "b"), "--transformer-only", "--keep-quantized",
                     "--fp8-storage", "torchao"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--fp8-storage torchao needs torchao >= 0.16" in err[0], err
    assert not (tmp_path / "b").exists()  # refused before loading anything


def test_s2v_gguf_folder_loads_through_the_package(tiny_release, tmp_path):
    """S2V: Diffusers' from_single_file does not take the class, so the GGUF folder names this package's loader;
    the blocks stay packed (GGUFLinear) and equal those load_quantized_dit keeps from the file."""
    s2v = tiny_release("s2v")
    src = tmp_path / "s2v"
    src.mkdir()  # the GGUF with the tiny release's config.json beside it (2 blocks, not 40)
    (src / "config.json").write_text((s2v / "config.json").read_text())
    path = src / "s2v-Q8_0.gguf"
    write_gguf(path, load_state_dict(s2v / "diffusion_pytorch_model.safetensors"), "Q8_0")
    folder = tmp_path / "out"
    assert cli_main(["convert", str(src), str(folder), "--keep-quantized", "--transformer-only",
                     "--dtype", "fp32"]) == 0
    note = json.loads((folder / QUANTIZED_FOLDER_NOTE).read_text())
    assert note["storage"] == "gguf" and note["loader"] == PACKAGE_LOADER and "load_quantized_folder" in note["load"]
    assert (folder / GGUF_FOLDER_WEIGHTS).exists() and not (folder / "diffusion_pytorch_model.safetensors").exists()
    model = load_quantized_folder(folder)
    ours = load_quantized_dit(path, json.loads((src / "config.json").read_text()), torch_dtype=torch.float32)
    assert type(model) is type(ours) and type(model).__name__ == "WanS2VTransformer3DModel"
    got, want = model.state_dict(keep_vars=True), ours.state_dict(keep_vars=True)
    assert set(got) == set(want)
    packed = [k for k, v in want.items() if type(v).__name__ == "GGUFParameter"]
    assert len(packed) >= 3  # width 48: the Linears whose rows fit Q8_0 blocks of 32 (the rest F32 / F16)
    for key in packed:  # the same blocks, byte for byte, still packed
        assert type(got[key]).__name__ == "GGUFParameter" and got[key].quant_type == want[key].quant_type, key
        assert torch.equal(got[key].data.view(torch.uint8), want[key].data.view(torch.uint8)), key
    for key in set(want) - set(packed):
        assert torch.equal(got[key].detach(), want[key].detach()), key
    with pytest.raises(ConversionError, match="not a folder written with --keep-quantized"):
        load_quantized_folder(tmp_path / "s2v")
    from diffusers_wan_ext.utils.gguf_files import read_gguf, write_gguf_stored

    stored, _ = read_gguf(folder / GGUF_FOLDER_WEIGHTS)  # a tensor the class does not have -> named
    extra = {k: q.data.float() if q.qtype == "F32" else (q.data, q.qtype) for k, q in stored.items()}
    extra["blocks.0.not_a_layer.weight"] = torch.zeros(4)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", QUANTIZED_FOLDER_NOTE):
        (broken / name).write_text((folder / name).read_text())
    write_gguf_stored(broken / GGUF_FOLDER_WEIGHTS, extra)
    with pytest.raises(ConversionError, match=r"blocks\.0\.not_a_layer\.weight is not a tensor of "
                                              "WanS2VTransformer3DModel"):
        load_quantized_folder(broken)


def wide_longcat_file(folder) -> tuple[dict, dict]:
    """An original-layout LongCat-Video DiT of width 64 (its fused qkv / kv rows fit Q8_0 blocks of 32): the state
    dict and the release-style config."""
    from diffusers_wan_ext.conversion.longcat import export_longcat_state_dict
    from diffusers_wan_ext.models.transformer_longcat import LongCatVideoTransformer3DModel

    torch.manual_seed(0)
    model = LongCatVideoTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                           in_channels=16, out_channels=16, num_layers=2, text_dim=64, freq_dim=64,
                                           time_embed_dim=64, ffn_dim=128)
    sd = {k: torch.randn(v.shape) * 0.05 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
          for k, v in model.state_dict().items()}
    return export_longcat_state_dict(sd), {"hidden_size": 64, "depth": 2, "num_heads": 2}


def longcat_forward(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model(torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([700.0]),
                     torch.randn(1, 8, 64, generator=g), num_cond_latents=1, return_dict=False)[0]


@pytest.mark.parametrize("kind", ["gguf", "fp8"])
def test_longcat_single_file_kept_quantized(tmp_path, kind):
    """LongCat-Video: the fused projections are cut by rows on the stored data (Q8_0 blocks / fp8 values with their
    scale), so the kept model equals the dequantized file's; --keep-quantized --transformer-only writes its folder."""
    from diffusers_wan_ext.conversion.longcat import load_longcat_transformer_from_original
    from diffusers_wan_ext.utils.single_file import read_quantized

    sd, cfg = wide_longcat_file(tmp_path)
    if kind == "gguf":
        path = tmp_path / "longcat-Q8_0.gguf"
        write_gguf(path, sd, "Q8_0")
    else:
        path = tmp_path / "longcat_fp8_scaled.safetensors"
        tensors, meta = fp8_state_dict(sd, convention="scale_weight")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta or None)
    model = load_quantized_dit(path, cfg, torch_dtype=torch.float32)
    cls = "GGUFLinear" if kind == "gguf" else "Fp8Linear"
    for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v", "ffn.w2"):
        assert type(model.blocks[1].get_submodule(name)).__name__ == cls, name
    stored = {k: q.dequantize(torch.float32) for k, q in read_quantized(path)[0].items()}
    reference = load_longcat_transformer_from_original(stored, cfg, torch.float32)
    got, want = longcat_forward(model), longcat_forward(reference)
    if kind == "fp8":  # the stored values times their scale, as the dequantized reference
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    else:  # Diffusers dequantizes Q8_0 blocks in float16 steps, the gguf package in float32 (bound as for Wan)
        assert rel_rms(got, want) < 2e-3
    folder = tmp_path / "out"
    assert cli_main(["convert", str(path), str(folder), "--keep-quantized", "--transformer-only",
                     "--dtype", "fp32"]) == 0
    note = json.loads((folder / QUANTIZED_FOLDER_NOTE).read_text())
    assert note["class"] == "LongCatVideoTransformer3DModel"
    assert note["storage"] == kind and (kind == "fp8" or note["loader"] == PACKAGE_LOADER)
    again = load_quantized_folder(folder)
    if kind == "gguf":  # the blocks as kept, so the output as load_quantized_dit's
        assert type(again.blocks[1].attn1.to_q).__name__ == "GGUFLinear"
        assert torch.equal(longcat_forward(again), got)
    else:  # layerwise casting: rounded to fp8 once more, biases too (stock behaviour, as for the Wan DiTs)
        assert rel_rms(longcat_forward(again), want) < 0.1


def test_longcat_keep_quantized_needs_transformer_only(tmp_path, capsys):
    sd, _ = wide_longcat_file(tmp_path)
    write_gguf(tmp_path / "longcat-Q8_0.gguf", sd, "Q8_0")
    assert cli_main(["convert", str(tmp_path / "longcat-Q8_0.gguf"), str(tmp_path / "d"), "--keep-quantized"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--transformer-only" in err[0] and "LongCat" in err[0], err


@needs_torchao
def test_torchao_folder_exports_back(torchao_folder, scaled_vace, tmp_path):
    """export-dit reads a torchao folder dequantized (qdata * scale): the file's own values, original layout."""
    from safetensors.torch import load_file

    from diffusers_wan_ext.utils.single_file import read_quantized

    dst = tmp_path / "vace.safetensors"
    assert cli_main(["export-dit", str(torchao_folder), str(dst), "--dtype", "fp32"]) == 0
    exported = load_file(str(dst))
    source = {k.removeprefix("model.diffusion_model."): q.dequantize(torch.float32)
              for k, q in read_quantized(scaled_vace)[0].items()}
    source.pop("scaled_fp8", None)
    assert set(exported) == set(source)
    for k, v in source.items():  # float16 holds every e4m3 value; the bias / norms were written in fp32
        assert torch.allclose(exported[k], v, rtol=1e-6, atol=0), k


def test_s2v_pipeline_folder_loads_with_load_quantized_pipeline(tiny_release, tmp_path):
    """A whole S2V release with its DiT as a GGUF: the pipeline folder lists the transformer absent (Diffusers would
    try its own loader on it) and load_quantized_pipeline passes the packed model in."""
    from diffusers_wan_ext.conversion.quantized_pipeline import load_quantized_pipeline, quantized_components

    release = tiny_release("s2v")
    path = tmp_path / "s2v-Q8_0.gguf"
    write_gguf(path, load_state_dict(release / "diffusion_pytorch_model.safetensors"), "Q8_0")
    (tmp_path / "config.json").write_text((release / "config.json").read_text())  # the tiny depth beside the file
    out = tmp_path / "out"
    assert cli_main(["convert", str(release), str(out), "--transformer", str(path), "--keep-quantized",
                     "--dtype", "fp32"]) == 0
    assert json.loads((out / "model_index.json").read_text())["transformer"] == [None, None]
    assert quantized_components(out) == ["transformer"]
    pipe = load_quantized_pipeline(out)
    assert type(pipe).__name__ == "WanSpeechToVideoPipeline"
    assert type(pipe.transformer.blocks[0].ffn.net[2].weight).__name__ == "GGUFParameter"
    with pytest.raises(ConversionError, match="model_index.json"):
        quantized_components(tmp_path)
