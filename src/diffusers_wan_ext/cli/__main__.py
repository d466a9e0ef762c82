"""``python -m diffusers_wan_ext.cli ...`` (same as ``diffusers-wan ...``)."""

import sys

from . import main

sys.exit(main())
