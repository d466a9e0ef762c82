"""Issue 23's check for the new families, end to end: a tiny release folder of every layout (Wan2.2-Animate-2-14B
with its distilled DiT, Wan-Dancer-14B whole / global / local, MOVA-360p / MOVA-720p) converted with the command line
(``diffusers-wan convert``), then loaded and run in fresh interpreters on media files written here:

* a stock-only interpreter that never imports this package: stock ``WanAnimate2Transformer3DModel.from_pretrained``
  reads both Animate-2 transformer folders (the release's CLIP width makes them stock classes) with the release
  file's weights, and stock Diffusers' modular ``WanAnimate2Blocks`` / ``WanAnimate2DistilledBlocks`` load the converted
  folders and generate from a png and an mp4;
* one interpreter loading every folder with ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`` (no
  import of the package first) and running each tiny pipeline (png / mp4 / wav in, mp4 with the generated sound out
  for MOVA), their VRAM plans and the TeaCache / parallelism refusals, then ``examples/<model>.py`` on its built-in
  tiny default.

The converter's errors on a truncated release file (the loader names the file, never a silent partial conversion)
and the ``variants`` rows run in this process.
"""

from __future__ import annotations

import json
import math
import shutil
import textwrap
import wave

import imageio
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from diffusers_wan_ext.conversion.animate2 import ANIMATE2_RELEASE_FILE, load_animate2_transformer_from_original
from diffusers_wan_ext.conversion.image_encoder import export_clip_state_dict
from diffusers_wan_ext.demo import make_tiny_release
from diffusers_wan_ext.families.animate2 import CLIP_FILE, DISTILLED_FILE, make_tiny_animate2_dit
from diffusers_wan_ext.families.mova import make_tiny_mova_release
from diffusers_wan_ext.pipelines.pipeline_mova import mova_audio_length
from diffusers_wan_ext.utils.media import read_audio_file, read_video_file
from diffusers_wan_ext_cli import main

from helpers import ROOT, run_python

#: The release's CLIP width: with it the Animate-2 transformer folder is stock ``WanAnimate2Transformer3DModel``.
CLIP_WIDTH, CLIP_HEADS = 1280, 16
NEW_VARIANTS = ("wan2.2-animate-2-14b", "wan2.2-animate-2-14b-distilled", "wan-dancer-14b", "wan-dancer-14b-global",
                "wan-dancer-14b-local", "mova-360p", "mova-720p")


def _animate2_dit(seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A tiny Animate-2 DiT in the release layout whose image branch takes the release's 1280-wide CLIP features."""
    sd, config = make_tiny_animate2_dit(seed=seed)
    g = torch.Generator().manual_seed(seed)
    dim = config["dim"]
    for name, shape in (("proj.0.weight", (CLIP_WIDTH,)), ("proj.0.bias", (CLIP_WIDTH,)),
                        ("proj.1.weight", (CLIP_WIDTH, CLIP_WIDTH)), ("proj.1.bias", (CLIP_WIDTH,)),
                        ("proj.3.weight", (dim, CLIP_WIDTH)), ("proj.3.bias", (dim,)), ("proj.4.weight", (dim,)),
                        ("proj.4.bias", (dim,))):
        base = 1.0 if name in ("proj.0.weight", "proj.4.weight") else 0.0
        sd[f"img_emb.{name}"] = torch.randn(shape, generator=g) * 0.02 + base
    return sd, config


def _animate2_release(folder) -> tuple:
    """Wan2.2-Animate-2-14B as released (``wan_animate_2/`` with both DiTs, umT5, tokenizer, Wan2.1 VAE, CLIP), tiny;
    the CLIP keeps the release's width (one layer).  Returns the folder and the expected transformer state dicts."""
    release = make_tiny_release(folder, arch="animate2")
    expected = {}
    for variant, name, seed in (("animate2", ANIMATE2_RELEASE_FILE, 0), ("animate2-distilled", DISTILLED_FILE, 1)):
        sd, config = _animate2_dit(seed)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(release / name))
        expected[variant] = load_animate2_transformer_from_original(sd, config).state_dict()
    (release / ANIMATE2_RELEASE_FILE).with_name("config.json").write_text(json.dumps(config))
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=CLIP_WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=CLIP_HEADS,
        image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=16))
    torch.save(export_clip_state_dict(clip.state_dict()), release / CLIP_FILE)
    return release, expected


