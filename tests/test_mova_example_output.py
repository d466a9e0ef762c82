"""examples/mova.py (and examples/animate2.py, which imports Diffusers itself) print no warning on their tiny default.

MOVA's example used to cast the two VAEs with ``.to(torch.float32)`` after loading, and Diffusers 0.42's
``ModelMixin.to`` warns "There are modules in AutoencoderDac that should be kept in float32: []" on every dtype cast;
the VAEs now load in float32 through the per-component ``dtype`` mapping of ``from_pretrained``.  The Animate-2
example imported Diffusers before this package, so bitsandbytes' / torchao's import-time lines (which the package
drops when it is imported first, :mod:`diffusers_wan_ext.utils.import_noise`) reached stderr.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import ROOT, src_env

#: tqdm progress bars (stderr) are the only expected output there
PROGRESS = re.compile(r"(\d+/\d+ \[|it/s\]|s/it\])")


def _stderr_lines(example: str, tmp_path) -> list[str]:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{example}.py"), "--tiny", "--output",
                           str(tmp_path / f"{example}.mp4")], cwd=tmp_path, env=src_env(HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / f"{example}.mp4").stat().st_size > 0
    lines = proc.stderr.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not PROGRESS.search(line)]


@pytest.mark.parametrize("example", ["mova", "animate2"])
def test_example_tiny_default_prints_no_warning(example, tmp_path):
    assert _stderr_lines(example, tmp_path) == []
