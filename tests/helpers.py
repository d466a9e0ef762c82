"""Shared helpers for tests: tiny original-layout releases built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def src_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that imports this checkout: ``src`` first on ``PYTHONPATH``, the caller's
    ``PYTHONPATH`` kept after it (on the GPU machine Diffusers is installed into a folder named there), plus
    ``extra`` variables."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


def run_python(code: str, cwd: str | os.PathLike | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (no package imported beforehand); return the completed process."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd or ROOT, env=src_env(HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=timeout)


def run_interpreted(script: str, expect: str, timeout: int = 300) -> None:
    """Run ``script`` in a fresh interpreter with ``TRITON_INTERPRET=1`` (set before Triton is imported); it must
    exit cleanly and print ``expect``."""
    proc = subprocess.run([sys.executable, "-c", script], env=src_env(TRITON_INTERPRET="1"), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert expect in proc.stdout, proc.stdout


def flash4_stand_in_modules(forward) -> dict[str, types.ModuleType]:
    """``sys.modules`` entries that make ``from flash_attn.cute import interface`` give a stand-in whose
    ``_flash_attn_fwd`` is ``forward`` (the real package needs a Hopper/Blackwell GPU)."""
    package, cute, interface = (types.ModuleType(n) for n in ("flash_attn", "flash_attn.cute",
                                                                "flash_attn.cute.interface"))
    interface._flash_attn_fwd, cute.interface, package.cute = forward, interface, cute
    return {"flash_attn": package, "flash_attn.cute": cute, "flash_attn.cute.interface": interface}
