"""Converted folders load (1) with plain stock Diffusers where stock covers the variant, (2) after
``import diffusers_wan_ext`` without trust_remote_code, and (3) in a fresh interpreter with trust_remote_code=True;
``save_pretrained`` of a loaded pipeline keeps routes (2) and (3) working.

Each route runs in a fresh interpreter of its own kind: one for stock Diffusers alone (nothing of ours is ever
imported in it), one that imports ``diffusers_wan_ext`` first (the import route's loads and its refusals), and one
per ``trust_remote_code=True`` load (that route must find nothing of ours imported beforehand).  An interpreter runs
several steps; each step prints its own ``RESULT`` line (or the error it raised), so each test checks its own steps."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_python

PRELUDE = """
import sys, torch
from diffusers import DiffusionPipeline

def ours_imported():
    return 'diffusers_wan_ext' in sys.modules

def load(folder, save='', **kwargs):
    pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
    if save:
        pipe.save_pretrained(save)
    return type(pipe).__name__ + ' ' + type(pipe.transformer).__name__

def step(name, fn):
    try:
        value = fn()
    except Exception as e:  # reported, not raised: the later steps still run
        value = 'ERROR ' + type(e).__name__ + ': ' + ' '.join(str(e).split())
    print('RESULT', name, value, flush=True)
"""


def _run_steps(body: str) -> dict[str, str]:
    """Run ``PRELUDE + body`` in a fresh interpreter; ``{step name: printed value}`` (the interpreter must exit 0)."""
    r = run_python(PRELUDE + body)
    assert r.returncode == 0, r.stderr[-3000:]
    results = {}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            _, name, value = line.split(" ", 2)
            results[name] = value
    results["_stderr"] = r.stderr[-3000:]
    return results


def _step(results: dict[str, str], name: str) -> str:
    assert name in results, f"step {name} did not run: {results['_stderr']}"
    return results[name]


def _trust_route(folder, save="") -> str:
    """Route (3): a fresh interpreter that never imported us loads ``folder`` with ``trust_remote_code=True``."""
    results = _run_steps(f"""
assert not ours_imported()
step('trust', lambda: load({str(folder)!r}, save={str(save)!r}, trust_remote_code=True))
step('imported', ours_imported)
""")
    assert _step(results, "imported") == "True", results
    return _step(results, "trust")


STOCK = [("t2v", 1), ("i2v", 1), ("ti2v", 1), ("t2v", 2)]


@pytest.fixture(scope="module")
def ext_folder(converted):
    folder = converted("i2v", 1, 16)  # CLIP branch with text_len 16: not representable by the stock class
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_wan_ext", "WanExtTransformer3DModel"]
    assert (folder / "transformer" / "diffusers_wan_ext.py").exists()
    return folder


@pytest.fixture(scope="module")
def stock_run(converted, ext_folder) -> dict[str, str]:
    """One stock-only interpreter: every stock variant loads, then our folder is refused (nothing of ours imported
    at any point)."""
    steps = "".join(f"step('stock-{arch}-{experts}', lambda: load({str(converted(arch, experts))!r}))\n"
                    f"step('stock-{arch}-{experts}-imported', ours_imported)\n" for arch, experts in STOCK)
    steps += f"step('no-trust', lambda: load({str(ext_folder)!r}))\nstep('no-trust-imported', ours_imported)\n"
    return _run_steps(steps)


@pytest.fixture(scope="module")
def trust_resaved(ext_folder, tmp_path_factory):
    """Route (3) on our folder, re-saved from that interpreter: (its output line, the re-saved folder)."""
    resaved = tmp_path_factory.mktemp("trust") / "resaved"
    return _trust_route(ext_folder, save=resaved), resaved


@pytest.fixture(scope="module")
def import_run(converted, ext_folder, trust_resaved, tmp_path_factory) -> dict[str, str]:
    """One interpreter that imports ``diffusers_wan_ext`` first and then takes route (2) everywhere: our folder (and
    re-saves it), the folder re-saved by route (3), AutoModel, a folder saved by our own pipeline class, and last a
    folder whose shim was edited (refused)."""
    tmp = tmp_path_factory.mktemp("import-route")
    edited = tmp / "edited"
    shutil.copytree(ext_folder, edited)
    shim = edited / "transformer" / "diffusers_wan_ext.py"
    shim.write_text(shim.read_text() + "print('side effect')\n")
    body = f"""
