from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

#: ``$WAN_GOLDENS_DIR`` when set (other fixture sets), else the copy shipped in the repo (``tests/goldens``, kept equal
#: to ``../shared/goldens`` by ``scripts/sync_goldens.py``), so a fresh clone anywhere runs the harness.
SHIPPED_GOLDENS_DIR = Path(__file__).resolve().parents[1] / "goldens"
GOLDENS_DIR = Path(os.environ.get("WAN_GOLDENS_DIR", SHIPPED_GOLDENS_DIR))

RUNNERS: dict[str, Callable[["GoldenCase", Path], dict[str, Any]]] = {}

# Cases we know about but do not support yet: case name -> reason (the issue that will add them).
UNSUPPORTED: dict[str, str] = {
}


def runner(*case_names: str):
    """Register a function as the runner of the named cases."""

    def deco(fn):
        for name in case_names:
            RUNNERS[name] = fn
        return fn

    return deco


class MissingFixtureField(KeyError):
    """The fixture set lacks an entry a runner needs: ``tests/test_goldens.py`` reports the case as SKIPPED with this
    message (a ``KeyError`` subclass, so code that handles missing keys behaves as before)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing fixture field"


class FixtureDict(dict):
    """A fixture mapping (tensors, ``original_config``) whose missing key raises :class:`MissingFixtureField`
    naming the case and the key; ``get`` / ``in`` work as on a dict."""

    def __init__(self, data=(), where: str = "fixture"):
        super().__init__(data)
        self.where = where

    def __missing__(self, key):
        raise MissingFixtureField(f"this fixture set has no {self.where}[{key!r}]")


@dataclass
class GoldenCase:
    name: str
    dir: Path
    manifest: dict
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    variants: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        for kind in ("inputs", "outputs", "variants"):
            setattr(self, kind, FixtureDict(getattr(self, kind), f"{self.name} tensor {kind}"))

    @property
    def config(self) -> dict:
        """``original_config`` (a :class:`FixtureDict`: a missing field skips the case)."""
        return FixtureDict(self.manifest.get("original_config", {}), f"{self.name} original_config")

    def value(self, name: str) -> Any:
        """A non-tensor input (``{"value": ...}``) from the manifest."""
        entry = self.manifest.get("inputs", {}).get(name)
        if entry is None or "value" not in entry:
            raise MissingFixtureField(f"this fixture set has no {self.name} manifest inputs[{name!r}] value")
        return entry["value"]

    def weight_paths(self, role: str | None = None) -> list[Path]:
        """Release-layout weight files: for DiT cases those of ``role``; otherwise all files of ``weights``."""
        w = self.manifest["weights"]
        if "weight_files" in self.manifest:
            rels = w[role or "dit"]
            rels = [rels] if isinstance(rels, str) else rels
        else:
            rels = list(w) if role is None else [role]
        return [Path(os.path.normpath(self.dir / r)) for r in rels]

    def weights(self, role: str | None = None) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for p in self.weight_paths(role):
            sd.update(load_file(str(p)))
        return sd


def discover_cases() -> list[str]:
    if not GOLDENS_DIR.is_dir():
        return []
    return sorted(p.name for p in GOLDENS_DIR.iterdir() if (p / "manifest.json").is_file())


def load_case(name: str, root: Path | None = None) -> GoldenCase:
    """Case ``name`` of the fixture set ``root`` (default ``$WAN_GOLDENS_DIR``)."""
    d = (GOLDENS_DIR if root is None else Path(root)) / name
    m = json.loads((d / "manifest.json").read_text())
    t = load_file(str(d / "tensors.safetensors"))
    case = GoldenCase(name=name, dir=d, manifest=m)
    for k, v in t.items():
        kind, _, key = k.partition(".")
        {"input": case.inputs, "output": case.outputs, "variant": case.variants}.get(kind, {})[key] = v
    return case


def compare_outputs(case: GoldenCase, ours: dict[str, Any]) -> list[str]:
    """Compare every manifest output with ours; return a list of human-readable failures."""
    tol = case.manifest["tolerance"]
    rtol, atol = float(tol["rtol"]), float(tol["atol"])
    failures = []
    for name, spec in case.manifest["outputs"].items():
        if name not in ours:
            failures.append(f"{name}: not produced by our runner")
            continue
        got = ours[name]
        if "key" in spec:
            want = case.outputs[spec["key"].split(".", 1)[1]]
            got = torch.as_tensor(got)
            if tuple(got.shape) != tuple(want.shape):
                failures.append(f"{name}: shape {tuple(got.shape)} != golden {tuple(want.shape)}")
                continue
            if want.dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
                if not torch.equal(got.to(want.dtype), want):
                    failures.append(f"{name}: integer tensor differs")
                continue
            got = got.detach().float().cpu()
            if not torch.allclose(got, want, rtol=rtol, atol=atol):
                err = (got - want).abs().max().item()
                failures.append(f"{name}: max abs err {err:.3e} (rtol {rtol}, atol {atol})")
        else:
            if not _values_equal(got, spec["value"], rtol, atol):
                failures.append(f"{name}: {got!r} != golden {spec['value']!r}")
    return failures


def _values_equal(a: Any, b: Any, rtol: float, atol: float) -> bool:
    if isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and len(a) == len(b) and all(
            _values_equal(x, y, rtol, atol) for x, y in zip(a, b)
        )
    if isinstance(b, dict):
        return isinstance(a, dict) and a.keys() == b.keys() and all(_values_equal(a[k], b[k], rtol, atol) for k in b)
    if isinstance(b, bool) or b is None or isinstance(b, str):
        return a == b
    if isinstance(b, (int, float)):
        try:
            return abs(float(a) - float(b)) <= atol + rtol * abs(float(b))
        except (TypeError, ValueError):
            return False
    return a == b
