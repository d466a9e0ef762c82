"""A catalogue of user mistakes across the ``diffusers-wan`` verbs and the trainer (issue 19, item 2).

Every case runs the command line in-process (``diffusers_wan_ext_cli.main([...])``; the trainer through
``examples/training/train.py``) and checks the contract: a non-zero exit status, exactly one line on stderr, starting
with ``error:``, no traceback, naming the offending argument or file -- never a traceback, a hang or a silent success.

Each case runs in a thread joined with a timeout (a FIFO case also gets a watchdog process that opens the FIFO for
writing, so a reader blocked in ``open()`` is released and the case fails instead of hanging the suite).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from diffusers_wan_ext_cli import main
from diffusers_wan_ext.conversion.dit import DitInfo
from diffusers_wan_ext.release_converter import choose_variant
from diffusers_wan_ext.training import main as train_main
from diffusers_wan_ext.utils.io import ConversionError
from diffusers_wan_ext.demo import make_tiny_dataset

from helpers import src_env

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "training" / "train.py"
TIMEOUT_S = 60


class Ctx:
    """Paths the cases build their arguments from (a tiny T2V release and its converted folder, made once)."""

    def __init__(self, tmp: Path, release: Path, t2v: Path, i2v: Path):
        self.tmp, self.release, self.t2v, self.i2v = tmp, release, t2v, i2v

    def file(self, name: str, text: str = "hello\n") -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def dir(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        path = self.tmp / name
        if path.suffix == ".safetensors":
            save_file(tensors, str(path))
        else:
            torch.save(tensors, path)
        return path

    def lora(self, name: str, value: float = 0.1) -> Path:
        a = torch.full((4, 48), value)
        return self.tensors(name, {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": a,
                                   "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(48, 4)})

    def fifo(self, name: str) -> Path:
        path = self.tmp / name
        os.mkfifo(path)
        return path

    def copy(self, src: Path, name: str) -> Path:
        return Path(shutil.copytree(src, self.tmp / name))

    def release_with(self, name: str, keep: tuple[str, ...]) -> Path:
        folder = self.dir(name)
        for item in keep:
            shutil.copy(self.release / item, folder / item)
        return folder

    def unwritable(self, name: str) -> Path:
        """A path whose parent is a regular file: no one can create it (root included)."""
        return self.file(name + "-parent") / name


# (case id, verb, build(ctx) -> (argv, text the message must name))
Case = tuple[str, Callable[[Ctx], tuple[list, str]]]

CLI_CASES: list[Case] = [
    # ------------------------------------------------------------------------------------------------- convert
    ("convert/src-missing", lambda c: (["convert", c.tmp / "no-such-release", c.tmp / "o"], "no-such-release")),
    ("convert/src-not-weights", lambda c: (["convert", c.file("notes.txt"), c.tmp / "o"], "notes.txt")),
    ("convert/src-empty-folder", lambda c: (["convert", c.dir("empty-release"), c.tmp / "o"], "empty-release")),
    ("convert/src-only-vae", lambda c: (["convert", c.release_with("only-vae", ("Wan2.1_VAE.pth",)), c.tmp / "o"],
                                        "only-vae")),
    ("convert/variant-unknown", lambda c: (["convert", c.release, c.tmp / "o", "--variant", "Wan9-bogus"],
                                           "Wan9-bogus")),
    ("convert/variant-of-another-arch", lambda c: (["convert", c.release, c.tmp / "o", "--variant",
                                                    "wan2.1-i2v-14b-480p"], "wan2.1-i2v-14b-480p")),
    ("convert/dtype-bogus", lambda c: (["convert", c.release, c.tmp / "o", "--dtype", "fp64"], "--dtype")),
    ("convert/scheduler-bogus", lambda c: (["convert", c.release, c.tmp / "o", "--scheduler", "ddim"],
                                           "--scheduler")),
    ("convert/dst-inside-src", lambda c: (["convert", c.release, c.release / "converted"], "converted")),
    ("convert/dst-existing-file", lambda c: (["convert", c.release, c.file("dst.txt")], "dst.txt")),
    ("convert/transformer-text-file", lambda c: (["convert", c.release, c.tmp / "o", "--transformer",
                                                  c.file("dit.safetensors", "not weights")], "dit.safetensors")),
    ("convert/transformer-missing", lambda c: (["convert", c.release, c.tmp / "o", "--transformer",
                                                c.tmp / "gone.safetensors"], "gone.safetensors")),
    ("convert/vae-is-a-dit", lambda c: (["convert", c.release, c.tmp / "o", "--vae",
                                         c.release / "diffusion_pytorch_model.safetensors"],
                                        "diffusion_pytorch_model.safetensors")),
    ("convert/text-encoder-wrong-keys", lambda c: (["convert", c.release, c.tmp / "o", "--text-encoder",
                                                    c.tensors("t5.safetensors", {"foo.weight": torch.ones(2)})],
                                                   "t5.safetensors")),
    ("convert/transformer-fifo", lambda c: (["convert", c.release, c.tmp / "o", "--transformer",
                                             c.fifo("dit.fifo")], "dit.fifo")),
    ("convert/image-encoder-heads-0", lambda c: (["convert", c.release, c.tmp / "o", "--image-encoder-heads", "0"],
                                                 "--image-encoder-heads")),
    ("convert/image-encoder-heads-negative", lambda c: (["convert", c.release, c.tmp / "o",
                                                         "--image-encoder-heads", "-2"], "--image-encoder-heads")),
    ("convert/tokenizer-missing", lambda c: (["convert", c.release, c.tmp / "o", "--tokenizer",
                                              c.tmp / "no-tokenizer"], "no-tokenizer")),
    ("convert/src-dash-without-model-id", lambda c: (["convert", "-", c.tmp / "o"], "--model-id")),
    ("convert/model-id-with-src", lambda c: (["convert", c.release, c.tmp / "o", "--model-id", "Wan-AI/x",
                                              "--transformer-only"], "--model-id")),
    ("convert/motion-controller-text", lambda c: (["convert", c.release, c.tmp / "o", "--motion-controller",
                                                   c.file("mc.safetensors", "x")], "mc.safetensors")),
    ("convert/relighting-lora-text", lambda c: (["convert", c.release, c.tmp / "o", "--relighting-lora",
                                                 c.file("relight.ckpt", "x")], "relight.ckpt")),
    ("convert/audio-encoder-missing", lambda c: (["convert", c.release, c.tmp / "o", "--audio-encoder",
                                                  c.tmp / "no-wav2vec"], "no-wav2vec")),
    ("convert/image-encoder-for-t2v", lambda c: (["convert", c.release, c.tmp / "o", "--image-encoder",
                                                  c.release / "Wan2.1_VAE.pth"], "--image-encoder")),
    ("convert/tokenizer-is-a-file", lambda c: (["convert", c.release, c.tmp / "o", "--tokenizer",
                                                c.file("spiece.model")], "--tokenizer")),
    ("convert/vae-empty-file", lambda c: (["convert", c.release, c.tmp / "o", "--vae", c.file("vae.pth", "")],
                                          "vae.pth")),
    ("convert/vae-fifo", lambda c: (["convert", c.release, c.tmp / "o", "--vae", c.fifo("vae.fifo")], "vae.fifo")),
    ("convert/private-without-push", lambda c: (["convert", c.release, c.tmp / "o", "--private"], "--private")),
    # ----------------------------------------------------------------------------------------------------- lora
    ("lora/info-missing", lambda c: (["lora", "info", c.tmp / "nope.safetensors"], "nope.safetensors")),
    ("lora/info-not-a-lora", lambda c: (["lora", "info", c.tensors("dit.safetensors", {"blocks.0.x": torch.ones(2)})],
                                        "dit.safetensors")),
    ("lora/info-empty", lambda c: (["lora", "info", c.tensors("empty.safetensors", {})], "empty.safetensors")),
    ("lora/info-nan", lambda c: (["lora", "info", c.lora("nan.safetensors", math.nan)], "nan.safetensors")),
    ("lora/info-text", lambda c: (["lora", "info", c.file("lora.txt")], "lora.txt")),
    ("lora/convert-to-bogus", lambda c: (["lora", "convert", c.lora("a.safetensors"), c.tmp / "b.safetensors",
                                          "--to", "sd-scripts"], "--to")),
    ("lora/convert-missing", lambda c: (["lora", "convert", c.tmp / "gone.safetensors", c.tmp / "b.safetensors",
                                         "--to", "diffusers"], "gone.safetensors")),
    ("lora/convert-not-a-lora", lambda c: (["lora", "convert", c.tensors("vae.safetensors", {"x": torch.ones(2)}),
                                            c.tmp / "b.safetensors", "--to", "kohya"], "vae.safetensors")),
    ("lora/convert-dst-unwritable", lambda c: (["lora", "convert", c.lora("a.safetensors"),
                                                c.unwritable("b.safetensors"), "--to", "kohya"], "b.safetensors")),
    ("lora/convert-dst-exists", lambda c: (["lora", "convert", c.lora("a.safetensors"), c.file("b.safetensors"),
                                            "--to", "kohya"], "b.safetensors")),
    ("lora/convert-dst-is-folder", lambda c: (["lora", "convert", c.lora("a.safetensors"), c.dir("out-folder"),
                                               "--to", "kohya"], "out-folder")),
    ("lora/export-dst-under-a-file", lambda c: (["lora", "export", c.lora("a.safetensors"),
                                                 c.file("plain.txt") / "sub"], "plain.txt")),
    ("lora/export-not-a-lora", lambda c: (["lora", "export", c.tensors("x.safetensors", {"x": torch.ones(2)}),
                                           c.tmp / "exp"], "x.safetensors")),
    ("lora/export-dst-is-file", lambda c: (["lora", "export", c.lora("a.safetensors"), c.file("exp.txt")],
                                           "exp.txt")),
    ("lora/export-nan", lambda c: (["lora", "export", c.lora("n.safetensors", math.inf), c.tmp / "exp"],
                                   "n.safetensors")),
    # ----------------------------------------------------------------------------------------------- export-dit
    ("export-dit/folder-without-weights", lambda c: (["export-dit", c.dir("no-weights"), c.tmp / "d.safetensors"],
                                                     "no-weights")),
    ("export-dit/not-a-transformer", lambda c: (["export-dit", c.tensors("v.safetensors", {"x.weight": torch.ones(2)}),
                                                 c.tmp / "d.safetensors"], "v.safetensors")),
    ("export-dit/dst-exists", lambda c: (["export-dit", c.t2v / "transformer", c.file("d.safetensors")],
                                         "d.safetensors")),
    ("export-dit/src-missing", lambda c: (["export-dit", c.tmp / "no-dit", c.tmp / "d.safetensors"], "no-dit")),
    ("export-dit/gguf-format-safetensors-dst", lambda c: (["export-dit", c.t2v / "transformer",
                                                           c.tmp / "d.safetensors", "--format", "gguf-q8_0"],
                                                          "d.safetensors")),
    ("export-dit/vae-folder", lambda c: (["export-dit", c.t2v / "vae", c.tmp / "d.safetensors"], "vae")),
    # ------------------------------------------------------------------------------------ add-motion-controller
    ("add-motion-controller/not-converted", lambda c: (["add-motion-controller", c.release,
                                                        c.lora("mc.safetensors")], "model_index.json")),
    ("add-motion-controller/i2v-folder", lambda c: (["add-motion-controller", c.i2v, c.lora("mc.safetensors")],
                                                    "i2v")),
    ("add-motion-controller/bad-file", lambda c: (["add-motion-controller", c.copy(c.t2v, "t2v-copy"),
                                                   c.tensors("mc.safetensors", {"x": torch.ones(2)})],
                                                  "mc.safetensors")),
    ("add-motion-controller/text-file", lambda c: (["add-motion-controller", c.copy(c.t2v, "t2v-copy2"),
                                                    c.file("mc.txt")], "mc.txt")),
    ("add-motion-controller/config-not-utf8", lambda c: (["add-motion-controller", bad_config(c),
                                                          c.lora("mc.safetensors")], "config.json")),
    ("add-motion-controller/dtype-bogus", lambda c: (["add-motion-controller", c.t2v, c.lora("mc.safetensors"),
                                                      "--dtype", "fp8"], "--dtype")),
    # ------------------------------------------------------------------------------------------ relighting-lora
    ("relighting-lora/not-ckpt", lambda c: (["relighting-lora", c.file("relight.ckpt", "text"), c.tmp / "rl"],
                                            "relight.ckpt")),
    ("relighting-lora/wrong-keys", lambda c: (["relighting-lora", c.tensors("r.ckpt", {"x": torch.ones(2)}),
                                               c.tmp / "rl"], "r.ckpt")),
    ("relighting-lora/dst-exists", lambda c: (["relighting-lora", c.lora("r.safetensors"), c.file("rl-out")],
                                              "rl-out")),
    ("relighting-lora/missing", lambda c: (["relighting-lora", c.tmp / "gone.ckpt", c.tmp / "rl"], "gone.ckpt")),
    # ----------------------------------------------------------------------------------------------------- demo
    ("demo/steps-0", lambda c: (["demo", "--steps", "0"], "--steps")),
    ("demo/seed-negative", lambda c: (["demo", "--seed", "-1"], "--seed")),
    ("demo/output-unwritable", lambda c: (["demo", "--output", c.unwritable("demo.mp4")], "demo.mp4")),
    ("demo/output-is-folder", lambda c: (["demo", "--output", c.dir("demo-out.mp4")], "demo-out.mp4")),
    # ------------------------------------------------------------------------------------------------- generate
    ("generate/model-missing", lambda c: (["generate", "--model", c.tmp / "no-model", "--prompt", "x",
                                           "--output", c.tmp / "v.mp4"], "no-model")),
    ("generate/steps-0", lambda c: (["generate", "--model", c.t2v, "--prompt", "x", "--steps", "0"], "--steps")),
    ("generate/guidance-nan", lambda c: (["generate", "--model", c.t2v, "--prompt", "x", "--guidance-scale", "nan"],
                                         "--guidance-scale")),
    ("generate/lora-missing", lambda c: (["generate", "--model", c.t2v, "--prompt", "x", "--lora",
                                          c.tmp / "gone.safetensors", "--output", c.tmp / "v.mp4"],
                                         "gone.safetensors")),
    ("generate/image-for-t2v-missing", lambda c: (["generate", "--model", c.i2v, "--prompt", "x", "--image",
                                                   c.tmp / "gone.png", "--output", c.tmp / "v.mp4"], "gone.png")),
    # ------------------------------------------------------------------------------------------------- variants
    ("variants/unknown-option", lambda c: (["variants", "--jsn"], "--jsn")),
    ("verb/unknown", lambda c: (["frobnicate"], "frobnicate")),
]


def bad_config(c: Ctx) -> Path:
    """A copy of the converted T2V folder whose transformer/config.json is not UTF-8."""
    folder = c.copy(c.t2v, "t2v-bad-config")
    (folder / "transformer" / "config.json").write_bytes(b'{"_class_name": "\xff"}')
    return folder


@pytest.fixture(scope="module")
def ctx_factory(tiny_release, converted):
    release, t2v, i2v = tiny_release("t2v"), converted("t2v"), converted("i2v")

    def make(tmp: Path) -> Ctx:
        return Ctx(tmp, release, t2v, i2v)

    return make


def run_cli(argv: list[str], fifo: Path | None) -> int:
    """``main(argv)`` in a thread (an argparse ``SystemExit`` becomes its code); fails on a hang."""
    out: dict = {}

    def target():
        try:
            out["rc"] = main(argv)
        except SystemExit as e:
            out["rc"] = e.code
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e

    watchdog = None
    if fifo is not None:  # opens the FIFO for writing after a while: a reader blocked in open() is released
        code = ("import os, sys, time\ntime.sleep(float(sys.argv[2]))\ntry:\n    os.close(os.open(sys.argv[1], "
                "os.O_WRONLY | os.O_NONBLOCK))\nexcept OSError:\n    sys.exit(0)\nsys.exit(3)\n")
        watchdog = subprocess.Popen([sys.executable, "-c", code, str(fifo), str(TIMEOUT_S / 2)])
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    if watchdog is not None:
        watchdog.kill() if watchdog.poll() is None else None
        assert watchdog.wait() != 3, f"hang: blocked opening the FIFO {fifo}"
    assert not thread.is_alive(), f"hang: {argv} still running after {TIMEOUT_S} s"
    if "error" in out:
        raise out["error"]
    return out["rc"]


#: cases whose mistake shows only once a file is read: the converter's "detected ..." line (and progress) may come
#: first
AFTER_PROGRESS = {"convert/vae-is-a-dit", "convert/text-encoder-wrong-keys", "convert/motion-controller-text",
                  "convert/relighting-lora-text"}


def check_contract(rc, err: str, named: str, argv, before_loading: bool = True) -> None:
    """Non-zero status, one ``error:`` line naming ``named``, no traceback; ``before_loading``: nothing else on
    stderr (the mistake was caught before any progress output)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert rc not in (0, None), f"silent success: {argv}\nstderr: {err[-2000:]}"
    assert "Traceback" not in err, err
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one 'error:' line at the end: {err[-2000:]!r}"
    assert named in errors[0], f"the message does not name {named!r}: {errors[0]}"
    if before_loading:
        assert len(lines) == 1, f"the mistake was found only after work began: {err[-2000:]!r}"


