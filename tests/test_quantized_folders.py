"""``diffusers-wan convert --keep-quantized`` (issue 21, "convert ... kept quantized where Diffusers can load it
back"): a GGUF / fp8 single-file DiT becomes a Diffusers folder that a fresh interpreter loads with stock Diffusers
calls only, still quantized.  CPU, tiny models, real files.

Routes (Diffusers 0.42.1; its ``from_pretrained`` has no GGUF route -- ``GGUFQuantizationConfig`` cannot even be
built from a saved config -- so the GGUF folder is read by ``from_single_file``):

* GGUF: ``transformer/diffusion_pytorch_model.gguf`` (Diffusers key names, the packed blocks copied byte for byte)
  + ``config.json``, loaded by ``Cls.from_single_file(gguf, config=folder, quantization_config=
  GGUFQuantizationConfig(...))``; then ``DiffusionPipeline.from_pretrained(folder, transformer=...)``.
  Expected error: the same blocks as the file, so the output equals ``load_quantized_dit``'s (Diffusers' own GGUF
  kernels on both sides: rtol 1e-5) and is within 2e-3 (relative RMS) of the file dequantized in float32.
* fp8: safetensors with each fp8 Linear weight stored in fp8 without a scale, loaded by ``from_pretrained`` +
  ``enable_layerwise_casting(storage_dtype=fp8)``.  A plain fp8 file's weights come back bit for bit; a scaled
  file's weights are rounded to fp8 once more (``fp8(q * scale)``).  Layerwise casting also stores the biases and
  the other Linears / convolutions of the blocks and the head in fp8 (stock behaviour), so the output is within
  0.1 (relative RMS, e4m3) of the file dequantized, against 4e-2 for the scaled file run by ``load_quantized_dit``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

gguf = pytest.importorskip("gguf")

from diffusers_wan_ext_cli import main as cli_main  # noqa: E402
from diffusers_wan_ext.conversion.dit import load_dit_from_original, rename_dit_key  # noqa: E402
from helpers import write_wide_t2v_gguf  # noqa: E402
from diffusers_wan_ext.conversion.quantized_dit import (  # noqa: E402
    GGUF_FOLDER_WEIGHTS, QUANTIZED_FOLDER_NOTE, load_quantized_dit, load_quantized_folder)
from diffusers_wan_ext.utils.fp8_files import fp8_state_dict  # noqa: E402
from diffusers_wan_ext.utils.gguf_files import write_gguf  # noqa: E402
from diffusers_wan_ext.utils.io import load_state_dict  # noqa: E402
from diffusers_wan_ext.utils.single_file import read_quantized  # noqa: E402

#: what a fresh interpreter runs: stock Diffusers calls only (no diffusers_wan_ext import); for each job
#: [folder, storage, out, pipeline] the transformer's output on fixed inputs and its Linear weights are saved
FRESH = r"""
import json, sys, torch, diffusers
from diffusers import DiffusionPipeline, GGUFQuantizationConfig
for folder, kind, out, pipeline in json.loads(sys.argv[1]):
    cfg = json.load(open(f"{folder}/transformer/config.json"))
    cls = getattr(diffusers, cfg["_class_name"])
    if kind == "gguf":
        tr = cls.from_single_file(f"{folder}/transformer/diffusion_pytorch_model.gguf", config=f"{folder}/transformer",
                                  quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
                                  torch_dtype=torch.float32)
    else:
        tr = cls.from_pretrained(f"{folder}/transformer", torch_dtype=torch.float32)
        tr.enable_layerwise_casting(storage_dtype=getattr(torch, kind), compute_dtype=torch.float32)
    layers = {n: m.weight for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg["in_channels"], 2, 8, 8, generator=g)
    ctx = torch.randn(1, 7, cfg["text_dim"], generator=g)
    kw = {}
    if "vace_layers" in cfg:
        kw["control_hidden_states"] = torch.randn(1, cfg["vace_in_channels"], 2, 8, 8, generator=g)
    with torch.no_grad():
        y = tr(x, torch.tensor([500.0]), ctx, return_dict=False, **kw)[0]
    info = {n: [type(w).__name__, str(w.dtype), getattr(getattr(w, "quant_type", None), "name", None)]
            for n, w in layers.items()}
    saved = {"y": y, "x": x, "ctx": ctx, "kw": kw}
    saved.update({f"w:{n}": w.detach().as_subclass(torch.Tensor).view(torch.uint8).clone()
                  for n, w in layers.items() if w.dtype != torch.float32})
    if pipeline:  # the whole pipeline, from_pretrained with the quantized transformer passed in
        pipe = DiffusionPipeline.from_pretrained(folder, transformer=tr)
        pipe.set_progress_bar_config(disable=True)
        saved["frames"] = pipe("a cat", num_inference_steps=2, height=16, width=16, num_frames=5, output_type="pt",
                               generator=torch.Generator().manual_seed(0)).frames
        info["_pipeline"] = [type(pipe).__name__, type(pipe.transformer.blocks[0].ffn.net[2].weight).__name__]
    torch.save(saved, out)
    json.dump(info, open(out + ".json", "w"))
