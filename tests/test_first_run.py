"""A user's first minutes: a silent import, tools called through the running interpreter, a complete sdist / wheel,
and install scripts that name no package registry."""

from __future__ import annotations

import ast
import configparser
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, src_env

#: Tools that must never be run by their bare name (that needs the venv's ``bin`` on ``PATH``): run them through
#: ``sys.executable -m ...`` (accelerate: ``accelerate.commands.launch``; torchrun: ``torch.distributed.run``).
BARE_TOOLS = {"accelerate", "torchrun", "diffusers-wan", "diffusers-wan-ext", "python", "python3", "pytest", "pip"}

#: The only URL the install scripts may print: where PyTorch says how to install it (a page, not a package index).
ALLOWED_URLS = {"https://pytorch.org/get-started/locally/"}


def _silent_env() -> dict[str, str]:
    env = src_env()
    env.pop("PYTHONWARNINGS", None)  # what a user sees: the interpreter's default warning filters
    return env


def test_import_prints_nothing(tmp_path):
    """``import diffusers_wan_ext`` (and the CLI package) writes nothing: no warning, no log line, on any stream."""
    code = "import diffusers_wan_ext, diffusers_wan_ext.cli"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_silent_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "" and proc.stderr == "", f"stdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"


def test_clip_image_processor_folder_loads_with_stock_classes(tmp_path):
    """The processor converted folders carry is the class ``transformers.CLIPImageProcessor`` resolves to here (no
    torchvision needed), its saved config names ``CLIPImageProcessor`` and stock Transformers loads it back."""
    import transformers

    from diffusers_wan_ext.conversion.image_encoder import make_clip_image_processor
    from diffusers_wan_ext.utils.clip_processor import bind_clip_image_processor, clip_image_processor_class

    bind_clip_image_processor()  # idempotent
    assert transformers.CLIPImageProcessor is clip_image_processor_class()
    proc = make_clip_image_processor(56)
    assert isinstance(proc, clip_image_processor_class())
    proc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "CLIPImageProcessor"
    loaded = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    assert loaded.size == proc.size and loaded.image_mean == proc.image_mean


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if "goldens" not in p.parts)


def _bare_calls(path: Path) -> set[str]:
    """Tools named bare as the first item of a list / tuple literal (a command line) in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
            first = node.elts[0]
            if isinstance(first, ast.Constant) and first.value in BARE_TOOLS:
                found.add(first.value)
    return found


def test_no_command_depends_on_path():
    """Tests, scripts and examples run tools through the running interpreter, never a bare name from ``PATH``."""
    offenders = {(str(p.relative_to(ROOT)), tool) for p in _python_files("tests", "scripts", "examples")
                 for tool in _bare_calls(p)}
    shell = re.compile(r"^\s*(?:exec\s+)?(" + "|".join(map(re.escape, sorted(BARE_TOOLS))) + r")\s", re.M)
    for script in sorted((ROOT / "scripts").glob("*.sh")) + [ROOT / ".ci" / "run"]:
        offenders |= {(str(script.relative_to(ROOT)), m.group(1)) for m in shell.finditer(script.read_text())}
    assert not offenders, f"run these through sys.executable / $PY -m ...: {sorted(offenders)}"


def test_install_scripts_name_no_package_registry():
    """``ensure_env.sh`` uses pip's own configuration (plus ``TORCH_INDEX_URL`` when the user sets it)."""
    for script in sorted((ROOT / "scripts").glob("*.sh")) + [ROOT / ".ci" / "run"]:
        urls = set(re.findall(r"[a-z+]+://[^\s\"')]+", script.read_text()))
        assert urls <= ALLOWED_URLS, f"{script.name}: hard-coded {sorted(urls - ALLOWED_URLS)}"
    text = (ROOT / "scripts" / "ensure_env.sh").read_text()
    assert "TORCH_INDEX_URL" in text and "--dry-run" in text  # the CUDA check before any torch install


def test_sdist_and_wheel_rules_ship_scripts_tests_and_the_launcher_manifest():
    rules = [line.split() for line in (ROOT / "MANIFEST.in").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    grafted = {r[1] for r in rules if r[0] == "graft"}
    assert {"src", "scripts", "tests", "docs", "examples", "conversion"} <= grafted
    assert not any(r[0] in ("prune", "exclude", "recursive-exclude") and r[1].startswith(("scripts", "tests"))
                   for r in rules)
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    package_data = cfg["options.package_data"]["diffusers_wan_ext_cli"].split()
    assert "manifest.json" in package_data


@pytest.mark.slow  # ~10 s: a copy of the checkout, an sdist (goldens included) and a wheel built from it
def test_built_sdist_and_wheel_contents(built_dists):
    sdist, wheel = built_dists
    if sdist is None:
        pytest.skip("not a git checkout (an unpacked sdist): nothing to build from")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for name in ("scripts/ensure_env.sh", "scripts/test.sh", "scripts/demo.sh", ".ci/run", "MANIFEST.in",
                 "src/diffusers_wan_ext_cli/manifest.json", "tests/conftest.py", "tests/goldens/README.md"):
        assert name in names, name
    assert not any("__pycache__" in n for n in names)
    with zipfile.ZipFile(wheel) as whl:
        files = set(whl.namelist())
    assert "diffusers_wan_ext_cli/manifest.json" in files and "diffusers_wan_ext/__init__.py" in files
    assert not any(f.startswith(("tests/", "scripts/")) for f in files)
    entry_points = next(f for f in files if f.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as whl:
        assert "diffusers-wan = diffusers_wan_ext_cli:main" in whl.read(entry_points).decode()
