"""Golden parity harness: every case in ``$WAN_GOLDENS_DIR`` (default ``tests/goldens``, the shipped copy of ``../shared/goldens``) through our code.

A case is a folder with ``manifest.json``.  Each runs through our converter and our model / pipeline and is compared
with the reference outputs at the manifest's tolerance.  Cases we do not support yet are *skipped with the reason*;
a case with no runner at all is skipped naming its kind, and so is a case whose fixture set lacks an entry its runner
needs (:class:`~golden_runners.core.MissingFixtureField`; on the shipped set that is a failure).  The runners take
every width from the case's config and every shape from its tensors, so other fixture sets run unchanged.
"""

import pytest
import torch

from golden_runners import RUNNERS, UNSUPPORTED, discover_cases, load_case, compare_outputs
from golden_runners.core import GOLDENS_DIR, SHIPPED_GOLDENS_DIR, MissingFixtureField

CASES = discover_cases()


@pytest.fixture(autouse=True)
def _fp32_exact():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


def test_goldens_dir_has_cases():
    assert CASES, "no golden cases found: set WAN_GOLDENS_DIR to a fixture set (default tests/goldens)"


@pytest.mark.parametrize("name", CASES or ["<none>"])
def test_golden_case(name, tmp_path):
    if name == "<none>":
        pytest.skip("no golden cases found")
    case = load_case(name)
    fn = RUNNERS.get(name)
    if fn is None and name in UNSUPPORTED:
        pytest.skip(f"{name}: not supported yet - {UNSUPPORTED[name]}")
    if fn is None:
        pytest.skip(f"{name}: no runner for this case (kind {case.manifest.get('kind')!r})")
    try:
        ours = fn(case, tmp_path)
    except MissingFixtureField as e:  # this fixture set lacks an entry the case needs: not run, so never passed
        if GOLDENS_DIR.resolve() == SHIPPED_GOLDENS_DIR.resolve():  # the set the runners were written for is complete
            raise AssertionError(f"{name}: the shipped fixture set must run every case: {e}") from e
        pytest.skip(f"{name}: {e}")
    skip = ours.pop("__skip__", None)
    if skip:
        pytest.skip(f"{name}: {skip}")
    failures = compare_outputs(case, ours)
    assert not failures, f"{name} differs from the reference:\n  " + "\n  ".join(failures)
