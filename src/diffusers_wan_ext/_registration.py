"""Make Diffusers' loaders find this package's classes.

Two routes load a converted folder that contains one of our classes:

1. ``import diffusers_wan_ext`` first (this module runs on import): our package becomes a loadable library next to
   ``diffusers`` and ``transformers``, and every class we add is set on the ``diffusers`` namespace, so
   ``DiffusionPipeline.from_pretrained(dir)`` and ``AutoModel.from_pretrained(dir)`` resolve them without
   ``trust_remote_code``.
2. A fresh interpreter that never imported us: every component folder holding one of our classes carries a shim
   file ``diffusers_wan_ext.py`` (:data:`SHIM_SOURCE`, a star re-export of the installed package), and
   ``model_index.json`` names the library ``diffusers_wan_ext``; Diffusers then loads the shim as custom code when
   the caller passes ``trust_remote_code=True``.

Because Diffusers' loader prefers a component's ``<library>.py`` file over an imported library, route 1 would
otherwise ask for ``trust_remote_code`` too.  We therefore recognise our own shim -- byte-for-byte
:data:`SHIM_SOURCE`, nothing else -- and resolve it to the already imported package without executing any file
from the folder.  Any other custom code still needs ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PACKAGE = "diffusers_wan_ext"
SHIM_FILENAME = f"{PACKAGE}.py"
SHIM_SOURCE = (
    "# Written by diffusers_wan_ext: lets `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` load this\n"
    "# folder without importing diffusers_wan_ext first. It only re-exports the installed package\n"
    "# (pip install diffusers_wan_ext); no model code lives here.\n"
    "from diffusers_wan_ext import *  # noqa: F401,F403\n"
)

_REGISTERED = False


def _is_our_shim(path: str | os.PathLike) -> bool:
    try:
        return Path(path).read_text() == SHIM_SOURCE
    except OSError:
        return False


def write_shim(folder: str | os.PathLike) -> None:
    """Write the re-export shim into ``folder`` (a component folder or a pipeline root)."""
    Path(folder, SHIM_FILENAME).write_text(SHIM_SOURCE)


def rewrite_model_index_for_shims(folder: str | os.PathLike) -> None:
    """After ``save_pretrained``: make ``model_index.json`` load in a fresh interpreter with ``trust_remote_code``.

    The pipeline class itself, if it is ours, becomes ``["diffusers_wan_ext", Name]`` with a root shim; component
    entries already read ``["diffusers_wan_ext", Name]`` and their folders get a shim each.
    """
    import diffusers_wan_ext

    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    ours = set(diffusers_wan_ext.__all__)
    name = index.get("_class_name")
    if isinstance(name, str) and name in ours:
        index["_class_name"] = [PACKAGE, name]
        write_shim(folder)
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, cls = value
        if cls in ours and (library in (PACKAGE, None) or str(library).startswith(PACKAGE + ".")):
            index[key] = [PACKAGE, cls]
            if (folder / key).is_dir():
                write_shim(folder / key)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class ShimSaveMixin:
    """Mixin for our models and schedulers: ``save_pretrained`` also writes the re-export shim next to the config,
    so a folder saved by any pipeline (ours or stock) keeps loading with ``trust_remote_code=True``."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if os.path.isdir(save_directory):
            write_shim(save_directory)
        return result


