"""The light ``diffusers-wan`` launcher: ``--help`` imports neither torch nor the package; its manifest is current."""

import subprocess
import sys

from diffusers_wan_ext_cli.manifest_writer import main as manifest_main
from diffusers_wan_ext.families import FAMILIES
from diffusers_wan_ext.lora.formats import LORA_FORMATS
from diffusers_wan_ext_cli import build_parser
from diffusers_wan_ext_cli.parser import LORA_FORMATS as LAUNCHER_LORA_FORMATS
from helpers import src_env

PROBE = """
import sys
from diffusers_wan_ext_cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "diffusers_wan_ext") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


def _heavy_modules(*argv: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120,
                         env=src_env())
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY=")]
    assert line, out.stdout + out.stderr
    return line[0][len("HEAVY="):]


def test_help_imports_nothing_heavy():
    assert _heavy_modules("--help") == ""
    assert _heavy_modules("generate", "--help") == ""
    assert _heavy_modules("lora", "convert", "--help") == ""
    assert _heavy_modules("train", "--help") == ""  # the trainer's help text is in the manifest


def test_manifest_is_current():
    assert manifest_main(["--check"]) == 0


def test_family_verbs_and_generate_options_come_from_the_declarations():
    parser = build_parser()
    verbs = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 (argparse has no public accessor)
    for family in FAMILIES:
        for command in family.cli_commands:
            assert command.name in verbs
    generate = parser.parse_args(["generate", "--model", "m", "--prompt", "p"])
    for family in FAMILIES:
        for i in family.generate_inputs:
            assert hasattr(generate, i.argument)


def test_lora_formats_match():
    assert tuple(LAUNCHER_LORA_FORMATS) == tuple(LORA_FORMATS)
