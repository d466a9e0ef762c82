"""``diffusers-wan generate`` with the inputs the families declare (``GenerateInput``): Fun Control's
``--control-video``, Fun Control-Camera's ``--camera-direction``, S2V's ``--audio`` -- real files, tiny folders."""

from __future__ import annotations

import wave

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from diffusers_wan_ext_cli import main
from diffusers_wan_ext.demo import TINY, write_video
from diffusers_wan_ext.release_converter import convert_release

COMMON = ["--prompt", "a fox", "--steps", "2", "--dtype", "fp32", "--seed", "0"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    frames = rng.random((5, 32, 32, 3)).astype(np.float32)
    write_video(list(frames), root / "control.mp4", fps=16)
    Image.fromarray((frames[0] * 255).astype(np.uint8)).save(root / "image.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "speaker.png")
    with wave.open(str(root / "speech.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((rng.standard_normal(16000 * 5 + 3200) * 3000).astype(np.int16).tobytes())
    return root


def _folder(tiny_release, tmp_path_factory, arch):
    dst = tmp_path_factory.mktemp(arch) / "converted"
    return convert_release(tiny_release(arch), dst, dtype="fp32", progress=False,
                           image_encoder_heads=TINY["clip_heads"])


def test_fun_control_video_from_a_file(tiny_release, tmp_path_factory, media, tmp_path):
    folder = _folder(tiny_release, tmp_path_factory, "fun-control")
    out = tmp_path / "control.mp4"
    assert main(["generate", "--model", str(folder), "--control-video", str(media / "control.mp4"), "--height", "32",
                 "--width", "32", "--num-frames", "5", "--output", str(out), *COMMON]) == 0
    assert iio.imread(out).shape[0] == 5


def test_fun_camera_direction(tiny_release, tmp_path_factory, media, tmp_path, capsys):
    folder = _folder(tiny_release, tmp_path_factory, "fun-camera")
    out = tmp_path / "camera.mp4"
    assert main(["generate", "--model", str(folder), "--image", str(media / "image.png"), "--camera-direction", "Left",
                 "--camera-speed", "0.02", "--height", "32", "--width", "32", "--num-frames", "5", "--output",
                 str(out), *COMMON]) == 0
    assert out.stat().st_size > 0
    # a family option on another family's folder: one line, before loading
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--image", str(media / "image.png"), "--audio",
                 str(media / "speech.wav"), "--output", str(tmp_path / "x.mp4"), *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--audio" in err[0]


def test_s2v_audio_file_and_a_too_small_size(tiny_release, tmp_path_factory, media, tmp_path, capsys):
    folder = _folder(tiny_release, tmp_path_factory, "s2v")
    capsys.readouterr()
    # 32 px is below what the motion-frame packer's 4x group reads: one line, no traceback
    assert main(["generate", "--model", str(folder), "--image", str(media / "speaker.png"), "--audio",
                 str(media / "speech.wav"), "--height", "32", "--width", "32", "--output", str(tmp_path / "s.mp4"),
                 *COMMON]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert err and "motion-frame packer" in err[0]
