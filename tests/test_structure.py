"""Structure of the package: no import cycles, no private names imported across modules, no ``importlib``
indirection, no package-root imports, no upward imports between layers, own-module imports at module top
(``scripts/structure_report.py --check``)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "structure_report.py"


def _load_report_module():
    spec = importlib.util.spec_from_file_location("structure_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("structure_report", module)  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


structure_report = _load_report_module()


def test_package_structure_is_clean():
    problems = structure_report.check(ROOT / "src" / "diffusers_wan_ext", ROOT / "scripts" / "structure_allow.txt")
    assert not problems, "\n".join(problems)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_checker_finds_planted_problems(tmp_path):
    pkg = tmp_path / "src" / "planted"
    _write(pkg, {
        "__init__.py": "from .pipelines.pipe import Pipe\n",
        "utils/__init__.py": "",
        # upward (utils -> pipelines), half of a cycle, a package-root import, importlib, a function-level import
        "utils/helpers.py": """
            import importlib
            from ..pipelines.pipe import Pipe


            def _hidden():
                return 1


            def late():
                from . import other
                import planted
                return importlib.import_module("planted.utils.other"), other, planted
            """,
        "utils/other.py": "X = 1\n",
        "utils/_kernels.py": "K = 1\n",
        "utils/kernels_user.py": "from ._kernels import K\n",  # private module, same subpackage: allowed
        "pipelines/__init__.py": "",
        # private name across modules, private module from outside its subpackage, the other half of the cycle
        "pipelines/pipe.py": """
            from typing import TYPE_CHECKING

            from ..utils._kernels import K
            from ..utils.helpers import _hidden

            if TYPE_CHECKING:
                from ..utils.other import X


            class Pipe:
                pass
            """,
    })
    allow = tmp_path / "allow.txt"
    allow.write_text("")
    report = structure_report.collect(pkg, allow)
    problems = structure_report.violations(report)
    text = "\n".join(problems)

    cycle = {"planted.utils.helpers", "planted.pipelines.pipe"}
    assert any(cycle <= set(c["modules"]) for c in report["cycles_explicit"]["sccs"]), text
    assert "private name imported across modules: src/planted/pipelines/pipe.py:5 imports _hidden" in text
    assert "private module imported from outside its subpackage: src/planted/pipelines/pipe.py:4" in text
    assert "utils/kernels_user.py" not in text  # sibling of the private module
    assert "importlib use: src/planted/utils/helpers.py:2" in text
    assert "package-root import: src/planted/utils/helpers.py:12" in text
    assert "upward import: src/planted/utils/helpers.py:3 utils -> pipelines" in text
    assert "function-level own import: src/planted/utils/helpers.py:11 in late -> planted.utils.other" in text
    assert not any("pipe.py:8" in p for p in problems)  # TYPE_CHECKING import is not a function-level import

    # the allowlist silences a function-level import; a clean package passes
    allow.write_text("src/planted/utils/helpers.py:late  # planted\n")
    problems = structure_report.check(pkg, allow)
    assert not any(p.startswith("function-level own import") for p in problems)
    clean = tmp_path / "src" / "clean"
    _write(clean, {"__init__.py": "from .utils.a import f\n", "utils/__init__.py": "",
                   "utils/a.py": "def f():\n    pass\n"})
    assert structure_report.check(clean, allow) == []
