"""Writing safely (issue 19 item 1): a claimed destination, no silent replacement, stale leftovers cleaned, SIGTERM,
umask modes, ``--overwrite`` for export-dit and LoRA files, the converter's "detected" line.

Two tests run real conversions in child processes (paused after the output is written to the temporary folder) and
kill them; they start together (module fixture) so that their imports overlap.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_wan_ext_cli import main as cli_main
from diffusers_wan_ext.lora import save_lora_file
from diffusers_wan_ext.release_converter import convert_release
from diffusers_wan_ext.utils import ConversionError
from diffusers_wan_ext.utils.atomic import atomic_output_dir, atomic_write_file, lock_path

ROOT = Path(__file__).resolve().parent.parent

#: A conversion that stops after writing the temporary folder (marker file: its path) until the "go" file exists.
PAUSED_CONVERSION = """
import sys, time
from pathlib import Path
from diffusers_wan_ext import release_converter as rc

src, dst, marker, go = sys.argv[1:5]
write = rc._write_pipeline_folder

def paused(tmp, *args, **kwargs):
    write(tmp, *args, **kwargs)
    Path(marker).write_text(str(tmp))
    while not Path(go).exists():
        time.sleep(0.05)

rc._write_pipeline_folder = paused
rc.convert_release(src, dst, dtype="fp32", progress=False)
"""


def _leftovers(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}."))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


class Paused:
    def __init__(self, src: Path, dst: Path):
        self.dst, self.marker, self.go = dst, dst.parent / "marker", dst.parent / "go"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", PAUSED_CONVERSION, str(src), str(dst), str(self.marker),
                                      str(self.go)], env=env, stderr=subprocess.PIPE, text=True)

    def wait_paused(self, timeout: float = 240.0) -> Path:
        end = time.time() + timeout
        while not self.marker.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"child exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            assert time.time() < end, "the child conversion did not reach its pause"
            time.sleep(0.1)
        return Path(self.marker.read_text())


@pytest.fixture(scope="module")
def paused_children(tiny_release, tmp_path_factory):
    src = tiny_release("t2v")
    children = {name: Paused(src, tmp_path_factory.mktemp(name) / "out") for name in ("kill", "term")}
    yield children
    for child in children.values():
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


def test_second_writer_fails_at_once_and_kill9_leftovers_are_cleaned(paused_children, tiny_release, converted, capsys):
    child = paused_children["kill"]
    tmp = child.wait_paused()
    dst, pid = child.dst, child.proc.pid
    assert tmp.name == f".out.partial-{pid}" and tmp.is_dir() and not dst.exists()
    assert lock_path(dst).read_text().split()[:2] == [str(pid), socket.gethostname()]
    for overwrite in (False, True):  # the lock holds with --overwrite too
        t0 = time.time()
        with pytest.raises(ConversionError, match=f"being written by another process \\(pid {pid} "):
            convert_release(tiny_release("t2v"), dst, overwrite=overwrite, progress=False)
        assert time.time() - t0 < 5
    capsys.readouterr()
    assert cli_main(["convert", str(tiny_release("t2v")), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"pid {pid}" in err and str(lock_path(dst)) in err

    child.proc.send_signal(signal.SIGKILL)
    child.proc.wait()
    assert tmp.is_dir() and lock_path(dst).exists()  # what kill -9 leaves
    out = convert_release(tiny_release("t2v"), dst, dtype="fp32", progress=False)
    assert _leftovers(dst) == []
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in converted("t2v").iterdir())
    assert load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_sigterm_removes_the_partial_output_and_exits_non_zero(paused_children):
    child = paused_children["term"]
    tmp = child.wait_paused()
    child.proc.send_signal(signal.SIGTERM)
    assert child.proc.wait(timeout=60) == 143
    assert not tmp.exists() and not child.dst.exists() and _leftovers(child.dst) == []


def test_sigterm_handler_is_restored(tiny_release, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    convert_release(tiny_release("t2v"), tmp_path / "out", transformer_only=True, progress=False)
    assert signal.getsignal(signal.SIGTERM) == before


def test_overwrite_replaces_only_at_the_end(tiny_release, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(ConversionError, match="already exists"):
        convert_release(tiny_release("t2v"), dst, progress=False)
    (tmp_path / "empty-release").mkdir()
    with pytest.raises(ConversionError, match="no DiT weights"):  # a failed overwrite: the old folder stays
        convert_release(tmp_path / "empty-release", dst, overwrite=True, progress=False)
    assert (dst / "old.txt").read_text() == "old" and _leftovers(dst) == []
    convert_release(tiny_release("t2v"), dst, overwrite=True, transformer_only=True, progress=False)
    assert not (dst / "old.txt").exists() and (dst / "config.json").is_file() and _leftovers(dst) == []


def test_something_that_appears_meanwhile_is_never_replaced(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match="appeared while it was being written"):
        with atomic_output_dir(dst) as tmp:
            (tmp / "ours.txt").write_text("ours")
            dst.mkdir()
            (dst / "theirs.txt").write_text("theirs")
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"] and _leftovers(dst) == []
    with atomic_output_dir(dst, overwrite=True) as tmp:  # with overwrite: replaced once complete
        (tmp / "ours.txt").write_text("ours")
        assert (dst / "theirs.txt").exists()
    assert [p.name for p in dst.iterdir()] == ["ours.txt"] and _leftovers(dst) == []
    with pytest.raises(ConversionError, match="appeared"):  # one file: the same rule
        atomic_write_file(tmp_path / "f.bin", lambda t: ((tmp_path / "f.bin").write_text("theirs"),
                                                           t.write_text("ours")))
    assert (tmp_path / "f.bin").read_text() == "theirs" and _leftovers(tmp_path / "f.bin") == []


def test_stale_lock_and_interrupted_overwrite(tiny_release, tmp_path):
    dst = tmp_path / "out"
    lock_path(dst).write_text(f"{_dead_pid()} {socket.gethostname()}\n")  # a killed writer's lock: taken over
    (tmp_path / ".out.partial-999999999").mkdir()
    convert_release(tiny_release("t2v"), dst, transformer_only=True, progress=False)
    assert (dst / "config.json").is_file() and _leftovers(dst) == []

    lock_path(dst).write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live writer's lock: refused
    with pytest.raises(ConversionError, match=f"pid {os.getpid()} "):
        convert_release(tiny_release("t2v"), dst, overwrite=True, progress=False)
    lock_path(dst).unlink()

    old = tmp_path / f".out.old-{_dead_pid()}"  # killed between moving the old folder aside and the new one in
    dst.rename(old)
    with pytest.raises(ConversionError, match="already exists"):
        convert_release(tiny_release("t2v"), dst, progress=False)
    assert (dst / "config.json").is_file() and _leftovers(dst) == []  # put back, not lost


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tiny_release, converted, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = convert_release(tiny_release("t2v"), tmp_path / "out", dtype="fp32", progress=False)
        assert cli_main(["export-dit", str(converted("t2v") / "transformer"), str(tmp_path / "dit.safetensors")]) == 0
        lora = save_lora_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 48),
                               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(48, 2)},
                              tmp_path / "lora.safetensors")
    finally:
        os.umask(previous)
    dirs = [out, *(p for p in out.rglob("*") if p.is_dir())]
    files = [p for p in out.rglob("*") if p.is_file()] + [tmp_path / "dit.safetensors", lora]
    assert {oct(p.stat().st_mode & 0o777) for p in dirs} == {oct(0o777 & ~umask)}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}


def test_export_dit_needs_overwrite(converted, tmp_path, capsys):
    dst = tmp_path / "dit.safetensors"
    dst.write_bytes(b"mine")
    args = ["export-dit", str(converted("t2v") / "transformer"), str(dst)]
    assert cli_main(args) == 2
    assert "already exists" in capsys.readouterr().err and dst.read_bytes() == b"mine"
    assert cli_main(args + ["--overwrite"]) == 0
    assert "patch_embedding.weight" in load_file(str(dst)) and _leftovers(dst) == []


def test_lora_convert_and_export_need_overwrite(tmp_path, capsys):
    src = save_lora_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 48),
                          "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.ones(48, 2)},
                         tmp_path / "src.safetensors")
    dst = tmp_path / "c.safetensors"
    dst.write_bytes(b"mine")
    convert = ["lora", "convert", str(src), str(dst), "--to", "original"]
    assert cli_main(convert) == 2 and dst.read_bytes() == b"mine"
    assert "already exists" in capsys.readouterr().err
    assert cli_main(convert + ["--overwrite"]) == 0
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in load_file(str(dst))

    folder = tmp_path / "all"
    export = ["lora", "export", str(src), str(folder), "--formats", "original", "kohya"]
    assert cli_main(export) == 0
    (folder / "lora_kohya.safetensors").write_bytes(b"mine")
    before = (folder / "lora_original.safetensors").stat().st_mtime_ns
    assert cli_main(export) == 2  # one file exists: nothing is written
    assert "lora_kohya.safetensors" in capsys.readouterr().err
    assert (folder / "lora_kohya.safetensors").read_bytes() == b"mine"
    assert (folder / "lora_original.safetensors").stat().st_mtime_ns == before
    assert cli_main(export + ["--overwrite"]) == 0 and load_file(str(folder / "lora_kohya.safetensors"))
    assert sorted(p.name for p in folder.iterdir()) == ["lora_kohya.safetensors", "lora_original.safetensors"]


def test_convert_says_what_it_detected(tiny_release, tmp_path, capsys):
    rel = tiny_release("t2v")
    assert cli_main(["convert", str(rel), str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("detected "))
    assert line.startswith("detected wan2.1-t2v-custom (t2v, width 48, 2 layers, 1 expert); ")
    for part in (f"DiT: {rel / 'diffusion_pytorch_model.safetensors'}", f"VAE: {rel / 'Wan2.1_VAE.pth'}",
                 f"text encoder: {rel / 'models_t5_umt5-xxl-enc-bf16.pth'}", "tokenizer: "):
        assert part in line
    convert_release(rel, tmp_path / "quiet", progress=False)
    assert "detected" not in capsys.readouterr().err
