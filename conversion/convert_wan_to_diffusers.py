#!/usr/bin/env python
"""Convert an original Wan release (ModelScope / Wan-AI layout) to a Diffusers pipeline folder.

Same as ``diffusers-wan convert``; the key-mapping logic lives in ``diffusers_wan_ext.conversion``.

    python conversion/convert_wan_to_diffusers.py SRC DST [--variant NAME] [--dtype bf16|fp16|fp32]
        [--push-to-hub REPO] [--model-id ID]
"""

import sys

from diffusers_wan_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