"""
FP8_CASES = {"e4m3-plain": dict(scaled=False), "e4m3-scale_weight": dict(convention="scale_weight"),
             "e5m2-plain": dict(scaled=False, fp8_dtype=torch.float8_e5m2)}


def fresh_load(jobs: list[list]) -> None:
    """Run :data:`FRESH` once for every job (one interpreter start for the module)."""
    done = subprocess.run([sys.executable, "-c", FRESH, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def fresh_result(out) -> tuple[dict, dict]:
    return torch.load(out), json.loads(open(f"{out}.json").read())


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


def dequantized_reference(path, cfg=None):
    tensors, _ = read_quantized(path)
    return load_dit_from_original({k: q.dequantize(torch.float32) for k, q in tensors.items()}, cfg, torch.float32)


def forward(model, x, ctx, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), ctx, return_dict=False, **kw)[0]


@pytest.fixture(scope="module")
def wide_gguf(tmp_path_factory):
    """A core DiT of width 256 as a GGUF of Q8_0 / Q4_K / Q6_K / Q5_K blocks (K-quants need rows of 256) + F32."""
    path = tmp_path_factory.mktemp("wide") / "wan-wide-mixed.gguf"
    stored = write_wide_t2v_gguf(path)
    return path, {k: v for k, v in stored.items() if v[1] != "F32"}


@pytest.fixture(scope="module")
def folders(wide_gguf, tiny_release, tmp_path_factory):
    """Every --keep-quantized folder of this module, converted with the CLI and loaded back in one fresh
    interpreter: ``{name: (folder, source file, fresh output path)}``."""
    root = tmp_path_factory.mktemp("kept")
    out: dict[str, tuple] = {}
    wide = root / "wide" / "transformer"  # --transformer-only writes the model folder itself
    assert cli_main(["convert", str(wide_gguf[0]), str(wide), "--transformer-only", "--keep-quantized",
                     "--dtype", "fp32"]) == 0
    out["wide"] = (wide, wide_gguf[0], "gguf", False)
    release = tiny_release("t2v")
    path = root / "dit-Q8_0.gguf"
    write_gguf(path, load_state_dict(release / "diffusion_pytorch_model.safetensors"), "Q8_0")  # width 48
    for keep, name in ((True, "kept"), (False, "dequantized")):
        assert cli_main(["convert", str(release), str(root / name), "--dtype", "fp32", "--transformer", str(path),
                         *(["--keep-quantized"] if keep else [])]) == 0
    out["pipeline"] = (root / "kept" / "transformer", path, "gguf", True)
    sd = load_state_dict(tiny_release("vace") / "diffusion_pytorch_model.safetensors")
    for name, kw in FP8_CASES.items():
        tensors, meta = fp8_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()},
                                       prefix="model.diffusion_model.", **kw)
        path = root / f"vace-{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta or None)
        folder = root / name / "transformer"
        assert cli_main(["convert", str(path), str(folder), "--transformer-only", "--keep-quantized",
                         "--dtype", "fp32"]) == 0
        storage = json.loads((folder / QUANTIZED_FOLDER_NOTE).read_text())["storage_dtype"]
        out[name] = (folder, path, storage, False)
    fresh_load([[str(f.parent), kind, str(root / f"fresh-{n}.pt"), pipe] for n, (f, _, kind, pipe) in out.items()])
    return {n: (f, src, root / f"fresh-{n}.pt") for n, (f, src, _, _) in out.items()}


def test_gguf_folder_loads_back_packed_in_a_fresh_interpreter(folders, wide_gguf):
    out, path, fresh = folders["wide"]
    blocks = wide_gguf[1]
    note = json.loads((out / QUANTIZED_FOLDER_NOTE).read_text())
    assert note["storage"] == "gguf" and note["weights"] == GGUF_FOLDER_WEIGHTS
    assert not (out / "diffusion_pytorch_model.safetensors").exists()  # nothing dequantized written
    saved, info = fresh_result(fresh)
    packed = {k: v for k, v in info.items() if v[0] == "GGUFParameter"}
    assert {v[2] for v in packed.values()} == {"Q8_0", "Q4_K", "Q6_K", "Q5_K"}
    for key, (data, qtype) in blocks.items():  # the file's blocks, byte for byte, under the Diffusers names
        name = rename_dit_key(key).rpartition(".")[0]
        if "time_embedder" in name:  # Diffusers' _keep_in_fp32_modules: dequantized at load, as stock does
            assert info[name][1] == "torch.float32"
            continue
        assert info[name][2] == qtype and torch.equal(saved[f"w:{name}"].flatten(), torch.from_numpy(data).flatten())
    ours = load_quantized_dit(path, torch_dtype=torch.float32)
    assert torch.allclose(saved["y"], forward(ours, saved["x"], saved["ctx"]), rtol=1e-5, atol=1e-6)
    assert rel_rms(saved["y"], forward(dequantized_reference(path), saved["x"], saved["ctx"])) < 2e-3
    again = load_quantized_folder(out)  # the same stock calls, as a helper
    assert torch.equal(forward(again, saved["x"], saved["ctx"]), saved["y"])


def test_gguf_pipeline_folder_loads_with_diffusion_pipeline(folders):
    out, _, fresh = folders["pipeline"]
    kept = out.parent
    assert (out / GGUF_FOLDER_WEIGHTS).exists() and (kept / "vae" / "config.json").exists()  # the rest as usual
    # listed as absent: Diffusers would try from_pretrained on it even with transformer= passed (an optional component)
    assert json.loads((kept / "model_index.json").read_text())["transformer"] == [None, None]
    saved, info = fresh_result(fresh)
    assert info["blocks.0.ffn.net.2"][:3] == ["GGUFParameter", "torch.uint8", "Q8_0"]
    assert info["_pipeline"] == ["WanPipeline", "GGUFParameter"]
    from diffusers import DiffusionPipeline

    dense = DiffusionPipeline.from_pretrained(kept.parent / "dequantized")
    dense.set_progress_bar_config(disable=True)
    frames = dense("a cat", num_inference_steps=2, height=16, width=16, num_frames=5, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).frames
    assert torch.allclose(saved["frames"], frames, atol=1e-4)  # Q8_0 blocks: Diffusers' dequantization is exact


@pytest.mark.parametrize("name", list(FP8_CASES))
def test_fp8_folder_loads_back_in_fp8_with_layerwise_casting(folders, name):
    folder, path, fresh = folders[name]
    fp8 = FP8_CASES[name].get("fp8_dtype", torch.float8_e4m3fn)
    note = json.loads((folder / QUANTIZED_FOLDER_NOTE).read_text())
    assert note["storage"] == "fp8" and note["storage_dtype"] == str(fp8).replace("torch.", "")
    assert note["rounded_again"] == (note["fp8_layers"] if "scale" in name else 0)
    stored = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert not any(k.endswith(("weight_scale", "scale_weight")) for k in stored)
    saved, info = fresh_result(fresh)
    ours = load_quantized_dit(path, torch_dtype=torch.float32)
    for module, layer in ours.named_modules():  # every fp8 Linear comes back in fp8 with the folder's values
        if not hasattr(layer, "weight_scale"):
            continue
        assert info[module][1] == str(fp8), module
        got = saved[f"w:{module}"].view(fp8).reshape(layer.weight.shape)
        assert torch.equal(got.view(torch.uint8), stored[f"{module}.weight"].view(torch.uint8)), module
        if "plain" in name:  # the file's own fp8 values, bit for bit
            assert torch.equal(got.view(torch.uint8), layer.weight.view(torch.uint8)), module
        else:
            want = layer.dequantized_weight(torch.float32)
            assert rel_rms(got.float(), want) < (4e-2 if fp8 == torch.float8_e4m3fn else 8e-2), module
    assert info["vace_blocks.0.ffn.net.2"][1] == str(fp8)
    reference = forward(dequantized_reference(path), saved["x"], saved["ctx"], **saved["kw"])
    bound = 0.1 if fp8 == torch.float8_e4m3fn else 0.2
    assert rel_rms(saved["y"], reference) < bound, (name, rel_rms(saved["y"], reference))


def test_keep_quantized_errors(tiny_release, tmp_path, capsys):
    release = tiny_release("t2v")

    def one_line(*argv, words=()):
        assert cli_main(["convert", *argv]) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "--keep-quantized" in err[0], err
        for w in words:
            assert w in err[0], err
        return err[0]

    # a release in bf16: nothing to keep quantized -> refused, nothing written
    one_line(str(release), str(tmp_path / "a"), "--keep-quantized", "--transformer-only", words=("no GGUF / fp8",))
    assert not (tmp_path / "a").exists()
    one_line(str(release), str(tmp_path / "a"), "--keep-quantized", "--transformer",
             str(release / "diffusion_pytorch_model.safetensors"), words=("holds no GGUF / fp8",))  # headers only
    one_line("-", str(tmp_path / "b"), "--model-id", "Wan-AI/x", "--keep-quantized", words=("--model-id",))
    one_line(str(release), str(tmp_path / "c"), "--keep-quantized", "--transformer", str(release),
             words=("--transformer", "single file"))
    # (a GGUF of a class Diffusers' from_single_file does not take, S2V, is kept: test_quantized_folder_routes.py)


def test_two_experts_kept_quantized(tiny_release, tmp_path):
    """Wan2.2 A14B: both experts as GGUF files -> transformer/ and transformer_2/ kept quantized, both listed as
    passed-in components; each loads back packed with the stock call."""
    release = tiny_release("t2v", experts=2)
    paths = []
    for i, expert in enumerate(("high_noise_model", "low_noise_model")):
        paths.append(tmp_path / f"expert{i}-Q8_0.gguf")
        write_gguf(paths[-1], load_state_dict(release / expert / "diffusion_pytorch_model.safetensors"), "Q8_0")
    out = tmp_path / "a14b"
    assert cli_main(["convert", str(release), str(out), "--dtype", "fp32", "--keep-quantized",
                     "--transformer", str(paths[0]), "--transformer-2", str(paths[1])]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == index["transformer_2"] == [None, None]
    for name, path in zip(("transformer", "transformer_2"), paths):
        model = load_quantized_folder(out / name)
        assert type(model.blocks[0].ffn.net[2].weight).__name__ == "GGUFParameter"
        x = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
        ctx = torch.randn(1, 7, model.config.text_dim, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(forward(model, x, ctx), forward(load_quantized_dit(path, torch_dtype=torch.float32), x,
                                                              ctx), rtol=1e-5, atol=1e-6), name


def test_kept_folders_export_back_to_the_original_layout(folders, tmp_path):
    """export-dit reads a kept-quantized folder (GGUF: its .gguf; fp8: its fp8 safetensors) dequantized."""
    for name in ("pipeline", "e4m3-plain"):
        folder, path, _ = folders[name]
        dst = tmp_path / f"{name}.safetensors"
        assert cli_main(["export-dit", str(folder), str(dst), "--dtype", "fp32"]) == 0
        exported = load_file(str(dst))
        source = {k: q.dequantize(torch.float32) for k, q in read_quantized(path)[0].items()}
        source = {k[len("model.diffusion_model."):] if k.startswith("model.") else k: v for k, v in source.items()}
        assert set(exported) == set(source), name
        for k, v in source.items():  # float16 dequantization of the GGUF blocks only
            assert torch.allclose(exported[k], v, rtol=1e-3, atol=1e-6), (name, k)


def test_animate_fp8_kept_in_fp32(tiny_release, tmp_path):
    """Animate's face-adapter ``to_k`` / ``to_v`` are cut from the file's fused ``linear1_kv`` (views of one
    storage); kept fp8 with ``--dtype fp32`` they are saved as copies (safetensors refuses shared views)."""
    release = tiny_release("animate")
    sd = {f"model.diffusion_model.{k}": v for k, v in
          load_state_dict(release / "diffusion_pytorch_model.safetensors").items()}
    tensors, meta = fp8_state_dict(sd, prefix="model.diffusion_model.")
    path = tmp_path / "animate_fp8_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta or None)
    out = tmp_path / "kept"
    assert cli_main(["convert", str(path), str(out), "--transformer-only", "--dtype", "fp32",
                     "--keep-quantized"]) == 0
    cfg = json.loads((release / "config.json").read_text())
    stored, want = load_file(str(out / "diffusion_pytorch_model.safetensors")), \
        load_quantized_dit(path, cfg, torch_dtype=torch.float32).state_dict()
    for k in ("face_adapter.0.to_k.weight", "face_adapter.0.to_v.weight"):
        assert torch.equal(stored[k], want[k]), k
    kept = load_quantized_folder(out)  # layerwise casting stores them in fp8 again (stock behaviour)
    assert rel_rms(kept.state_dict()["face_adapter.0.to_k.weight"].float(), want["face_adapter.0.to_k.weight"]) < 0.1
