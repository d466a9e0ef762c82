"""The command-line manifest: the families' ``diffusers-wan`` verbs and ``generate`` options, and the trainer's
``--help`` text, as plain JSON.

``diffusers-wan --help`` must answer without importing torch, Diffusers or the family declarations (importing
``diffusers_wan_ext`` registers every class with Diffusers, which takes seconds), so what the families add to the
command line is listed in ``manifest.json`` next to this file.  The manifest is derived data:
:mod:`diffusers_wan_ext_cli.manifest_writer` writes it from the family registry and ``--check`` (run by the test
suite) fails when a declaration changed and the file was not rewritten.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["HELP_WIDTH", "MANIFEST_PATH", "TRAIN_PROGS", "add_manifest_arguments", "add_generate_inputs",
           "read_manifest", "stored_train_help"]

MANIFEST_PATH = Path(__file__).with_name("manifest.json")
_TYPES = {"int": int, "float": float}
#: the commands whose trainer ``--help`` the manifest holds (``examples/training/train.py`` is ``train.py``)
TRAIN_PROGS = ("diffusers-wan train", "train.py")
#: the width the stored help texts are wrapped at
HELP_WIDTH = 100


def read_manifest(path: Path = MANIFEST_PATH) -> dict[str, Any]:
    """``{"commands": [...], "generate_inputs": [...]}`` as written by the manifest writer."""
    return json.loads(path.read_text(encoding="utf-8"))


def add_manifest_arguments(parser: argparse.ArgumentParser, arguments: list[dict[str, Any]]) -> None:
    """``parser.add_argument(*flags, **options)`` for each entry, ``type`` given by name (``"int"``, ``"float"``)."""
    for argument in arguments:
        options = dict(argument["options"])
        if "type" in options:
            options["type"] = _TYPES[options["type"]]
        parser.add_argument(*argument["flags"], **options)


def add_generate_inputs(parser: argparse.ArgumentParser, inputs: list[dict[str, Any]]) -> None:
    """The families' ``generate`` options (``--pose-video`` ...)."""
    for i in inputs:
        if i["kind"] == "optional-path":  # a flag alone means the model folder's own file
            parser.add_argument(i["flag"], dest=i["argument"], nargs="?", const="auto", help=i["help"])
        else:
            parser.add_argument(i["flag"], dest=i["argument"], type=_TYPES.get(i["kind"]), help=i["help"])


def stored_train_help(argv: list[str], prog: str) -> str | None:
    """The trainer's help text for ``prog`` when ``argv`` asks for it (``-h`` / ``--help`` before any ``--``) and the
    manifest holds it; ``None`` otherwise (the trainer's own parser then answers)."""
    options = argv[:argv.index("--")] if "--" in argv else argv
    if not {"-h", "--help"} & set(options) or prog not in TRAIN_PROGS:
        return None
    return read_manifest().get("train_help", {}).get(prog)
