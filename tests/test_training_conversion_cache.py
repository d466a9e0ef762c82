"""``--conversion_cache_dir``: a release its family converts itself (a tiny Wan2.2-Animate-2 release here) is
converted once into the cache and loaded from there by later runs with the same fingerprint; a changed release file
or option gives a new entry; an interrupted conversion leaves no complete-looking entry; one process converts while
another waits for it; an unusable folder is one error line before anything loads.  Without the option the release is
converted into a temporary folder as before."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from diffusers_wan_ext.demo import make_tiny_dataset, make_tiny_release
from diffusers_wan_ext.families import ReleaseOptions
from diffusers_wan_ext.training import main, parse_args
from diffusers_wan_ext.training import release_cache, trainer
from diffusers_wan_ext.training.components import load_training_components, model_folder
from diffusers_wan_ext.training.release_cache import CACHE_INFO, cache_key, release_fingerprint


@pytest.fixture
def release(tmp_path) -> Path:
    return make_tiny_release(tmp_path / "Wan2.2-Animate-2", arch="animate2")


@pytest.fixture
def calls(release, monkeypatch) -> list[Path]:
    """The destinations the family's converter was called with (it converts as usual)."""
    family = model_folder(release).family
    original = family.convert_release
    seen: list[Path] = []

    def counting(src, dst, options):
        seen.append(Path(dst))
        return original(src, dst, options)

    monkeypatch.setattr(family, "convert_release", counting)
    return seen


def load(release: Path, cache: Path | None, **kw):
    return load_training_components(release, dtype=torch.float32, load_encoders=False, image_encoder_heads=2,
                                     progress=True, conversion_cache_dir=cache, **kw)


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


def same_weights(a, b) -> bool:
    sd_a, sd_b = a.transformer.state_dict(), b.transformer.state_dict()
    return sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_second_run_loads_the_cached_conversion(release, calls, tmp_path, capsys):
    """The first run converts into DIR/<key> (with cache_info.json, no temporary folder left); the second converts
    nothing, says so, and gives the same components as the first and as a run without the cache."""
    cache = tmp_path / "cache"
    first = load(release, cache)
    (entry,) = entries(cache)
    assert calls == [cache / f"{entry.name}.tmp-{os.getpid()}" / "model"]  # converted beside it, then renamed
    assert entry.name.startswith("Wan2.2-Animate-2-") and ".tmp-" not in entry.name
    info = json.loads((entry / CACHE_INFO).read_text())
    assert info["fingerprint"]["release"] == str(release.resolve()) and info["created"]
    assert info["fingerprint"]["options"] == {"dtype": "fp32", "tokenizer": None, "tokenizer_files": [],
                                              "image_encoder_heads": 2, "variant": None, "transformer_only": False}
    assert (entry / info["model"] / "model_index.json").is_file()
    assert "converting it for training into" in capsys.readouterr().err

    second = load(release, cache)
    assert len(calls) == 1, "the cached entry was converted again"
    err = capsys.readouterr().err
    assert f"cached in {entry}" in err and "no conversion" in err, err
    assert second.pipeline_class == first.pipeline_class == "WanAnimate2Pipeline"
    assert same_weights(first, second)

    plain = load(release, None)  # without the option: a temporary folder, the option named once
    assert len(calls) == 2 and not str(calls[1]).startswith(str(cache))
    err = capsys.readouterr().err
    assert err.count("--conversion_cache_dir") == 1 and "removed once loaded" in err, err
    assert same_weights(first, plain) and entries(cache) == [entry]


def test_changed_release_file_gives_a_new_entry(release, calls, tmp_path, capsys):
    """A release file's mtime, then its size, changed: each time a new entry, and the message names the old one."""
    cache = tmp_path / "cache"
    load(release, cache)
    config = release / "google" / "umt5-xxl" / "tokenizer_config.json"
    st = config.stat()
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    capsys.readouterr()
    load(release, cache)
    assert len(calls) == 2 and len(entries(cache)) == 2
    err = capsys.readouterr().err
    assert "changed since the cached" in err and "new entry" in err, err
    config.write_text(config.read_text() + "\n")  # the size (and mtime) changes
    load(release, cache)
    assert len(calls) == 3 and len(entries(cache)) == 3
    load(release, cache)  # the newest fingerprint is found again
    assert len(calls) == 3


def test_fingerprint_covers_the_options(release, tmp_path):
    """The options that change the converted folder change the key; the progress flag does not."""
    family = model_folder(release).family
    key = lambda **kw: cache_key(release_fingerprint(release, family, ReleaseOptions(**{"dtype": "fp32", **kw})))
    base = key()
    assert key(progress=False) == base and key(overwrite=True) == base
    assert len({base, key(dtype="bf16"), key(image_encoder_heads=2),
                key(tokenizer=release / "google" / "umt5-xxl")}) == 4
    moved = make_tiny_release(tmp_path / "elsewhere" / "Wan2.2-Animate-2", arch="animate2")
    assert cache_key(release_fingerprint(moved, family, ReleaseOptions(dtype="fp32"))) != base


