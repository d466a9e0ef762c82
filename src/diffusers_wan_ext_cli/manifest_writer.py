"""Write (or ``--check``) ``cli/manifest.json`` from the family registry and the trainer's parser.

Run ``python -m diffusers_wan_ext_cli.manifest_writer`` after changing a family's ``cli_commands`` or
``generate_inputs``, or the trainer's options (:mod:`diffusers_wan_ext.training.args`: ``train --help`` answers from
the manifest); the test suite runs it with ``--check``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffusers_wan_ext.families import FAMILIES
from diffusers_wan_ext.lora.formats import COMPONENT_RENAMERS
from diffusers_wan_ext.training.args import build_parser as build_train_parser

from .manifest import HELP_WIDTH, MANIFEST_PATH, TRAIN_PROGS

__all__ = ["build_manifest", "main", "train_help"]


def train_help(prog: str) -> str:
    """The trainer's ``--help`` text with ``prog`` in its usage line, at :data:`HELP_WIDTH` columns."""
    parser = build_train_parser(prog)
    parser.formatter_class = functools.partial(parser.formatter_class, width=HELP_WIDTH)
    return parser.format_help()


def build_manifest() -> dict[str, Any]:
    """What the families add to the command line, as JSON values."""
    commands = [
        {"family": f.name, "name": c.name, "help": c.help,
         "arguments": [{"flags": list(a.flags), "options": a.options} for a in c.arguments]}
        for f in FAMILIES for c in f.cli_commands
    ]
    inputs = [dict(asdict(i), family=f.name) for f in FAMILIES for i in f.generate_inputs]
    convert = [dict(asdict(i), family=f.name) for f in FAMILIES for i in f.convert_inputs]
    return {"commands": commands, "convert_inputs": convert, "generate_inputs": inputs,
            "lora_components": list(COMPONENT_RENAMERS), "train_help": {p: train_help(p) for p in TRAIN_PROGS}}


def render(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when manifest.json is out of date")
    parser.add_argument("--path", type=Path, default=MANIFEST_PATH)
    args = parser.parse_args(argv)
    text = render(build_manifest())
    if args.check:
        current = args.path.read_text(encoding="utf-8") if args.path.exists() else ""
        if current != text:
            print(f"{args.path} is out of date: run python -m diffusers_wan_ext_cli.manifest_writer", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(text, encoding="utf-8")
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
