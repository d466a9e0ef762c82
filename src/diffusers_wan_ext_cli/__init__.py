"""The ``diffusers-wan`` command line: a light launcher in front of :mod:`diffusers_wan_ext.cli`.

``import diffusers_wan_ext`` registers every class with Diffusers (seconds: torch, Diffusers, transformers), so the
console script starts here: it parses the arguments with nothing but the standard library and the command-line
manifest, and imports the package only to run a verb.  ``diffusers-wan --help`` answers at once.
"""

from __future__ import annotations

import sys

from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """``diffusers-wan VERB ...``: parse, then run the verb (see :func:`diffusers_wan_ext.cli.run_command`)."""
    args = build_parser().parse_args(argv)
    from diffusers_wan_ext.cli import run_command  # the package (and torch) load only to run a verb

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