def test_interrupted_conversion_leaves_no_entry(release, calls, tmp_path, monkeypatch):
    """A converter failing after writing its output leaves nothing in the cache; the folder a killed conversion left
    (``<key>.tmp-<pid>``) is removed by the next run, which converts again."""
    cache = tmp_path / "cache"
    family = model_folder(release).family
    counting = family.convert_release

    def failing(src, dst, options):
        counting(src, dst, options)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(family, "convert_release", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        load(release, cache)
    assert len(calls) == 1 and entries(cache) == []
    key = cache_key(release_fingerprint(release, family, ReleaseOptions(dtype="fp32", image_encoder_heads=2),
                                        cache))
    killed = cache / f"{key}.tmp-999999999"
    (killed / "model").mkdir(parents=True)
    (killed / "model" / "model_index.json").write_text("{}")
    monkeypatch.setattr(family, "convert_release", counting)
    load(release, cache)
    assert len(calls) == 2 and [p.name for p in entries(cache)] == [key]
    assert (cache / key / CACHE_INFO).is_file()


def test_a_second_process_waits_for_the_conversion(release, calls, tmp_path, monkeypatch):
    """While one loader converts (holding the entry's lock), another waits and then loads the finished entry."""
    cache = tmp_path / "cache"
    messages: list[str] = []
    monkeypatch.setattr(release_cache, "progress_message", lambda text, enabled: messages.append(text))
    family = model_folder(release).family
    counting = family.convert_release
    results: dict[str, object] = {}

    def other():
        results["other"] = load(release, cache)

    waiter = threading.Thread(target=other)

    def converting_while_another_waits(src, dst, options):
        waiter.start()
        deadline = time.monotonic() + 60
        while not any("waiting for it" in m for m in messages) and time.monotonic() < deadline:
            time.sleep(0.02)
        return counting(src, dst, options)

    monkeypatch.setattr(family, "convert_release", converting_while_another_waits)
    results["first"] = load(release, cache)
    waiter.join(timeout=120)
    assert not waiter.is_alive() and "other" in results, messages
    assert len(calls) == 1 and any("waiting for it" in m for m in messages), messages
    assert any("no conversion" in m for m in messages) and len(entries(cache)) == 1
    assert same_weights(results["first"], results["other"])


def test_bad_cache_dir_is_one_error_line(release, calls, tmp_path, capsys, monkeypatch):
    """A file, a path under a file, an unwritable folder: one line naming it, before anything loads or converts."""
    file = tmp_path / "cache.txt"
    file.write_text("x")
    for bad, expected in ((file, "is a file"), (file / "sub", "is a file")):
        with pytest.raises(ValueError, match=expected) as e:
            load(release, bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    data = tmp_path / "data"
    data.mkdir()
    argv = ["--dataset_base_path", data, "--dataset_metadata_path", data / "metadata.csv", "--model_path", release,
            "--lora_base_model", "dit", "--output_path", tmp_path / "out", "--conversion_cache_dir", file]
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--conversion_cache_dir {file}" in err and "is a file" in err, err
    folder = tmp_path / "readonly"
    folder.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != folder)  # root may write anywhere
    with pytest.raises(ValueError, match="not writable") as e:
        load(release, folder)
    assert str(folder) in str(e.value)
    assert calls == [] and not (tmp_path / "out").exists()


def test_trainer_passes_the_option(release, tmp_path, monkeypatch):
    """The trainer hands ``--conversion_cache_dir`` to the loader (which the tests above cover)."""
    data = tmp_path / "data"
    make_tiny_dataset(data, num_videos=1, num_images=0)
    seen = {}

    def stop(*args, **kw):
        seen.update(kw)
        raise RuntimeError("loaded")

    monkeypatch.setattr(trainer, "load_training_components", stop)
    args = parse_args([str(a) for a in ["--dataset_base_path", data, "--dataset_metadata_path", data / "metadata.csv",
                                        "--model_path", release, "--lora_base_model", "dit", "--height", 32,
                                        "--width", 32, "--num_frames", 9, "--report_to", "none", "--output_path",
                                        tmp_path / "out", "--conversion_cache_dir", tmp_path / "cache"]])
    with pytest.raises(RuntimeError, match="loaded"):
        trainer.WanTrainer(args)
    assert seen["conversion_cache_dir"] == str(tmp_path / "cache")
