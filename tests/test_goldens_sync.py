"""The golden fixtures shipped in the repo (``tests/goldens``) are byte-identical to ``../shared/goldens``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_goldens", ROOT / "scripts" / "sync_goldens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sync_goldens = _sync_module()


@pytest.mark.skipif(not sync_goldens.SHARED.is_dir(), reason="no ../shared/goldens beside this clone to compare with")
def test_shipped_goldens_match_the_shared_set():
    diff = sync_goldens.differences()
    assert not diff, "tests/goldens is out of date (python3 scripts/sync_goldens.py): " + "; ".join(diff[:20])


def test_the_check_finds_a_changed_missing_and_extra_file(tmp_path):
    shared, shipped = tmp_path / "shared", tmp_path / "shipped"
    for folder in (shared, shipped):
        (folder / "case").mkdir(parents=True)
        (folder / "case" / "a.json").write_text("{}")
    (shared / "case" / "b.json").write_text("1")
    (shipped / "case" / "a.json").write_text("{ }")
    (shipped / "extra.json").write_text("2")
    assert sync_goldens.differences(shared, shipped) == ["missing: case/b.json", "extra: extra.json",
                                                         "differs: case/a.json"]
    sync_goldens.sync(shared, shipped)
    assert sync_goldens.differences(shared, shipped) == []
