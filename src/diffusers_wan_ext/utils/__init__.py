from .io import (
    ConversionError,
    atomic_output_dir,
    load_state_dict,
    load_state_dict_files,
    raise_for_key_problems,
    strip_known_prefixes,
)

__all__ = [
    "ConversionError",
    "atomic_output_dir",
    "load_state_dict",
    "load_state_dict_files",
    "raise_for_key_problems",
    "strip_known_prefixes",
]
