"""Converted folders load (1) with plain stock Diffusers where stock covers the variant, (2) after
``import diffusers_wan_ext`` without trust_remote_code, and (3) in a fresh interpreter with trust_remote_code=True;
``save_pretrained`` of a loaded pipeline keeps routes (2) and (3) working.  Each route runs in a fresh interpreter."""

import json

import pytest

from helpers import run_python

RUN = """
import sys, torch
{imports}
pipe = DiffusionPipeline.from_pretrained({folder!r}{kwargs})
assert ('diffusers_wan_ext' in sys.modules) == {expect_ours_imported}, sorted(m for m in sys.modules if 'wan_ext' in m)
print(type(pipe).__name__, type(pipe.transformer).__name__)
if {save!r}:
    pipe.save_pretrained({save!r})
"""


def _route(folder, imports="from diffusers import DiffusionPipeline", kwargs="", expect_ours_imported=False, save=""):
    code = RUN.format(imports=imports, folder=str(folder), kwargs=kwargs, expect_ours_imported=expect_ours_imported,
                      save=str(save))
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_stock_diffusers_loads_stock_variants(converted):
    for arch, experts in [("t2v", 1), ("i2v", 1), ("ti2v", 1), ("t2v", 2)]:
        out = _route(converted(arch, experts))
        assert out.endswith("WanTransformer3DModel")


@pytest.fixture(scope="module")
def ext_folder(converted):
    folder = converted("i2v", 1, 16)  # CLIP branch with text_len 16: not representable by the stock class
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_wan_ext", "WanExtTransformer3DModel"]
    assert (folder / "transformer" / "diffusers_wan_ext.py").exists()
    return folder


def test_trust_remote_code_in_fresh_interpreter(ext_folder, tmp_path):
    out = _route(ext_folder, kwargs=", trust_remote_code=True", expect_ours_imported=True, save=tmp_path / "resaved")
    assert out == "WanImageToVideoPipeline WanExtTransformer3DModel"
    # the re-saved folder keeps both routes
    assert _route(tmp_path / "resaved", kwargs=", trust_remote_code=True", expect_ours_imported=True).endswith(
        "WanExtTransformer3DModel")
    assert _route(tmp_path / "resaved", imports="import diffusers_wan_ext\nfrom diffusers import DiffusionPipeline",
                  expect_ours_imported=True).endswith("WanExtTransformer3DModel")


def test_import_route_without_trust(ext_folder, tmp_path):
    out = _route(ext_folder, imports="import diffusers_wan_ext\nfrom diffusers import DiffusionPipeline",
                 expect_ours_imported=True, save=tmp_path / "resaved")
    assert out.endswith("WanExtTransformer3DModel")
    assert _route(tmp_path / "resaved", kwargs=", trust_remote_code=True", expect_ours_imported=True).endswith(
        "WanExtTransformer3DModel")


def test_automodel_after_import(ext_folder):
    code = f"""
import diffusers_wan_ext
from diffusers import AutoModel
a = AutoModel.from_pretrained({str(ext_folder)!r}, subfolder="transformer")
b = AutoModel.from_pretrained({str(ext_folder / 'transformer')!r})
print(type(a).__name__, type(b).__name__, b.config.text_len)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-3:] == ["WanExtTransformer3DModel", "WanExtTransformer3DModel", "16"]


def test_without_import_or_trust_the_error_says_what_to_do(ext_folder):
    r = run_python(f"from diffusers import DiffusionPipeline\nDiffusionPipeline.from_pretrained({str(ext_folder)!r})")
    assert r.returncode != 0 and "trust_remote_code" in r.stderr


def test_other_custom_code_still_needs_trust(ext_folder, tmp_path):
    """Only our exact shim is resolved without trust_remote_code; an edited file is treated as custom code."""
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(ext_folder, folder)
    shim = folder / "transformer" / "diffusers_wan_ext.py"
    shim.write_text(shim.read_text() + "print('side effect')\n")
    r = run_python(f"import diffusers_wan_ext\nfrom diffusers import DiffusionPipeline\n"
                   f"DiffusionPipeline.from_pretrained({str(folder)!r})")
    assert r.returncode != 0 and "trust_remote_code" in r.stderr


def test_our_pipeline_class_round_trips_through_both_routes(converted, tmp_path):
    """A folder saved by one of our pipeline classes names it ["diffusers_wan_ext", Class] with a root shim."""
    code = f"""
from diffusers_wan_ext import WanVideoToVideoReferencePipeline, WanFlowMatchScheduler
pipe = WanVideoToVideoReferencePipeline.from_pretrained({str(converted('t2v'))!r}, scheduler=WanFlowMatchScheduler())
pipe.save_pretrained({str(tmp_path / 'ours')!r})
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_wan_ext", "WanVideoToVideoReferencePipeline"]
    assert index["scheduler"] == ["diffusers_wan_ext", "WanFlowMatchScheduler"]
    assert (tmp_path / "ours" / "diffusers_wan_ext.py").exists()
    assert _route(tmp_path / "ours", kwargs=", trust_remote_code=True", expect_ours_imported=True).startswith(
        "WanVideoToVideoReferencePipeline")
    assert _route(tmp_path / "ours", imports="import diffusers_wan_ext\nfrom diffusers import DiffusionPipeline",
                  expect_ours_imported=True).startswith("WanVideoToVideoReferencePipeline")
