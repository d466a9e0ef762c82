"""A family converter that fails mid-conversion closes its progress bar before the error propagates: the CLI's
``error: ...`` line starts a line of stderr instead of trailing the half-drawn bar."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers_wan_ext.families.mova import make_tiny_mova_release
from diffusers_wan_ext_cli import main


def _broken_mova_release(tmp_path: Path) -> Path:
    """A tiny MOVA release whose bridge ``config.json`` lacks ``apply_cross_rope`` (the video DiTs load first, so the
    bar has advanced when the converter refuses it)."""
    release = make_tiny_mova_release(tmp_path / "MOVA-360p")
    config = release / "dual_tower_bridge" / "config.json"
    cfg = json.loads(config.read_text())
    cfg.pop("apply_cross_rope")
    config.write_text(json.dumps(cfg))
    return release


def test_mova_convert_error_starts_its_own_line(tmp_path, capsys):
    release = _broken_mova_release(tmp_path)
    assert main(["convert", str(release), str(tmp_path / "out"), "--dtype", "fp32", "--transformer-only"]) == 2
    err = capsys.readouterr().err  # "\r" kept: the bar redraws its line with it
    assert "converting" in err, err  # the bar was drawn
    lines = err.split("\n")
    errors = [line for line in lines if "error: " in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert "dual_tower_bridge/config.json" in errors[0] and "lacks apply_cross_rope" in errors[0]
    assert not (tmp_path / "out").exists()
