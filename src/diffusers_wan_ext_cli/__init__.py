"""The ``diffusers-wan`` command line: a light launcher in front of :mod:`diffusers_wan_ext.cli`.

``import diffusers_wan_ext`` registers every class with Diffusers (seconds: torch, Diffusers, transformers), so the
console script starts here: it parses the arguments with nothing but the standard library and the command-line
manifest, and imports the package only to run a verb.  ``diffusers-wan --help`` answers at once, and so do
``diffusers-wan train --help`` and ``examples/training/train.py --help`` (the trainer's help text is in the manifest).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from .manifest import stored_train_help
from .parser import build_parser

__all__ = ["build_parser", "main", "train"]


def main(argv: list[str] | None = None) -> int:
    """``diffusers-wan VERB ...``: parse, then run the verb (see :func:`diffusers_wan_ext.cli.run_command`)."""
    args = build_parser().parse_args(argv)
    if args.command == "train" and (text := stored_train_help(args.train_args, "diffusers-wan train")):
        print(text, end="")
        return 0
    from diffusers_wan_ext.cli import run_command  # the package (and torch) load only to run a verb

    return run_command(args)


def train(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """``examples/training/train.py``: the trainer (:func:`diffusers_wan_ext.training.main`); ``--help`` answers from
    the manifest without importing the package.  ``prog`` defaults to the script's file name, as argparse's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    text = stored_train_help(argv, prog or os.path.basename(sys.argv[0]))
    if text:
        print(text, end="")
        return
    from diffusers_wan_ext.training import main as train_main  # the package (and torch) load only to train

    train_main(argv, prog)


if __name__ == "__main__":
    sys.exit(main())
