"""The CLI: demo (the README's main job), generate with input validation, variants."""

import imageio.v3 as iio
import pytest

from diffusers_wan_ext.cli import main


def test_demo_writes_a_real_mp4(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--output", str(out), "--workdir", str(tmp_path / "work"), "--steps", "2"]) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    frames = iio.imread(out)
    assert frames.shape[0] == 9 and frames.shape[1:3] == (64, 64)
    assert (tmp_path / "work" / "Wan2.1-T2V-tiny" / "diffusion_pytorch_model.safetensors").exists()


def test_generate(converted, tmp_path):
    folder = converted("t2v")
    out = tmp_path / "v.mp4"
    args = ["generate", "--model", str(folder), "--prompt", "a fox", "--height", "32", "--width", "32",
            "--num-frames", "5", "--steps", "2", "--dtype", "fp32", "--output", str(out)]
    assert main(args) == 0
    assert iio.imread(out).shape[0] == 5


@pytest.mark.parametrize("flag,value,message", [("--num-frames", "6", "4n+1"), ("--height", "40", "multiple of 16")])
def test_generate_rejects_bad_sizes(converted, tmp_path, capsys, flag, value, message):
    folder = converted("t2v")
    args = ["generate", "--model", str(folder), "--prompt", "a fox", "--height", "32", "--width", "32",
            "--num-frames", "5", "--steps", "1", "--dtype", "fp32", "--output", str(tmp_path / "v.mp4")]
    args[args.index(flag) + 1] = value
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


def test_variants_lists_releases(capsys):
    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    for name in ("wan2.1-t2v-1.3b", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b", "krea-realtime-video"):
        assert name in out
