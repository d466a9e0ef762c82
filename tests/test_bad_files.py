"""Bad input files (issue 19, item 2): each one is refused with one line naming the file and what is wrong with it --
a ``ValueError`` or ``ConversionError``, never a traceback from deep inside a reader, a hang or a silently wrong
result -- and the odd but valid images (16-bit, 1x1, grayscale, palette, alpha, EXIF-rotated) load correctly.

Every case runs in a thread joined with a timeout, so a reader that blocks fails the test instead of hanging the
suite; for FIFO cases a watchdog process opens the FIFO for writing after the timeout, which releases a reader blocked
in ``open()`` even when it holds the GIL (the old ``safetensors`` route did: the whole process hung).
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import threading
import wave
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from diffusers_wan_ext.lora.convert import load_lora_file
from diffusers_wan_ext.lora.loader import WanLoraInteropMixin
from diffusers_wan_ext.pipelines.s2v_conditioning import load_audio, load_pose_video
from diffusers_wan_ext.utils.io import ConversionError, load_state_dict, read_json
from diffusers_wan_ext.utils.media import load_image, load_video_frames, read_image_file, read_video_file

TIMEOUT_S = 30


# Opens the FIFO for writing after a delay, from another process: a reader blocked in open() -- even one holding the
# GIL, as a native reader can -- gets a writer and then EOF.  Exit status 3 means a reader was blocked.
_FIFO_WATCHDOG = (
    "import os, sys, time\n"
    "time.sleep(float(sys.argv[2]))\n"
    "try:\n    os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))\nexcept OSError:\n    sys.exit(0)\n"
    "sys.exit(3)\n"
)


def run_bounded(fn: Callable[[], Any], unblock: Path | None = None) -> tuple[Any, BaseException | None]:
    """``fn()`` in a thread: ``(result, exception)``; fails the test if it has not returned after ``TIMEOUT_S`` or
    if it blocked opening the FIFO ``unblock`` (released by a watchdog process)."""
    out: dict[str, Any] = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            out["error"] = e

    watchdog = None
    if unblock is not None:
        watchdog = subprocess.Popen([sys.executable, "-c", _FIFO_WATCHDOG, str(unblock), str(TIMEOUT_S)])
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S + 5)
    blocked = False
    if watchdog is not None:
        if watchdog.poll() is None:
            watchdog.kill()
        blocked = watchdog.wait() == 3
    if thread.is_alive() or blocked:
        pytest.fail(f"reading {unblock or 'the file'} did not return within {TIMEOUT_S} s (it blocks)")
    return out.get("value"), out.get("error")


def assert_clear_error(fn: Callable[[], Any], path: Path, unblock: Path | None = None, match: str | None = None):
    value, err = run_bounded(fn, unblock)
    assert err is not None, f"{path.name}: no error; returned {type(value).__name__}"
    assert type(err) in (ValueError, ConversionError), f"{type(err).__name__}: {err}"
    msg = str(err)
    assert path.name in msg, f"message does not name the file: {msg}"
    assert "\n" not in msg, f"not one line: {msg!r}"
    if match is not None:  # in what the message says, not in the (test-named) folder
        said = msg.replace(str(path.parent), "")
        assert match.lower() in said.lower(), f"{match!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------------------------------------- file makers


def png_bytes(arr: np.ndarray, color_type: int, bit_depth: int = 16, size: tuple[int, int] | None = None) -> bytes:
    """A PNG with ``bit_depth``-bit samples (which PIL cannot write for RGB / RGBA): 0 gray, 2 RGB, 4 gray+alpha,
    6 RGBA; ``size`` (width, height) overrides the size the header announces."""
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[y].astype(dtype).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", *(size or (w, h)), bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def unix_socket(tmp: Path, name: str) -> Path:
    # AF_UNIX paths are limited to ~100 bytes: bind in a short cwd-relative name, then the path is tmp / name
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(name)
    finally:
        os.chdir(cwd)
    s.close()  # the socket file stays
    return tmp / name


def safetensors_file(path: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    save_file(tensors or {"blocks.0.weight": torch.ones(64, 64)}, str(path))
    return path


def truncated(path: Path, keep: float | int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    return path


def wav_file(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


def _weights_cases(tmp: Path) -> dict[str, tuple[Path, str | None, Path | None]]:
    """name -> (file, expected word in the message, FIFO to release)."""
    cases = {}
    cases["fifo.safetensors"] = (fifo(tmp / "p.safetensors"), "fifo", tmp / "p.safetensors")
    cases["fifo.pth"] = (fifo(tmp / "p.pth"), "fifo", tmp / "p.pth")
    zero = tmp / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    cases["dev_zero_link.safetensors"] = (zero, "device", None)
    zero_pth = tmp / "zero.pth"
    zero_pth.symlink_to("/dev/zero")
    cases["dev_zero_link.pth"] = (zero_pth, "device", None)
    (tmp / "dir.safetensors").mkdir()
    cases["dir.safetensors"] = (tmp / "dir.safetensors", "directory", None)
    cases["socket.safetensors"] = (unix_socket(tmp, "s.safetensors"), "socket", None)
    cases["empty.safetensors"] = (write(tmp / "e.safetensors", b""), "empty", None)
    cases["truncated_data.safetensors"] = (truncated(safetensors_file(tmp / "t1.safetensors"), 0.5), "truncated", None)
    cases["truncated_header.safetensors"] = (truncated(safetensors_file(tmp / "t2.safetensors"), 20), "truncated", None)
    cases["text.safetensors"] = (write(tmp / "text.safetensors", b"hello, this is not a weights file\n"), None, None)
    cases["nan.safetensors"] = (
        safetensors_file(tmp / "nan.safetensors", {"ok": torch.ones(3), "blocks.0.bad": torch.tensor([1.0, float("nan")])}),
        "blocks.0.bad", None,
    )
    cases["inf_bf16.safetensors"] = (
        safetensors_file(tmp / "inf.safetensors", {"head.w": torch.tensor([float("inf"), 0.0], dtype=torch.bfloat16)}),
        "head.w", None,
    )
    nan_pth = tmp / "nan.pth"
    torch.save({"blocks.1.w": torch.tensor([0.0, float("-inf")])}, nan_pth)
    cases["inf.pth"] = (nan_pth, "blocks.1.w", None)
    obj = tmp / "object.pth"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1)}, obj)
    cases["needs_weights_only_false.pth"] = (obj, "weights_only", None)
    legacy_trunc = tmp / "legacy_truncated.pth"
    torch.save({"w": torch.ones(256)}, legacy_trunc, _use_new_zipfile_serialization=False)
    cases["legacy_truncated.pth"] = (truncated(legacy_trunc, 0.5), "truncated", None)
    zip_trunc = tmp / "zip_truncated.pth"
    torch.save({"w": torch.ones(256)}, zip_trunc)
    cases["zip_truncated.pth"] = (truncated(zip_trunc, 0.5), None, None)
    cases["text.pth"] = (write(tmp / "text.pth", b"not a pickle at all\n"), None, None)
    cases["empty.pth"] = (write(tmp / "e.pth", b""), "empty", None)
    index = tmp / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": {"caf\xe9": "a.safetensors"}}')
    cases["latin1.safetensors.index.json"] = (index, "utf-8", None)
    return cases


WEIGHT_CASES = [
    "fifo.safetensors", "fifo.pth", "dev_zero_link.safetensors", "dev_zero_link.pth", "dir.safetensors",
    "socket.safetensors", "empty.safetensors", "truncated_data.safetensors", "truncated_header.safetensors",
    "text.safetensors", "nan.safetensors", "inf_bf16.safetensors", "inf.pth", "needs_weights_only_false.pth",
    "legacy_truncated.pth", "zip_truncated.pth", "text.pth", "empty.pth", "latin1.safetensors.index.json",
]


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_bad_weights_file(tmp_path, case):
    path, word, unblock = _weights_cases(tmp_path)[case]
    msg = assert_clear_error(lambda: load_state_dict(path), path, unblock, word)
    assert "mmap" not in msg  # what is wrong with the file, not how a memory map failed


LORA_CASES = [
    "fifo.safetensors", "dev_zero_link.safetensors", "dir.safetensors", "empty.safetensors",
    "truncated_data.safetensors", "nan.safetensors", "needs_weights_only_false.pth", "text.safetensors",
]


@pytest.mark.parametrize("case", LORA_CASES)
@pytest.mark.parametrize("reader", ["load_lora_file", "lora_state_dict"])
def test_bad_lora_file(tmp_path, case, reader):
    path, word, unblock = _weights_cases(tmp_path)[case]
    if case == "dir.safetensors":
        word = None  # a folder is a LoRA location: the message says which file it lacks
    if reader == "load_lora_file":
        fn = lambda: load_lora_file(path)  # noqa: E731
    else:
        fn = lambda: WanLoraInteropMixin.lora_state_dict(str(path))  # noqa: E731
    assert_clear_error(fn, path, unblock, word)


def test_legacy_torch_pickle_loads(tmp_path):
    """An old-format (non-zip) ``torch.save`` file is a valid state dict: it loads (without mmap)."""
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict(path)["w"], torch.arange(4.0))


def test_finite_check_can_be_skipped(tmp_path):
    path = safetensors_file(tmp_path / "nan.safetensors", {"w": torch.tensor([float("nan")])})
    assert torch.isnan(load_state_dict(path, check_finite=False)["w"]).all()


# ----------------------------------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("name", ["model_index.json", "config.json", "wan_variant.json"])
def test_non_utf8_json(tmp_path, name):
    path = write(tmp_path / name, b'{"_class_name": "Wan\xff\xfe"}')
    assert_clear_error(lambda: read_json(path), path, match="utf-8")
    bad = write(tmp_path / ("x" + name), b'{"a": 1,,}')
    assert_clear_error(lambda: read_json(bad), bad, match="json")
    fifo_json = fifo(tmp_path / ("p_" + name))
    assert_clear_error(lambda: read_json(fifo_json), fifo_json, fifo_json, "fifo")


def test_non_utf8_config_of_release_folders(tmp_path):
    """The converter's readers of a release's ``config.json`` (DiT, Wav2Vec2) name the file."""
    from diffusers_wan_ext.conversion.audio_encoder import load_audio_encoder_from_release
    from diffusers_wan_ext.conversion.dit import locate_dit

    dit = tmp_path / "dit"
    dit.mkdir()
    safetensors_file(dit / "diffusion_pytorch_model.safetensors")
    cfg = write(dit / "config.json", b'{"dim": 1536, "name": "caf\xe9"}')
    assert_clear_error(lambda: locate_dit(dit), cfg, match="utf-8")
    wav2vec = tmp_path / "wav2vec2-large-xlsr-53-english"
    wav2vec.mkdir()
    cfg = write(wav2vec / "config.json", b'{"model_type": "wav2vec2\xff"}')
    assert_clear_error(lambda: load_audio_encoder_from_release(wav2vec), cfg, match="utf-8")


# ----------------------------------------------------------------------------------------------------- images


def _image_cases(tmp: Path) -> dict[str, tuple[Path, Path | None]]:
    cases = {}
    cases["text.png"] = (write(tmp / "text.png", b"this is a text file, not a PNG\n"), None)
    cases["empty.png"] = (write(tmp / "e.png", b""), None)
    good = tmp / "good.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    cases["truncated.png"] = (truncated(good, 0.5), None)
    jpg = tmp / "good.jpg"
    PIL.Image.new("RGB", (64, 64), (10, 200, 30)).save(jpg, quality=95)
    cases["truncated.jpg"] = (truncated(jpg, 0.4), None)
    cases["fifo.png"] = (fifo(tmp / "p.png"), tmp / "p.png")
    (tmp / "dir.png").mkdir()
    cases["dir.png"] = (tmp / "dir.png", None)
    # a PNG header announcing 60000 x 60000 pixels (a decompression bomb)
    bomb = png_bytes(np.zeros((1, 1), np.uint8), 0, 8, size=(60000, 60000))
    cases["bomb.png"] = (write(tmp / "bomb.png", bomb), None)
    return cases


IMAGE_CASES = {"text.png": "not an image", "empty.png": "empty", "truncated.png": "truncated",
               "truncated.jpg": "truncated", "fifo.png": "fifo", "dir.png": "directory", "bomb.png": "too large"}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_image_file(tmp_path, case):
    path, unblock = _image_cases(tmp_path)[case]
    assert_clear_error(lambda: load_image(path, 16, 16), path, unblock, IMAGE_CASES[case])


def _to_u8(t: torch.Tensor) -> np.ndarray:
    """``[1, 3, H, W]`` in [-1, 1] -> uint8 ``[H, W, 3]`` (the inverse of ``x * 2/255 - 1``)."""
    return np.round((t[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.int64)


VALUES_16 = np.array([0, 1, 255, 256, 1000, 4095, 12345, 32767, 32896, 40000, 60000, 65279, 65535], np.uint16)


def _check_scaled(got: np.ndarray, values: np.ndarray):
    expected = values.astype(np.float64) * 255 / 65535
    assert np.abs(got - expected).max() <= 1, (got, np.round(expected))
    assert got[values.tolist().index(1000)] <= 4  # not saturated to 255
    assert got[-1] == 255 and got[0] == 0


@pytest.mark.parametrize("color_type", [0, 2, 4, 6], ids=["gray16", "rgb16", "gray_alpha16", "rgba16"])
def test_16bit_png_is_scaled_to_8bit(tmp_path, color_type):
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    w = len(VALUES_16)
    arr = np.repeat(VALUES_16[None, :, None], channels, axis=2)
    if channels in (2, 4):
        arr[..., -1] = 65535  # opaque
    path = write(tmp_path / "sixteen.png", png_bytes(arr if channels > 1 else arr[..., 0], color_type))
    got = _to_u8(load_image(path, 1, w))[0]  # [W, 3]
    for c in range(3):
        _check_scaled(got[:, c], VALUES_16)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16bit_pil_image_is_scaled(mode):
    image = PIL.Image.fromarray(VALUES_16[None, :].astype(np.uint16 if mode == "I;16" else np.int32))
    assert image.mode == mode
    got = _to_u8(load_image(image, 1, len(VALUES_16)))[0]
    _check_scaled(got[:, 0], VALUES_16)
    frames = load_video_frames([image] * 5, 5, 1, len(VALUES_16))
    _check_scaled(_to_u8(frames[:, :, 0])[0][:, 0], VALUES_16)


def test_one_pixel_image_is_resized(tmp_path):
    path = tmp_path / "one.png"
    PIL.Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    t = load_image(path, 16, 24)
    assert t.shape == (1, 3, 16, 24)
    assert torch.equal(t[0, :, 5, 7], torch.tensor([1.0, -1.0, -1.0]))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "P_transparency", "RGBA", "1", "CMYK"])
def test_non_rgb_images_become_rgb(tmp_path, mode):
    rgb = PIL.Image.new("RGB", (8, 8), (204, 204, 204))  # a gray of the web palette
    if mode == "P_transparency":
        image = rgb.convert("P")
        image.info["transparency"] = 0
        path = tmp_path / "img.png"
    elif mode == "CMYK":
        image, path = rgb.convert("CMYK"), tmp_path / "img.jpg"
    else:
        image, path = rgb.convert(mode), tmp_path / "img.png"
    image.save(path)
    expected = np.asarray(PIL.Image.open(path).convert("RGBA").convert("RGB"), dtype=np.int64)
    got = _to_u8(load_image(path, 8, 8))
    assert np.abs(got - expected).max() <= 1
    assert got[..., 0].tolist() == got[..., 1].tolist() == got[..., 2].tolist()  # gray stays gray


def test_exif_orientation_is_applied(tmp_path):
    """A photo stored landscape with EXIF orientation 6 (rotate 90 clockwise to display) loads as displayed."""
    arr = np.zeros((4, 8, 3), np.uint8)
    arr[:, :4] = (255, 0, 0)  # left half red, right half blue as stored
    arr[:, 4:] = (0, 0, 255)
    stored = PIL.Image.fromarray(arr)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif)
    image = read_image_file(path)
    assert image.size == (4, 8)  # displayed: portrait
    t = load_image(path, 8, 4)
    assert torch.equal(t[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # stored left (red) is now the top
    assert torch.equal(t[0, :, 7, 0], torch.tensor([-1.0, -1.0, 1.0]))


# ----------------------------------------------------------------------------------------------------- videos


def _tiny_video(path: Path, frames: int = 5) -> Path:
    import imageio.v2 as imageio

    with imageio.get_writer(str(path), fps=16, macro_block_size=1) as w:
        for i in range(frames):
            w.append_data(np.full((16, 16, 3), i * 40, np.uint8))
    return path


def _ffmpeg_file(path: Path, *args: str) -> Path:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", *args, str(path)], check=True,
                   capture_output=True)
    return path


def _video_cases(tmp: Path) -> dict[str, tuple[Path, Path | None]]:
    cases = {}
    cases["empty.mp4"] = (write(tmp / "e.mp4", b""), None)
    cases["text.mp4"] = (write(tmp / "text.mp4", b"not a video\n" * 10), None)
    cases["png_named.mp4"] = (write(tmp / "png.mp4", png_bytes(np.zeros((4, 4), np.uint8), 0, 8)), None)
    cases["truncated.mp4"] = (truncated(_tiny_video(tmp / "t.mp4"), 0.3), None)
    cases["no_video_stream.mp4"] = (
        _ffmpeg_file(tmp / "audio_only.mp4", "-i", "anullsrc=r=16000:cl=mono", "-t", "0.2", "-c:a", "aac"), None)
    cases["zero_frames.mp4"] = (
        _ffmpeg_file(tmp / "zero.mp4", "-i", "color=c=black:s=16x16:r=16", "-frames:v", "0", "-c:v", "libx264"), None)
    cases["fifo.mp4"] = (fifo(tmp / "p.mp4"), tmp / "p.mp4")
    (tmp / "dir.mp4").mkdir()
    cases["dir.mp4"] = (tmp / "dir.mp4", None)
    return cases


VIDEO_CASES = {"empty.mp4": "empty", "text.mp4": "invalid data", "png_named.mp4": "png image",
               "truncated.mp4": "moov atom not found", "no_video_stream.mp4": "no video stream",
               "zero_frames.mp4": "no video stream", "fifo.mp4": "fifo", "dir.mp4": "directory"}


@pytest.mark.parametrize("case", list(VIDEO_CASES))
@pytest.mark.parametrize("reader", ["load_video_frames", "load_pose_video"])
def test_bad_video_file(tmp_path, case, reader):
    path, unblock = _video_cases(tmp_path)[case]
    if reader == "load_video_frames":
        fn = lambda: load_video_frames(path, 5, 16, 16)  # noqa: E731
    else:
        fn = lambda: load_pose_video(path, 16, 16)  # noqa: E731
    assert_clear_error(fn, path, unblock, VIDEO_CASES[case])


def test_good_video_file_reads(tmp_path):
    path = _tiny_video(tmp_path / "ok.mp4")
    frames = read_video_file(path, "video")
    assert len(frames) == 5 and frames[0].size == (16, 16) and frames[0].mode == "RGB"
    assert len(read_video_file(path, "video", max_frames=2)) == 2
    gif = tmp_path / "ok.gif"
    images = [PIL.Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(4)]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=1000 / 32)  # 32 fps
    frames = read_video_file(gif, "video", fps=16)  # every 2nd frame
    assert len(frames) == 2 and frames[0].mode == "RGB"


# ----------------------------------------------------------------------------------------------------- audio


def _audio_cases(tmp: Path) -> dict[str, tuple[Path, Path | None]]:
    cases = {}
    cases["text.wav"] = (write(tmp / "text.wav", b"not audio at all\n" * 10), None)
    cases["empty.wav"] = (write(tmp / "e.wav", b""), None)
    cases["no_samples.wav"] = (wav_file(tmp / "silent.wav", np.zeros(0)), None)
    cases["truncated_header.wav"] = (truncated(wav_file(tmp / "th.wav", np.zeros(100)), 20), None)
    cases["png_named.wav"] = (write(tmp / "png.wav", png_bytes(np.zeros((4, 4), np.uint8), 0, 8)), None)
    cases["text.mp3"] = (write(tmp / "text.mp3", b"not audio at all\n" * 10), None)
    cases["fifo.wav"] = (fifo(tmp / "p.wav"), tmp / "p.wav")
    (tmp / "dir.wav").mkdir()
    cases["dir.wav"] = (tmp / "dir.wav", None)
    return cases


AUDIO_CASES = {"text.wav": "invalid data", "empty.wav": "empty", "no_samples.wav": "no audio samples",
               "truncated_header.wav": "invalid data", "png_named.wav": "no audio stream", "text.mp3": "cannot decode",
               "fifo.wav": "fifo", "dir.wav": "directory"}


@pytest.mark.parametrize("case", list(AUDIO_CASES))
def test_bad_audio_file(tmp_path, case):
    path, unblock = _audio_cases(tmp_path)[case]
    assert_clear_error(lambda: load_audio(path), path, unblock, AUDIO_CASES[case])


def test_good_wav_reads(tmp_path):
    path = wav_file(tmp_path / "ok.wav", np.full(1600, 16384))
    x = load_audio(path)
    assert x.shape == (1600,) and np.allclose(x, 0.5)
