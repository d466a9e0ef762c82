"""The Video-As-Prompt family (ByteDance/Video-As-Prompt-Wan2.1-14B): a Wan2.1 I2V DiT plus a reference stream.

The release is a Diffusers-format folder whose transformer (``WanTransformer3DMOTModel``) stores the
mixture-of-transformers reference stream next to the stock names with a ``_mot_ref`` suffix; only the transformer
converts (:mod:`diffusers_wan_ext.conversion.vap`, to :class:`~diffusers_wan_ext.WanVideoAsPromptTransformer3DModel`).
"""

from __future__ import annotations

from pathlib import Path

from ..conversion.dit import DitExtension
from ..conversion.vap import convert_vap_release, is_vap_release
from ..models import WanVideoAsPromptTransformer3DModel
from ..models.transformer_wan_vap import WanVideoAsPromptMoTBlock, WanVideoAsPromptReferenceBlock
from ..pipelines import WanVideoAsPromptPipeline
from .base import ModelFamily, ReleaseOptions, WanVariant

__all__ = ["VideoAsPromptFamily"]


class VideoAsPromptFamily(ModelFamily):
    name = "video-as-prompt"
    title = "Video-As-Prompt (reference-video-driven image-to-video)"
    variants = (
        WanVariant(
            "video-as-prompt-wan2.1-14b", "video-as-prompt", "ByteDance/Video-As-Prompt-Wan2.1-14B", dim=5120,
            num_layers=40, image_encoder=True, pipeline="WanVideoAsPromptPipeline",
            notes="a Diffusers-format release (transformer/config.json class WanTransformer3DMOTModel): only the "
                  "transformer converts",
        ),
    )
    # the reference stream's keys in a Wan DiT file are handled by the Video-As-Prompt converter
    dit = DitExtension(name="video-as-prompt", foreign_keys=(("_mot_ref", "Video-As-Prompt reference stream"),))
    model_classes = (WanVideoAsPromptTransformer3DModel,)
    pipeline_classes = (WanVideoAsPromptPipeline,)
    hook_blocks = (WanVideoAsPromptMoTBlock, WanVideoAsPromptReferenceBlock)  # return the hidden states alone

    def claims_release(self, src: Path, transformer: Path | None, variant: str | None) -> bool:
        return src.is_dir() and is_vap_release(src)

    def convert_release(self, src: Path, dst: Path, options: ReleaseOptions) -> Path:
        return convert_vap_release(src, dst, dtype=options.dtype, overwrite=options.overwrite,
                                   max_shard_size=options.max_shard_size)