def _write_media(folder) -> dict[str, str]:
    """The inputs as files: character / dancer / first-frame pngs, a 5-frame driving mp4, a 0.6 s wav."""
    rs = np.random.RandomState(0)
    paths = {name: folder / f"{name}.png" for name in ("character", "dancer", "first_frame")}
    for name, (h, w) in (("character", (32, 32)), ("dancer", (32, 64)), ("first_frame", (40, 56))):
        Image.fromarray(rs.randint(0, 255, (h, w, 3), np.uint8)).save(paths[name])
    paths["driving"] = folder / "driving.mp4"
    imageio.mimwrite(paths["driving"], [rs.randint(0, 255, (32, 32, 3), np.uint8) for _ in range(5)], fps=8)
    paths["music"] = folder / "music.wav"
    t = np.arange(int(0.6 * 22050)) / 22050
    with wave.open(str(paths["music"]), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes(np.round(0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every layout converted by ``diffusers-wan convert``; ``(folders, releases, media, expected Animate-2 sds)``."""
    root = tmp_path_factory.mktemp("new-families")
    a2, expected = _animate2_release(root / "Wan2.2-Animate-2-14B")
    dancer = make_tiny_release(root / "Wan-Dancer-14B", arch="dancer")
    releases = {"animate2": a2, "dancer": dancer, "mova-360p": make_tiny_mova_release(root / "MOVA-360p"),
                "mova-720p": make_tiny_mova_release(root / "MOVA-720p", seed=1)}
    clip_heads = ["--image-encoder-heads", str(CLIP_HEADS)]
    jobs = {
        "animate2": [a2, *clip_heads],
        "animate2-distilled": [a2, "--variant", "wan2.2-animate-2-14b-distilled", *clip_heads],
        "dancer": [dancer, "--image-encoder-heads", "2"],
        "dancer-global": [dancer, "--variant", "wan-dancer-14b-global", "--image-encoder-heads", "2"],
        "dancer-local": [dancer, "--variant", "wan-dancer-14b-local", "--image-encoder-heads", "2"],
        "mova-360p": [releases["mova-360p"]],
        "mova-720p": [releases["mova-720p"]],
    }
    folders = {}
    for name, (src, *extra) in jobs.items():
        folders[name] = root / "converted" / name
        assert main(["convert", str(src), str(folders[name]), "--dtype", "fp32", *extra]) == 0, name
    torch.save(expected, root / "animate2_expected.pt")
    return folders, releases, _write_media(root), root / "animate2_expected.pt"


def _steps(proc) -> dict[str, object]:
    """``{step: value}`` of the ``STEP name json`` lines a fresh interpreter printed."""
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("STEP "):
            _, name, value = line.split(" ", 2)
            out[name] = json.loads(value)
    return out


STOCK = """
import json, sys, torch, numpy as np
from diffusers import WanAnimate2Transformer3DModel
from diffusers.modular_pipelines import WanAnimate2Blocks, WanAnimate2DistilledBlocks
from diffusers.utils import load_image, load_video
folders, media = {folders!r}, {media!r}
expected = torch.load({expected!r})
for name, blocks in (("animate2", WanAnimate2Blocks), ("animate2-distilled", WanAnimate2DistilledBlocks)):
    model = WanAnimate2Transformer3DModel.from_pretrained(folders[name] + "/transformer")
    sd = model.state_dict()
    same = sd.keys() == expected[name].keys() and all(torch.equal(v, expected[name][k]) for k, v in sd.items())
    print("STEP", name + ":transformer", json.dumps([type(model).__name__, same]), flush=True)
    pipe = blocks().init_pipeline(folders[name])
    pipe.load_components(torch_dtype=torch.float32)
    video = pipe(prompt="a person dancing", image=load_image(media["character"]),
                 driving_video=load_video(media["driving"]), height=32, width=32, segment_frame_length=5,
                 num_inference_steps=1, generator=torch.Generator().manual_seed(0), output="videos")
    print("STEP", name + ":modular", json.dumps([type(pipe.transformer).__name__, list(video.shape),
                                                  bool(np.isfinite(np.asarray(video)).all())]), flush=True)
print("STEP ours_imported", json.dumps(any(m.split(".")[0] == "diffusers_wan_ext" for m in sys.modules)))
"""


def test_stock_diffusers_loads_and_runs_the_animate2_folders(converted):
    """Stock classes only: the converted transformer folders are stock ``WanAnimate2Transformer3DModel`` with the
    release's weights, and stock's modular pipelines (base and distilled) load the folders and generate."""
    folders, _, media, expected = converted
    for name in ("animate2", "animate2-distilled"):
        index = json.loads((folders[name] / "model_index.json").read_text())
        assert index["transformer"] == ["diffusers", "WanAnimate2Transformer3DModel"], index
        assert index["log_scale"] == (-1.3 if name.endswith("distilled") else 0.0)
    proc = run_python(STOCK.format(folders={k: str(v) for k, v in folders.items()}, media=media,
                                   expected=str(expected)), timeout=600)
    steps = _steps(proc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("animate2", "animate2-distilled"):
        assert steps[f"{name}:transformer"] == ["WanAnimate2Transformer3DModel", True], steps
        kind, shape, finite = steps[f"{name}:modular"]
        assert kind == "WanAnimate2Transformer3DModel" and shape == [1, 5, 32, 32, 3] and finite, steps
    assert steps["ours_imported"] is False


OURS = """
import importlib.util, json, sys, torch, numpy as np
from diffusers import DiffusionPipeline
folders, media, out = {folders!r}, {media!r}, {out!r}
def report(name, value):
    print("STEP", name, json.dumps(value), flush=True)
def load(name):
    pipe = DiffusionPipeline.from_pretrained(folders[name], dtype=torch.float32, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
def refusals(pipe):
    said = []
    for call in (lambda: pipe.enable_teacache(0.1), pipe.enable_parallelism):
        try:
            call()
            said.append(None)
        except (ValueError, NotImplementedError) as e:
            said.append(str(e))
    return said
def plan(pipe, **size):
    plan = pipe.enable_vram_management("8gb", device="cpu", verbose=False, **size)
    pipe.disable_vram_management()
    return sorted(plan.components)
gen = lambda: torch.Generator().manual_seed(0)

# Wan2.2-Animate-2 and its distilled DiT: our classic pipeline around the stock transformer folder
for name, guidance in (("animate2", 3.0), ("animate2-distilled", 1.0)):
    pipe = load(name)
    video = pipe(image=media["character"], driving_video=media["driving"], prompt="a person dancing", height=32,
                 width=32, num_frames=5, num_inference_steps=1, guidance_scale=guidance, generator=gen()).frames
    report(name, [type(pipe).__name__, pipe.config.log_scale, list(video.shape), bool(np.isfinite(video).all()),
                  plan(pipe, height=32, width=32, num_frames=5), refusals(pipe)])

# Wan-Dancer: both stages from the png and the wav (stand-in features without librosa), then each stage's folder
librosa = importlib.util.find_spec("librosa") is not None
pipe = load("dancer")
music = dict(music=media["music"]) if librosa else dict(music_features=torch.linspace(-1, 1, 19 * 35).reshape(19, 35))
if not librosa:
    try:
        pipe(image=media["dancer"], music=media["music"], prompt="dance", height=32, width=64)
    except ValueError as e:
        report("dancer:no_librosa", str(e))
kw = dict(image=media["dancer"], prompt="dance", height=32, width=64, segment_frames=9, num_inference_steps=1,
          local_num_inference_steps=1)
both = pipe(**kw, **music, generator=gen())
report("dancer", [type(pipe).__name__, list(both.frames.shape), list(both.keyframes.shape),
                  bool(np.isfinite(both.frames).all()), plan(pipe, height=32, width=64, num_frames=9),
                  refusals(pipe)])
for name in ("dancer-global", "dancer-local"):  # one stage alone: its DiT, no transformer_2
    stage = load(name)
    both_dit = pipe.transformer if name.endswith("global") else pipe.transformer_2
    same = all(torch.equal(v, both_dit.state_dict()[k]) for k, v in stage.transformer.state_dict().items())
    report(name, [type(stage).__name__, stage.transformer_2 is None, same])

# MOVA-360p / MOVA-720p (one architecture; 360p also runs in tests/test_mova.py): image -> frames + sound in an mp4
report("mova-360p", [type(load("mova-360p")).__name__])
for name in ("mova-720p",):
    pipe = load(name)
    res = pipe(image=media["first_frame"], prompt="a fox barks", height=32, width=48, num_frames=9, frame_rate=12.0,
               num_inference_steps=1, max_sequence_length=16, generator=gen())
    spec = importlib.util.spec_from_file_location("mova_example", {root!r} + "/examples/mova.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.write_mp4_with_audio(res.frames[0], res.audio[0], res.audio_sample_rate, 12.0, out[name])
    report(name, [type(pipe).__name__, list(res.frames.shape), list(res.audio.shape), res.audio_sample_rate,
                  plan(pipe, height=32, width=48, num_frames=9), refusals(pipe)])

# examples/<model>.py on their built-in tiny default (no model folder: a tiny release converted on the fly)
for example in ("animate2", "wan_dancer", "mova"):
    spec = importlib.util.spec_from_file_location(example + "_example", {root!r} + f"/examples/{{example}}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--tiny", "--output", out[example]])
    report("example:" + example, True)
"""


def test_converted_folders_run_in_a_fresh_interpreter(converted, tmp_path):
    """``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` without importing the package first:
    every folder loads as its pipeline and runs on the media files; VRAM plans cover each family's components;
    TeaCache and parallelism are refused with their reasons; the examples run on their tiny default."""
    folders, _, media, _ = converted
    out = {name: str(tmp_path / f"{name}.mp4") for name in ("mova-720p", "animate2", "wan_dancer", "mova")}
    proc = run_python(textwrap.dedent(OURS).format(folders={k: str(v) for k, v in folders.items()}, media=media,
                                                   out=out, root=str(ROOT)), timeout=600)
    steps = _steps(proc)
    assert proc.returncode == 0, (sorted(steps), proc.stderr[-4000:])
    a2_components = ["image_encoder", "text_encoder", "transformer", "vae"]
    for name, log_scale in (("animate2", 0.0), ("animate2-distilled", -1.3)):
        kind, scale, shape, finite, components, (teacache, parallel) = steps[name]
        assert (kind, scale, shape, finite, components) == ("WanAnimate2Pipeline", log_scale, [1, 5, 32, 32, 3], True,
                                                            a2_components), steps[name]
        assert "TeaCache is not supported for Wan2.2-Animate-2" in teacache and "reference" in parallel
    kind, frames, keyframes, finite, components, (teacache, parallel) = steps["dancer"]
    # 0.6 s of music -> keyframes at 0 and 0.53 s -> 30-fps frames 0 .. 16 in two 9-frame segments
    assert (kind, frames, keyframes, finite) == ("WanDancerPipeline", [1, 17, 32, 64, 3], [2, 3, 32, 64], True)
    assert components == ["image_encoder", "text_encoder", "transformer", "transformer_2", "vae"]
    assert "music injections" in teacache and "music" in parallel and "guidance branches" in parallel, parallel
    if "dancer:no_librosa" in steps:
        assert "pip install librosa" in steps["dancer:no_librosa"] and "\n" not in steps["dancer:no_librosa"]
    for name in ("dancer-global", "dancer-local"):
        assert steps[name] == ["WanDancerPipeline", True, True], (name, steps[name])
        assert json.loads((folders[name] / "wan_variant.json").read_text())["name"] == f"wan-{name[:6]}-14b{name[6:]}"
    assert steps["mova-360p"] == ["MovaPipeline"]
    audio_len = mova_audio_length(9, 12.0, 8000, 160) * 160
    for name in ("mova-720p",):
        kind, frames, audio, rate, components, (teacache, parallel) = steps[name]
        assert (kind, frames, audio, rate) == ("MovaPipeline", [1, 9, 32, 48, 3], [1, audio_len], 8000), steps[name]
        assert {"audio_transformer", "audio_vae", "bridge", "transformer", "transformer_2"} <= set(components)
        assert "TeaCache" in teacache and "bridge" in parallel
        assert len(read_video_file(out[name], "video")) == 9
        sound = read_audio_file(out[name], 8000)
        assert math.isclose(len(sound) / 8000, audio_len / 8000, abs_tol=0.05) and np.abs(sound).max() > 0
        assert json.loads((folders[name] / "wan_variant.json").read_text())["name"] == name
    for example in ("animate2", "wan_dancer", "mova"):
        assert steps[f"example:{example}"] is True
        assert len(read_video_file(out[example], "video")) > 1, example
    assert read_audio_file(out["mova"], 8000).size > 0 and read_audio_file(out["wan_dancer"], 22050).size > 0


@pytest.mark.parametrize("layout", ["animate2", "dancer"])
def test_truncated_release_file_is_named(converted, tmp_path, capsys, layout):
    """A truncated DiT file of the release is one line naming it (Dancer: never a silent one-stage conversion)."""
    _, releases, _, _ = converted
    src = tmp_path / releases[layout].name
    shutil.copytree(releases[layout], src)
    target = src / (ANIMATE2_RELEASE_FILE if layout == "animate2" else "local_model.safetensors")
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    heads = str(CLIP_HEADS if layout == "animate2" else 2)
    rc = main(["convert", str(src), str(tmp_path / "out"), "--dtype", "fp32", "--image-encoder-heads", heads])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "out").exists(), err
    line = next(x for x in err.splitlines() if "error:" in x)
    assert str(target) in line and "truncated" in line and "Traceback" not in err, err


def test_dancer_release_file_of_another_model_is_named(converted, tmp_path, capsys):
    """``local_model.safetensors`` that is not a Wan-Dancer DiT stops the conversion naming it; ``--variant
    wan-dancer-14b-global`` converts the global model alone."""
    _, releases, _, _ = converted
    src = tmp_path / "Wan-Dancer-14B"
    shutil.copytree(releases["dancer"], src)
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, str(src / "local_model.safetensors"))
    common = ["--dtype", "fp32", "--image-encoder-heads", "2"]
    assert main(["convert", str(src), str(tmp_path / "out"), *common]) == 2
    err = capsys.readouterr().err
    assert f"{src / 'local_model.safetensors'}:" in err and "Traceback" not in err, err
    assert main(["convert", str(src), str(tmp_path / "global"), "--variant", "wan-dancer-14b-global", *common]) == 0
    assert load_file(str(tmp_path / "global" / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_variants_lists_the_new_rows(capsys):
    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(NEW_VARIANTS) <= rows, sorted(set(NEW_VARIANTS) - rows)
