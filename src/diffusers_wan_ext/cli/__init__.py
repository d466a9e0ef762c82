"""``diffusers-wan``: the verbs' code.

The command line starts in the light launcher :mod:`diffusers_wan_ext_cli` (standard library only), which parses the
arguments and imports this package only to run a verb (:func:`run_command`); this package never imports the
launcher.  From Python: ``diffusers_wan_ext_cli.main(["convert", SRC, DST])`` returns the exit status.
"""

from __future__ import annotations

from .commands import COMMANDS, run_command

__all__ = ["COMMANDS", "run_command"]
