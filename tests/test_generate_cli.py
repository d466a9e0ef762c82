"""``diffusers-wan generate``: every bad invocation is one ``error:`` line and exit status 2 before any model loads;
the video is written atomically and checked; ``--lora`` changes the output; ``variants`` prints a table or JSON."""

import json
import os
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from diffusers_wan_ext_cli import main
from helpers import run_main

BASE = ["--prompt", "a fox", "--height", "32", "--width", "32", "--num-frames", "5", "--steps", "1", "--dtype", "fp32"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: every check below must happen before ``from_pretrained``."""

    def refuse(*args, **kwargs):
        raise AssertionError("DiffusionPipeline.from_pretrained was called")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input files: a png, a text file, a folder, a corrupt LoRA."""
    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(d / "first.png")
    (d / "notes.txt").write_text("not an image")
    (d / "folder").mkdir()
    (d / "bad_lora.safetensors").write_bytes(b"not a safetensors file")
    return d


def assert_one_line_error(rc, err, fragment):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    assert fragment in errors[0], errors[0]


# --------------------------------------------------------------------------------- launcher type checks
@pytest.mark.parametrize("flag,value,fragment", [
    ("--num-frames", "0", "--num-frames: 0 must be a positive integer"),
    ("--num-frames", "-5", "--num-frames: -5 must be a positive integer"),
    ("--num-frames", "nan", "--num-frames: 'nan' is not an integer"),
    ("--height", "0", "--height: 0"),
    ("--width", "-32", "--width: -32"),
    ("--steps", "0", "--steps: 0"),
    ("--fps", "0", "--fps: 0"),
    ("--seed", "-1", "--seed: -1"),
    ("--guidance-scale", "nan", "--guidance-scale: nan must be a finite number > 0"),
    ("--guidance-scale", "inf", "--guidance-scale: inf"),
    ("--guidance-scale", "0", "--guidance-scale: 0"),
    ("--guidance-scale", "-1", "--guidance-scale: -1"),
    ("--lora", "x.safetensors:nan", "the scale must be a finite number"),
    ("--lora", "x.safetensors:abc", "'abc' is not a number"),
])
def test_launcher_rejects_bad_values(flag, value, fragment, capsys, no_model_load):
    rc, err = run_main(["generate", "--model", "m", *BASE, flag, value], capsys)
    assert_one_line_error(rc, err, fragment)


# --------------------------------------------------------------------------------- folder-level checks
def test_catalogue_of_bad_invocations(converted, files, tmp_path, capsys, no_model_load):
    t2v, i2v, ti2v, flf2v = converted("t2v"), converted("i2v"), converted("ti2v"), converted("flf2v")
    configs_only = shutil.ignore_patterns("*.safetensors")  # the folder-level errors come before the weights check
    out = ["--output", str(tmp_path / "v.mp4")]
    no_index = tmp_path / "no_index"
    no_index.mkdir()
    no_vae = tmp_path / "no_vae"
    shutil.copytree(t2v, no_vae, ignore=configs_only)
    shutil.rmtree(no_vae / "vae")
    unknown = tmp_path / "unknown_pipeline"
    shutil.copytree(t2v, unknown, ignore=configs_only)
    index = json.loads((t2v / "model_index.json").read_text())
    (unknown / "model_index.json").write_text(json.dumps(dict(index, _class_name="NoSuchWanPipeline")))
    unknown_model = tmp_path / "unknown_model"
    shutil.copytree(t2v, unknown_model, ignore=configs_only)
    (unknown_model / "model_index.json").write_text(json.dumps(dict(index, transformer=["diffusers", "NoSuchModel"])))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(t2v, no_weights)
    for f in (no_weights / "transformer").glob("*.safetensors"):
        f.unlink()
    broken = tmp_path / "broken_index"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    (tmp_path / "exists.mp4").write_bytes(b"old")
    png, txt = str(files / "first.png"), str(files / "notes.txt")

    catalogue = [
        ([t2v, "--num-frames", "6"], "4n+1"),
        ([t2v, "--height", "40"], "multiple of 16"),
        ([ti2v, "--height", "48"], "multiple of 32"),  # Wan2.2 VAE: factor 16 x patch 2 (read from vae/config.json)
        ([t2v, "--image", png], "--image: WanPipeline"),
        ([t2v, "--last-image", png], "--last-image: WanPipeline"),
        ([i2v], "--image is required: WanImageToVideoPipeline"),
        ([i2v, "--image", str(files / "missing.png")], "--image: " + str(files / "missing.png") + " does not exist"),
        ([i2v, "--image", str(files / "folder")], "is not a file"),
        ([i2v, "--image", txt], "--image: " + txt + " is not an image"),
        ([flf2v, "--image", png, "--last-image", str(files / "missing.png")], "--last-image: "),
        ([i2v, "--image", png, "--last-image", png], "--last-image: the transformer of"),  # I2V, not FLF2V
        ([t2v, "--pose-video", txt], "--pose-video: only for Wan2.2-Animate"),
        ([t2v, "--video", txt], "--video: only for LongCat-Video"),
        ([no_index], "has no model_index.json"),
        ([tmp_path / "nowhere"], "--model: " + str(tmp_path / "nowhere") + " does not exist"),
        ([no_vae], "no vae/ folder"),
        ([unknown], "NoSuchWanPipeline"),
        ([unknown_model], "NoSuchModel"),
        ([broken], "model_index.json"),
        ([no_weights], "transformer has a config.json but no weights file"),
        (["someone/not-a-wan-repo"], "could not be fetched from the Hub"),  # HF_HUB_OFFLINE=1 in the tests
        ([t2v, "--lora", str(files / "missing.safetensors")], "--lora: "),
        ([t2v, "--lora", str(files / "bad_lora.safetensors")], "bad_lora.safetensors"),
        ([t2v, "--prompt", " "], "--prompt is empty"),
    ]
    for extra, fragment in catalogue:
        argv = ["generate", "--model", str(extra[0]), *BASE, *map(str, extra[1:]), *out]
        rc, err = run_main(argv, capsys)
        assert_one_line_error(rc, err, fragment)
        assert not (tmp_path / "v.mp4").exists()

    for output, fragment in [(tmp_path / "exists.mp4", "pass --overwrite"), (tmp_path / "v.gif", "must end in .mp4"),
                             (tmp_path, "is a folder")]:
        rc, err = run_main(["generate", "--model", str(t2v), *BASE, "--output", str(output)], capsys)
        assert_one_line_error(rc, err, "--output: ")
        assert fragment in err
    assert (tmp_path / "exists.mp4").read_bytes() == b"old"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_device_without_gpu(converted, tmp_path, capsys, no_model_load):
    rc, err = run_main(["generate", "--model", str(converted("t2v")), *BASE, "--device", "cuda",
                   "--output", str(tmp_path / "v.mp4")], capsys)
    assert_one_line_error(rc, err, "--device: cuda")


def test_read_only_output_folder(converted, tmp_path, capsys, no_model_load):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: chmod 0o555 does not stop writing")
        rc, err = run_main(["generate", "--model", str(converted("t2v")), *BASE, "--output", str(folder / "v.mp4")],
                      capsys)
        assert_one_line_error(rc, err, f"--output: cannot write to the folder {folder}")
    finally:
        folder.chmod(0o755)


def test_unwritable_output_folder_simulated(converted, tmp_path, capsys, monkeypatch, no_model_load):
    """Same as the read-only folder, for runs as root: the test write fails with EACCES."""
    import diffusers_wan_ext.utils.validation as validation

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(validation.tempfile, "NamedTemporaryFile", denied)
    rc, err = run_main(["generate", "--model", str(converted("t2v")), *BASE, "--output", str(tmp_path / "v.mp4")],
                       capsys)
    assert_one_line_error(rc, err, "cannot write to the folder")
    assert "Permission denied" in err


# --------------------------------------------------------------------------------- writing the video
def test_failed_write_keeps_the_old_file_and_exits_2(converted, tmp_path, capsys, monkeypatch):
    """A full disk while encoding: error, exit 2, the existing video untouched, no temporary file left."""
    import imageio.v2

    class FullDisk:
        def __init__(self, path, **kwargs):
            self.path = path

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def append_data(self, frame):
            Path(self.path).write_bytes(b"\0" * 10)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(imageio.v2, "get_writer", FullDisk)
    out = tmp_path / "v.mp4"
    out.write_bytes(b"old video")
    rc, err = run_main(["generate", "--model", str(converted("t2v")), *BASE, "--output", str(out), "--overwrite"],
                       capsys)
    assert_one_line_error(rc, err, f"could not write the video {out}")
    assert "No space left on device" in err
    assert out.read_bytes() == b"old video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_generate_overwrite_and_progress_lines(converted, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"old")
    rc, err = run_main(["generate", "--model", str(converted("t2v")), *BASE, "--output", str(out), "--overwrite"],
                       capsys)
    assert rc == 0, err
    assert "decoding" in err and f"writing 5 frames to {out}" in err
    assert iio.imread(out).shape[0] == 5


# --------------------------------------------------------------------------------- --lora
def frames_of(path):
    return iio.imread(path).astype(np.float32)


def test_lora_changes_the_output(converted, tmp_path, capsys):
    from diffusers import WanPipeline, WanTransformer3DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusers_wan_ext.lora import convert_lora_state_dict, save_lora_file

    folder = converted("t2v")
    transformer = WanTransformer3DModel.from_pretrained(folder / "transformer")
    torch.manual_seed(1)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj"]))
    layers = {k: v * 2 for k, v in get_peft_model_state_dict(transformer).items()}  # a clearly visible effect
    WanPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=layers)
    peft_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    comfy_file = tmp_path / "comfy.safetensors"
    save_lora_file(convert_lora_state_dict({f"transformer.{k}": v for k, v in layers.items()}, "original"), comfy_file)

    def generate(name, *lora):
        out = tmp_path / f"{name}.mp4"
        argv = ["generate", "--model", str(folder), *BASE, "--steps", "2", "--output", str(out), *lora]
        rc, err = run_main(argv, capsys)
        assert rc == 0, err
        return frames_of(out)

    base = generate("base")
    both = generate("both", "--lora", f"{peft_file}:3", "--lora", f"{comfy_file}:0")  # two adapters, one off
    comfy = generate("comfy", "--lora", f"{comfy_file}:3")
    assert np.abs(both - base).mean() > 4.0
    assert np.abs(comfy - both).mean() < 1.0  # the ComfyUI layout of the same LoRA (converted on load); weight 0


