"""``diffusers-wan``: the verbs' code (the argument parser lives in the light launcher :mod:`diffusers_wan_ext_cli`).

Examples::

    diffusers-wan demo --output outputs/demo.mp4
    diffusers-wan convert /ckpt/Wan2.1-T2V-1.3B /ckpt/Wan2.1-T2V-1.3B-diffusers --dtype bf16
    diffusers-wan generate --model /ckpt/Wan2.1-T2V-1.3B-diffusers --prompt "a cat surfing" --output cat.mp4
    diffusers-wan lora info my_lora.safetensors

From Python: ``diffusers_wan_ext.cli.main(["convert", SRC, DST])`` returns the exit status.
"""

from __future__ import annotations

import sys

from diffusers_wan_ext_cli import build_parser

from .commands import COMMANDS, run_command

__all__ = ["COMMANDS", "build_parser", "main", "run_command"]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the verb; user mistakes print ``error: ...`` and return 2."""
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