import diffusers_wan_ext
from diffusers import AutoModel
from diffusers_wan_ext import WanVideoToVideoReferencePipeline, WanFlowMatchScheduler

def automodel():
    a = AutoModel.from_pretrained({str(ext_folder)!r}, subfolder="transformer")
    b = AutoModel.from_pretrained({str(ext_folder / 'transformer')!r})
    return f"{{type(a).__name__}} {{type(b).__name__}} {{b.config.text_len}}"

def save_ours():
    pipe = WanVideoToVideoReferencePipeline.from_pretrained({str(converted('t2v'))!r}, scheduler=WanFlowMatchScheduler())
    pipe.save_pretrained({str(tmp / 'ours')!r})
    return 'saved'

step('import', lambda: load({str(ext_folder)!r}, save={str(tmp / 'resaved')!r}))
step('trust-resaved', lambda: load({str(trust_resaved[1])!r}))
step('automodel', automodel)
step('save-ours', save_ours)
step('ours', lambda: load({str(tmp / 'ours')!r}))
step('edited', lambda: load({str(edited)!r}))
"""
    results = _run_steps(body)
    results["_tmp"] = str(tmp)
    return results


def test_stock_diffusers_loads_stock_variants(stock_run):
    for arch, experts in STOCK:
        assert _step(stock_run, f"stock-{arch}-{experts}").endswith("WanTransformer3DModel"), (arch, experts)
        assert _step(stock_run, f"stock-{arch}-{experts}-imported") == "False", (arch, experts)


def test_trust_remote_code_in_fresh_interpreter(trust_resaved, import_run):
    out, resaved = trust_resaved
    assert out == "WanImageToVideoPipeline WanExtTransformer3DModel"
    # the re-saved folder keeps both routes
    assert _trust_route(resaved).endswith("WanExtTransformer3DModel")
    assert _step(import_run, "trust-resaved").endswith("WanExtTransformer3DModel")


def test_import_route_without_trust(import_run):
    assert _step(import_run, "import").endswith("WanExtTransformer3DModel")
    assert _trust_route(Path(import_run["_tmp"]) / "resaved").endswith("WanExtTransformer3DModel")


def test_automodel_after_import(import_run):
    assert _step(import_run, "automodel").split() == ["WanExtTransformer3DModel", "WanExtTransformer3DModel", "16"]


def test_without_import_or_trust_the_error_says_what_to_do(stock_run):
    out = _step(stock_run, "no-trust")
    assert out.startswith("ERROR ") and "trust_remote_code" in out, out
    assert _step(stock_run, "no-trust-imported") == "False"


def test_other_custom_code_still_needs_trust(import_run):
    """Only our exact shim is resolved without trust_remote_code; an edited file is treated as custom code."""
    out = _step(import_run, "edited")
    assert out.startswith("ERROR ") and "trust_remote_code" in out, out


def test_our_pipeline_class_round_trips_through_both_routes(import_run):
    """A folder saved by one of our pipeline classes names it ["diffusers_wan_ext", Class] with a root shim."""
    assert _step(import_run, "save-ours") == "saved"
    ours = Path(import_run["_tmp"]) / "ours"
    index = json.loads((ours / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_wan_ext", "WanVideoToVideoReferencePipeline"]
    assert index["scheduler"] == ["diffusers_wan_ext", "WanFlowMatchScheduler"]
    assert (ours / "diffusers_wan_ext.py").exists()
    assert _trust_route(ours).startswith("WanVideoToVideoReferencePipeline")
    assert _step(import_run, "ours").startswith("WanVideoToVideoReferencePipeline")
