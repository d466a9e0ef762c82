"""The CLI: demo (the README's main job), generate with input validation, variants."""

import imageio.v3 as iio
import pytest

from diffusers_wan_ext_cli import main


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


def test_convert_model_id_and_push_to_hub_use_the_hub_clients(tiny_release, tmp_path, monkeypatch):
    """--model-id fetches the release (ModelScope, else the Hub) and --push-to-hub uploads the converted folder;
    both clients are replaced by local fakes here (no network), the conversion itself is real."""
    import sys
    import types

    import huggingface_hub

    calls = {}
    monkeypatch.setitem(sys.modules, "modelscope", None)  # not installed -> the Hub client is used
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, cache_dir=None: calls.setdefault("download", repo_id) and str(tiny_release("t2v")))

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=True):
            calls["create"] = (repo_id, private)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message=""):
            from pathlib import Path

            calls["uploaded"] = sorted(p.name for p in Path(folder_path).iterdir())

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    dst = tmp_path / "out"
    assert main(["convert", "-", str(dst), "--model-id", "Wan-AI/Wan2.1-T2V-1.3B", "--dtype", "fp32",
                 "--push-to-hub", "me/wan-tiny"]) == 0
    assert calls["download"] == "Wan-AI/Wan2.1-T2V-1.3B" and calls["create"] == ("me/wan-tiny", False)
    assert "model_index.json" in calls["uploaded"] and "README.md" in calls["uploaded"]
