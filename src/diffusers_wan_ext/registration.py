"""Make Diffusers' loaders find this package's classes (runs on ``import diffusers_wan_ext``).

Two routes load a converted folder that contains one of our classes:

1. ``import diffusers_wan_ext`` first: our package becomes a loadable library next to ``diffusers`` and
   ``transformers``, and every class we add is set on the ``diffusers`` namespace, so
   ``DiffusionPipeline.from_pretrained(dir)`` and ``AutoModel.from_pretrained(dir)`` resolve them without
   ``trust_remote_code``.
2. A fresh interpreter that never imported us: the re-export shims of :mod:`diffusers_wan_ext.utils.shims` with
   ``trust_remote_code=True``.

Because Diffusers' loader prefers a component's ``<library>.py`` file over an imported library, route 1 would
otherwise ask for ``trust_remote_code`` too.  We therefore recognise our own shim -- byte-for-byte
:data:`~diffusers_wan_ext.utils.shims.SHIM_SOURCE`, nothing else -- and resolve it to the already imported classes
without executing any file from the folder.  Any other custom code still needs ``trust_remote_code=True``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from .hooks.diffusers_registry import register_hook_metadata
from .utils.shims import PACKAGE, SHIM_FILENAME, is_our_shim

__all__ = ["register"]

_REGISTERED = False


def register(classes: Mapping[str, type], hook_metadata: Mapping[str, Any] | None = None) -> None:
    """Register ``classes`` (the package's public classes by name) with Diffusers, and the families' blocks and
    processors with its hook registries (``hook_metadata``: arguments of
    :func:`~diffusers_wan_ext.hooks.diffusers_registry.register_hook_metadata`); idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    import diffusers
    from diffusers.pipelines import pipeline_loading_utils as plu

    plu.LOADABLE_CLASSES.setdefault(
        PACKAGE,
        {
            "ModelMixin": ["save_pretrained", "from_pretrained"],
            "SchedulerMixin": ["save_pretrained", "from_pretrained"],
            "DiffusionPipeline": ["save_pretrained", "from_pretrained"],
        },
    )
    for name, obj in classes.items():
        if isinstance(obj, type) and not hasattr(diffusers, name):
            setattr(diffusers, name, obj)

    original = plu.get_class_from_dynamic_module
    if not getattr(original, "_dwe_wrapped", False):

        def get_class_from_dynamic_module(pretrained_model_name_or_path, module_file, class_name=None, *args, **kwargs):
            subfolder = kwargs.get("subfolder")
            base = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
            path = module_file if os.path.isabs(str(module_file)) else os.path.join(base, module_file)
            if os.path.basename(str(module_file)) == SHIM_FILENAME and is_our_shim(path):
                cls = classes.get(class_name or "")
                if isinstance(cls, type):
                    return cls
            return original(pretrained_model_name_or_path, module_file, class_name, *args, **kwargs)

        get_class_from_dynamic_module._dwe_wrapped = True  # type: ignore[attr-defined]
        plu.get_class_from_dynamic_module = get_class_from_dynamic_module

    register_hook_metadata(**(hook_metadata or {}))
    _REGISTERED = True
