"""Converters from the original Wan release layouts to Diffusers (and back).

The key-mapping logic lives here so that runtime loading and the ``diffusers-wan convert`` CLI share it.
"""

from .dit import (
    convert_dit_state_dict,
    dit_config_from_state_dict,
    export_dit_state_dict,
    load_dit_from_original,
)
from .variants import VARIANTS, WanVariant, get_variant

__all__ = [
    "VARIANTS",
    "WanVariant",
    "convert_dit_state_dict",
    "dit_config_from_state_dict",
    "export_dit_state_dict",
    "get_variant",
    "load_dit_from_original",
]