class ShimPipelineMixin:
    """Mixin for our pipelines: ``save_pretrained`` rewrites ``model_index.json`` for the shim route."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if os.path.isfile(os.path.join(save_directory, "model_index.json")):
            rewrite_model_index_for_shims(save_directory)
        return result


def register() -> None:
    """Register our classes with Diffusers (idempotent; called on ``import diffusers_wan_ext``)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import diffusers
    from diffusers.pipelines import pipeline_loading_utils as plu

    import diffusers_wan_ext

    plu.LOADABLE_CLASSES.setdefault(
        PACKAGE,
        {
            "ModelMixin": ["save_pretrained", "from_pretrained"],
            "SchedulerMixin": ["save_pretrained", "from_pretrained"],
            "DiffusionPipeline": ["save_pretrained", "from_pretrained"],
        },
    )
    for name in diffusers_wan_ext.__all__:
        obj = getattr(diffusers_wan_ext, name)
        if isinstance(obj, type) and not hasattr(diffusers, name):
            setattr(diffusers, name, obj)

    original = plu.get_class_from_dynamic_module
    if not getattr(original, "_dwe_wrapped", False):

        def get_class_from_dynamic_module(pretrained_model_name_or_path, module_file, class_name=None, *args, **kwargs):
            subfolder = kwargs.get("subfolder")
            base = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
            path = module_file if os.path.isabs(str(module_file)) else os.path.join(base, module_file)
            if os.path.basename(str(module_file)) == SHIM_FILENAME and _is_our_shim(path):
                cls = getattr(diffusers_wan_ext, class_name or "", None)
                if cls is not None:
                    return cls
            return original(pretrained_model_name_or_path, module_file, class_name, *args, **kwargs)

        get_class_from_dynamic_module._dwe_wrapped = True  # type: ignore[attr-defined]
        plu.get_class_from_dynamic_module = get_class_from_dynamic_module

    _register_hooks()
    _REGISTERED = True


def _register_hooks() -> None:
    """Tell Diffusers' hook registries about the block and processor classes Wan models use, so cache, layer-skip
    and offload hooks find them in our transformers and in stock VACE:

    * ``WanVACETransformerBlock`` (stock has no entry): returns ``(hint, control_hidden_states)`` and carries its
      stream in ``control_hidden_states``;
    * ``WanAttnProcessor`` (stock registers only the deprecated ``WanAttnProcessor2_0`` alias, whose ``__new__``
      returns a ``WanAttnProcessor``) and our :class:`~diffusers_wan_ext.WanTextLenAttnProcessor`;
    * LongCat-Video's ``LongCatVideoTransformerBlock`` and ``LongCatVideoAttnProcessor``.

    Our Fun transformer reuses stock ``WanTransformerBlock`` (already registered), so it needs no entry; the S2V
    block (a ``WanTransformerBlock`` subclass with two modulation segments) gets the stock block's metadata.
    """
    from diffusers.hooks._helpers import (
        AttentionProcessorMetadata,
        AttentionProcessorRegistry,
        TransformerBlockMetadata,
        TransformerBlockRegistry,
    )
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    from diffusers.models.transformers.transformer_wan_vace import WanVACETransformerBlock

    from .models.attention_processor import WanTextLenAttnProcessor
    from .models.transformer_longcat import LongCatVideoAttnProcessor, LongCatVideoTransformerBlock
    from .models.transformer_wan_s2v import WanS2VTransformerBlock

    TransformerBlockRegistry._register()
    for block in (LongCatVideoTransformerBlock, WanS2VTransformerBlock):
        if block in TransformerBlockRegistry._registry:
            continue
        TransformerBlockRegistry.register(
            block,
            TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
        )
    if WanVACETransformerBlock not in TransformerBlockRegistry._registry:
        TransformerBlockRegistry.register(
            WanVACETransformerBlock,
            TransformerBlockMetadata(
                return_hidden_states_index=1,
                return_encoder_hidden_states_index=None,
                hidden_states_argument_name="control_hidden_states",
            ),
        )
    AttentionProcessorRegistry._register()
    for processor in (WanAttnProcessor, WanTextLenAttnProcessor, LongCatVideoAttnProcessor):
        if processor not in AttentionProcessorRegistry._registry:
            AttentionProcessorRegistry.register(
                processor, AttentionProcessorMetadata(skip_processor_output_fn=_skip_attention_output)
            )


def _skip_attention_output(attn, hidden_states, *args, **kwargs):
    """Layer skip of a Wan attention: the processor's output is its input ``hidden_states``."""
    return hidden_states
