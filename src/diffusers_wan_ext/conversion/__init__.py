"""Converters from the original Wan release layouts to Diffusers (and back): key tables, configs, encoders, VAEs.

The key-mapping logic lives here so that runtime loading and the ``diffusers-wan convert`` CLI share it.  The
release-level converter (whole folders, the family registry) is :mod:`diffusers_wan_ext.release_converter`.
"""

from .dit import (
    convert_dit_state_dict,
    dit_config_from_state_dict,
    export_dit_state_dict,
    load_dit_from_original,
)

__all__ = [
    "convert_dit_state_dict",
    "dit_config_from_state_dict",
    "export_dit_state_dict",
    "load_dit_from_original",
]
