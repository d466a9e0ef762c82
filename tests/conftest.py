import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent
if str(ROOT / "src") not in sys.path and not os.environ.get("DWE_NO_SRC_PATH"):
    sys.path.insert(0, str(ROOT / "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker (and its subprocesses), not N x cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    """Factory: ``tiny_release(arch, experts=1, text_len=512)`` -> path of a tiny original-layout release (cached)."""
    from diffusers_wan_ext.demo import make_tiny_release

    cache = {}

    def make(arch="t2v", experts=1, text_len=512):
        key = (arch, experts, text_len)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"release-{arch}-{experts}-{text_len}")
            cache[key] = make_tiny_release(d / "release", arch=arch, experts=experts, text_len=text_len)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def converted(tiny_release, tmp_path_factory):
    """Factory: converted Diffusers folder of a tiny release (fp32, cached)."""
    from diffusers_wan_ext.release_converter import convert_release

    cache = {}

    def make(arch="t2v", experts=1, text_len=512, scheduler="unipc"):
        key = (arch, experts, text_len, scheduler)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"converted-{arch}-{experts}-{text_len}-{scheduler}")
            from diffusers_wan_ext.demo import TINY

            cache[key] = convert_release(tiny_release(arch, experts, text_len), d / "out", dtype="fp32",
                                         scheduler=scheduler, progress=False, image_encoder_heads=TINY["clip_heads"])
        return cache[key]

    return make


@pytest.fixture(scope="session")
def built_dists(tmp_path_factory):
    """(sdist, wheel) built once from a copy of this checkout (``helpers.build_sdist_and_wheel``)."""
    from helpers import build_sdist_and_wheel

    return build_sdist_and_wheel(tmp_path_factory.mktemp("dists"))


def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n N --dist loadgroup`` (``scripts/test.sh``): a test file runs on one worker, so its module
    fixtures are built once; the tests of the session's built sdist + wheel (``built_dists``) share one worker too."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = "built_dists" if "built_dists" in getattr(item, "fixturenames", ()) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
