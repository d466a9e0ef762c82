"""The CLIP image processor class, resolved without Transformers' "requires torchvision" warning.

Transformers 5 splits ``CLIPImageProcessor`` into a torchvision backend (``CLIPImageProcessor``) and a PIL backend
(``CLIPImageProcessorPil``).  Without torchvision, the first ``from transformers import CLIPImageProcessor`` falls
back to the PIL class and logs a warning on stderr.  Diffusers' own Wan modules run that import
(``pipeline_wan_i2v``, ``pipeline_wan_animate``), and our pipelines subclass them, so ``import diffusers_wan_ext``
would print it.  :func:`bind_clip_image_processor` makes the same binding as that fallback, before those modules
load and without the warning.  With torchvision installed, or with Transformers 4 (whose ``CLIPImageProcessor`` is
the PIL class), it changes nothing.

Saved folders are unaffected: ``preprocessor_config.json`` names ``CLIPImageProcessor`` either way.
"""

from __future__ import annotations

import transformers
from transformers.utils import is_torchvision_available

__all__ = ["bind_clip_image_processor", "clip_image_processor_class"]

CLIP_IMAGE_PROCESSOR = "CLIPImageProcessor"
CLIP_IMAGE_PROCESSOR_PIL = "CLIPImageProcessorPil"


def clip_image_processor_class() -> type:
    """The class ``from transformers import CLIPImageProcessor`` resolves to here, without logging anything.

    The PIL backend when this Transformers has one and torchvision is missing, else ``CLIPImageProcessor``.
    """
    pil = getattr(transformers, CLIP_IMAGE_PROCESSOR_PIL, None)  # None on Transformers 4 (no split)
    if pil is not None and not is_torchvision_available():
        return pil
    return getattr(transformers, CLIP_IMAGE_PROCESSOR)


def bind_clip_image_processor() -> None:
    """Resolve ``transformers.CLIPImageProcessor`` now, silently (see the module docstring); idempotent.

    Only acts where Transformers' own fallback would bind the PIL class and warn; otherwise the lazy lookup is left
    to Transformers.
    """
    if CLIP_IMAGE_PROCESSOR in vars(transformers):
        return  # already resolved (by an earlier import or call)
    pil = getattr(transformers, CLIP_IMAGE_PROCESSOR_PIL, None)
    if pil is not None and not is_torchvision_available():
        setattr(transformers, CLIP_IMAGE_PROCESSOR, pil)  # the binding Transformers' fallback makes, minus its log
