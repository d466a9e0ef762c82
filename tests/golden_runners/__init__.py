"""Golden-case runners.

Each module registers functions with :func:`runner` for the case names it supports.  A runner receives a
:class:`~tests.golden_runners.core.GoldenCase` (manifest, release-layout weights, inputs) and a temporary folder,
runs the case through *our* converter and *our* model / pipeline code, and returns a dict ``output name -> value``
covering every entry of ``manifest["outputs"]``.  ``tests/test_goldens.py`` compares them at the manifest tolerance.

Cases that are known but have no runner yet are listed in ``UNSUPPORTED`` with the reason (reported as skipped);
a registered runner takes precedence over that list.
"""

from .core import RUNNERS, UNSUPPORTED, GoldenCase, compare_outputs, discover_cases, load_case, runner  # noqa: F401
from . import dit  # noqa: F401,E402

for _optional in ("encoders", "vae", "loops", "conditioning", "fun_condition", "variants_dit", "teacache", "animate",
                  "longcat", "vap", "s2v", "sliding_window", "animate2", "dancer", "mova"):
    try:
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as e:  # module not written yet
        if e.name != f"{__name__}.{_optional}":
            raise
