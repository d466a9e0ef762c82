from .atomic import atomic_output_dir, atomic_write_file
from .io import (
    ConversionError,
    load_state_dict,
    load_state_dict_files,
    raise_for_key_problems,
    strip_known_prefixes,
)

__all__ = [
    "ConversionError",
    "atomic_output_dir",
    "atomic_write_file",
    "load_state_dict",
    "load_state_dict_files",
    "raise_for_key_problems",
    "strip_known_prefixes",
]
