"""``python -m diffusers_wan_ext_cli ...`` (same as ``diffusers-wan ...``)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