@pytest.mark.parametrize("name, case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_mistake_is_one_line(name, case, ctx_factory, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = ctx_factory(tmp_path)
    argv, named = case(ctx)
    argv = [str(a) for a in argv]
    fifo = next((Path(a) for a in argv if a.endswith(".fifo")), None)
    capsys.readouterr()
    rc = run_cli(argv, fifo)
    err = capsys.readouterr().err
    check_contract(rc, err, named, argv, before_loading=name not in AFTER_PROGRESS)


@pytest.mark.parametrize("name", ["wan2.1-t2v-14b", "wan2.1-t2v-1.3b"])
def test_variant_of_another_size_is_refused(name):
    """``--variant`` of one release size for the weights of another (14B row, 1.3B weights and back) is refused;
    tiny / custom widths may still take a row of their architecture (the other tests convert tiny releases so)."""
    sizes = {"wan2.1-t2v-14b": (12, 128, 30), "wan2.1-t2v-1.3b": (40, 128, 40)}  # the *other* size's weights
    heads, head_dim, layers = sizes[name]
    info = DitInfo(arch="t2v", config={"num_attention_heads": heads, "attention_head_dim": head_dim,
                                       "num_layers": layers, "in_channels": 16}, text_len=512)
    with pytest.raises(ConversionError, match=f"--variant {name} is a model of width"):
        choose_variant(info, 1, name, None)
    tiny = DitInfo(arch="t2v", config={"num_attention_heads": 2, "attention_head_dim": 24, "num_layers": 2,
                                       "in_channels": 16}, text_len=512)
    assert choose_variant(tiny, 1, name, None).name == name


def test_variants_json_is_a_list(capsys):
    assert main(["variants", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and rows


# --------------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad-train-data")
    make_tiny_dataset(folder, num_videos=1, num_images=0)
    return folder


TRAIN_COMMON = ["--height", "32", "--width", "32", "--num_frames", "9", "--dtype", "fp32", "--report_to", "none",
                "--max_sequence_length", "32", "--lora_base_model", "transformer"]

TRAIN_CASES: list[tuple[str, Callable[[Path, Path, Path], tuple[list, str]]]] = [
    ("missing-dataset-folder", lambda d, m, t: (["--dataset_base_path", t / "no-data", "--dataset_metadata_path",
                                                 t / "no-data" / "metadata.csv", "--model_path", m], "no-data")),
    ("metadata-without-video-column", lambda d, m, t: (["--dataset_base_path", d, "--dataset_metadata_path",
                                                        meta_without_video(d, t), "--model_path", m], "video")),
    ("lora-rank-0", lambda d, m, t: (["--dataset_base_path", d, "--dataset_metadata_path", d / "metadata.csv",
                                      "--model_path", m, "--lora_rank", "0"], "--lora_rank")),
    ("learning-rate-nan", lambda d, m, t: (["--dataset_base_path", d, "--dataset_metadata_path", d / "metadata.csv",
                                            "--model_path", m, "--learning_rate", "nan"], "--learning_rate")),
    ("model-path-missing", lambda d, m, t: (["--dataset_base_path", d, "--dataset_metadata_path", d / "metadata.csv",
                                             "--model_path", t / "no-model"], "no-model")),
    ("lr-scheduler-unknown", lambda d, m, t: ([*train_data_args(d), "--model_path", m, "--lr_scheduler", "cosin"],
                                              "--lr_scheduler")),
    ("timestep-shift-nan", lambda d, m, t: ([*train_data_args(d), "--model_path", m, "--timestep_shift", "nan"],
                                            "--timestep_shift")),
    ("max-sequence-length-0", lambda d, m, t: ([*train_data_args(d), "--model_path", m, "--max_sequence_length",
                                                "0"], "--max_sequence_length")),
    ("report-to-unknown", lambda d, m, t: ([*train_data_args(d), "--model_path", m, "--report_to", "wandbx"],
                                           "--report_to")),
    ("lr-warmup-negative", lambda d, m, t: ([*train_data_args(d), "--model_path", m, "--lr_warmup_steps", "-5"],
                                            "--lr_warmup_steps")),
    ("fp8-models-unknown", lambda d, m, t: ([*train_data_args(d), "--model_path", m, "--fp8_models", "foo"],
                                            "--fp8_models")),
    ("lora-checkpoint-missing", lambda d, m, t: ([*train_data_args(d), "--model_path", m, "--lora_checkpoint",
                                                  t / "gone.safetensors"], "gone.safetensors")),
    ("lora-checkpoint-not-a-lora", lambda d, m, t: ([*train_data_args(d), "--model_path", m, "--lora_checkpoint",
                                                     not_a_lora(t)], "x.safetensors")),
    ("model-index-not-utf8", lambda d, m, t: ([*train_data_args(d), "--model_path", bad_index(m, t)],
                                              "model_index.json")),
    ("extra-inputs-unknown", lambda d, m, t: (["--dataset_base_path", d, "--dataset_metadata_path",
                                               d / "metadata.csv", "--model_path", m, "--extra_inputs", "bogus"],
                                              "--extra_inputs")),
]


def train_data_args(data: Path) -> list:
    return ["--dataset_base_path", data, "--dataset_metadata_path", data / "metadata.csv"]


def not_a_lora(tmp: Path) -> Path:
    save_file({"x": torch.ones(2)}, str(tmp / "x.safetensors"))
    return tmp / "x.safetensors"


#: training cases found only once the model is loaded (its progress lines come first)
TRAIN_AFTER_LOADING = {"lora-checkpoint-not-a-lora"}


def bad_index(model: Path, tmp: Path) -> Path:
    """A copy of the converted folder whose model_index.json is not UTF-8."""
    folder = Path(shutil.copytree(model, tmp / "model-bad-index"))
    (folder / "model_index.json").write_bytes(b'{"_class_name": "\xff"}')
    return folder


def meta_without_video(data: Path, tmp: Path) -> Path:
    path = tmp / "metadata-no-video.csv"
    path.write_text("clip,prompt\nvideo_0.mp4,a clip\n")
    return path


@pytest.mark.parametrize("name, case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_mistake_is_one_line(name, case, train_data, converted, tmp_path, capsys):
    """In-process through the entry point of ``examples/training/train.py`` (``diffusers_wan_ext.training.main``)."""
    argv, named = case(train_data, converted("t2v"), tmp_path)
    argv = [str(a) for a in [*TRAIN_COMMON, *argv, "--output_path", tmp_path / "out"]]  # the case's values last
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train_main(argv)
    err = "\n".join(line for line in capsys.readouterr().err.splitlines()
                    if " INFO " not in line and " WARNING " not in line)  # the trainer's log lines
    check_contract(exit_.value.code, err, named, argv, before_loading=name not in TRAIN_AFTER_LOADING)


def test_train_script_mistake_is_one_line(train_data, converted, tmp_path):
    """The script itself, in a fresh interpreter: an argument error is one line, exit status 2."""
    argv = [TRAIN, "--dataset_base_path", train_data, "--dataset_metadata_path", train_data / "metadata.csv",
            "--model_path", converted("t2v"), "--lora_rank", "0", *TRAIN_COMMON, "--output_path", tmp_path / "out"]
    argv = [str(a) for a in argv]
    proc = subprocess.run([sys.executable, *argv], env=src_env(), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    check_contract(proc.returncode, proc.stderr, "--lora_rank", argv)
