"""Keep the golden fixtures shipped in the repo (``tests/goldens/``) identical to ``../shared/goldens``.

    python3 scripts/sync_goldens.py            # copy: tests/goldens becomes an exact mirror of the shared set
    python3 scripts/sync_goldens.py --check    # exit 1 naming every file that differs, is missing or is extra

The test suite reads ``$WAN_GOLDENS_DIR`` when set, else ``tests/goldens`` (so a fresh clone anywhere runs the
harness); ``tests/test_goldens_sync.py`` runs the check whenever the shared folder exists.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "goldens"
SHIPPED = ROOT / "tests" / "goldens"


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def differences(shared: Path = SHARED, shipped: Path = SHIPPED) -> list[str]:
    """Relative paths that are missing from ``shipped``, extra in it, or not byte-identical."""
    a, b = _files(shared), _files(shipped) if shipped.is_dir() else {}
    out = [f"missing: {k}" for k in sorted(set(a) - set(b))]
    out += [f"extra: {k}" for k in sorted(set(b) - set(a))]
    out += [f"differs: {k}" for k in sorted(set(a) & set(b)) if a[k].read_bytes() != b[k].read_bytes()]
    return out


def sync(shared: Path = SHARED, shipped: Path = SHIPPED) -> None:
    """Make ``shipped`` an exact copy of ``shared`` (written beside it, then swapped in)."""
    tmp = shipped.with_name(shipped.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(shared, tmp)
    shutil.rmtree(shipped, ignore_errors=True)
    tmp.rename(shipped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on any difference")
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args(argv)
    if not args.shared.is_dir():
        print(f"error: {args.shared} is not a folder", file=sys.stderr)
        return 2
    if args.check:
        diff = differences(args.shared)
        print("\n".join(diff) if diff else f"{SHIPPED} matches {args.shared}")
        return 1 if diff else 0
    sync(args.shared)
    print(f"{SHIPPED} <- {args.shared} ({len(_files(SHIPPED))} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
