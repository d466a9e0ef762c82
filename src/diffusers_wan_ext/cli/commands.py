"""The verbs of ``diffusers-wan``: the core ones and those the families declare (``ModelFamily.cli_commands``)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..families import FAMILIES
from ..training import main as train_main
from ..utils.io import ConversionError
from .convert import cmd_convert
from .export import cmd_export_dit
from .generate import cmd_demo, cmd_generate, cmd_variants
from .lora import cmd_lora

__all__ = ["COMMANDS", "cmd_train", "run_command"]


def cmd_train(args: argparse.Namespace) -> int:
    """``diffusers-wan train ARGS``: the trainer (:func:`diffusers_wan_ext.training.main`) with ``args.train_args``;
    its exit status is returned (``--help`` and argument errors exit through argparse)."""
    try:
        train_main(args.train_args, prog="diffusers-wan train")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(f"error: {e.code}", file=sys.stderr)
        return 2
    return 0

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "convert": cmd_convert,
    "export-dit": cmd_export_dit,
    "demo": cmd_demo,
    "generate": cmd_generate,
    "variants": cmd_variants,
    "lora": cmd_lora,
    "train": cmd_train,
    **{c.name: c.run for f in FAMILIES for c in f.cli_commands},
}


def error_text(e: BaseException) -> str:
    """The message of a user mistake; an ``OSError`` of a file reads ``PATH: reason`` (not ``[Errno 20] ...``)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.command``; a user mistake (``ConversionError`` / ``ValueError``, or an ``OSError`` of a file: not
    found, no permission, disk full) is one ``error: ...`` line on stderr and exit status 2, Ctrl-C exit status 130."""
    try:
        return COMMANDS[args.command](args)
    except (ConversionError, ValueError, OSError) as e:
        print(f"error: {error_text(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