def test_lora_for_a_missing_component(converted, tmp_path, capsys, no_model_load):
    import safetensors.torch

    lora = tmp_path / "expert2.safetensors"
    safetensors.torch.save_file({"transformer_2.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 48),
                                 "transformer_2.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(48, 4)}, str(lora))
    rc, err = run_main(["generate", "--model", str(converted("t2v")), *BASE, "--lora", str(lora),
                   "--output", str(tmp_path / "v.mp4")], capsys)
    assert_one_line_error(rc, err, "transformer_2")


# --------------------------------------------------------------------------------- variants
def test_variants_table_and_json(capsys):
    from diffusers_wan_ext.families import FAMILIES, VARIANTS

    assert main(["variants"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["release", "id", "arch"] and set(lines[1]) <= {"-", " "}
    for family in FAMILIES:
        if family.variants:
            assert f"{family.title}:" in lines
    row = next(ln for ln in lines if ln.startswith("wan2.2-ti2v-5b "))
    assert "704x1280" in row and " 121 " in row and "WanPipeline" in row
    assert main(["variants", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [v.name for v in VARIANTS]
    assert {"family", "arch", "pipeline", "height", "width", "num_frames", "num_inference_steps"} <= set(rows[0])


def folder_with_pipeline(src, dst, class_name):
    """A copy of ``src`` (weights linked, not copied) whose model_index.json names another pipeline class."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    index = json.loads((src / "model_index.json").read_text())
    (dst / "model_index.json").unlink()
    (dst / "model_index.json").write_text(json.dumps(dict(index, _class_name=class_name)))
    return dst


def test_inputs_come_from_the_pipeline_signature(converted, files, tmp_path, capsys, no_model_load):
    """A pipeline class without a frame count (read from its ``__call__``) refuses --num-frames; custom code
    (--trust-remote-code) gets the arguments as given, and no family options."""
    from diffusers_wan_ext.cli.generate_checks import check_generate
    from diffusers_wan_ext_cli import build_parser

    t2v = converted("t2v")
    streaming = folder_with_pipeline(t2v, tmp_path / "streaming", ["diffusers_wan_ext", "WanStreamingPipeline"])
    out = str(tmp_path / "v.mp4")
    rc, err = run_main(["generate", "--model", str(streaming), *BASE, "--output", out], capsys)
    assert_one_line_error(rc, err, "--num-frames: WanStreamingPipeline takes no frame count")

    custom = folder_with_pipeline(t2v, tmp_path / "custom", ["pipeline_mine", "MyWanPipeline"])
    rc, err = run_main(["generate", "--model", str(custom), *BASE, "--output", out], capsys)
    assert_one_line_error(rc, err, "pipeline_mine.MyWanPipeline")
    args = build_parser().parse_args(["generate", "--model", str(custom), *BASE, "--output", out,
                                      "--trust-remote-code", "--image", str(files / "first.png")])
    plan = check_generate(args)
    assert plan.pipeline_class is None and plan.kwargs["num_frames"] == 5 and plan.kwargs["image"].size == (32, 32)
    rc, err = run_main(["generate", "--model", str(custom), *BASE, "--output", out, "--trust-remote-code",
                   "--pose-video", str(files / "notes.txt")], capsys)
    assert_one_line_error(rc, err, "--pose-video: only for")
