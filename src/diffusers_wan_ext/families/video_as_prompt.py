"""The Video-As-Prompt family (ByteDance/Video-As-Prompt-Wan2.1-14B): a Wan2.1 I2V DiT plus a reference stream.

The release is a Diffusers-format folder whose transformer (``WanTransformer3DMOTModel``) stores the
mixture-of-transformers reference stream next to the stock names with a ``_mot_ref`` suffix; only the transformer
converts (:mod:`diffusers_wan_ext.conversion.vap`, to :class:`~diffusers_wan_ext.WanVideoAsPromptTransformer3DModel`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..conversion.dit import DitExtension
from ..conversion.vap import convert_vap_release, is_vap_release, load_vap_transformer
from ..models import WanVideoAsPromptTransformer3DModel
from ..models.transformer_wan_vap import WanVideoAsPromptMoTBlock, WanVideoAsPromptReferenceBlock
from ..pipelines import WanVideoAsPromptPipeline
from ..utils.io import read_json
from .base import Conditioning, ExtraInput, ModelFamily, ReleaseOptions, TrainingScope, WanVariant

__all__ = ["VAP_TRAINING_SCOPE", "VideoAsPromptFamily", "encode_vap_condition"]

#: The class name of the release's transformer (ByteDance's Diffusers fork).
RELEASE_CLASS = "WanTransformer3DMOTModel"


def encode_vap_condition(builder, sample: dict, inputs, num_frames: int, height: int, width: int) -> None:
    """Video-As-Prompt training inputs through the pipeline's ``prepare_condition`` (DiffSynth-Studio's
    ``WanVideoUnit_VAP``): the I2V ``y`` and CLIP features of ``input_image``; the reference stream from ``vap_video``
    (its first ``num_frames`` frames at the clip size) and the umT5 context of ``vap_prompt`` (default ``""``)."""
    pipe = builder.pipe
    image = builder.image(sample, "input_image").to(builder.device)
    reference = builder.video(sample, "vap_video").to(builder.device)
    vap_prompt = sample.get("vap_prompt") if "vap_prompt" in builder.extra_inputs else ""
    condition = pipe.prepare_condition(height=height, width=width, num_frames=num_frames, device=builder.device,
                                       image=image, vap_video=reference,
                                       vap_prompt_embeds=builder.encode_prompt(vap_prompt or ""))
    inputs.y = condition.y
    inputs.transformer_kwargs = {k: v for k, v in condition.transformer_kwargs.items() if v is not None}
    if pipe.has_clip_branch:
        inputs.image_embeds = pipe.encode_clip_image(condition.clip_image, builder.device)


VAP_CONDITIONING = Conditioning("Video-As-Prompt", WanVideoAsPromptPipeline, required=("input_image", "vap_video"),
                                optional=("vap_prompt",), encode=encode_vap_condition)
#: DiffSynth-Studio's ``vap`` model is the reference stream of our transformer: ``--trainable_models vap`` trains
#: its ``vap_*`` parameters, ``--lora_base_model vap`` puts the LoRA on ``vap_blocks`` (``dit`` then means the main
#: blocks).
VAP_TRAINING_SCOPE = TrainingScope(
    name="vap", aliases={"vap": "transformer"}, blocks="vap_blocks", parameter_prefix="vap_",
    help="vap (only the Video-As-Prompt reference stream of its transformer)",
    lora_export_formats=(),  # vap_blocks have no name in the original / Kohya / DiffSynth layouts
)


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
    conditionings = (VAP_CONDITIONING,)
    training_scopes = (VAP_TRAINING_SCOPE,)
    #: DiffSynth-Studio's Video-As-Prompt dataset columns (``input_image`` is the clip's first frame)
    dataset_inputs = {"vap_video": ExtraInput("video"), "vap_prompt": ExtraInput("str")}

    def claims_release(self, src: Path, transformer: Path | None, variant: str | None) -> bool:
        return src.is_dir() and is_vap_release(src)

    def convert_release(self, src: Path, dst: Path, options: ReleaseOptions) -> Path:
        return convert_vap_release(src, dst, dtype=options.dtype, overwrite=options.overwrite,
                                   max_shard_size=options.max_shard_size)

    def claims_config(self, config: Any) -> bool:
        return bool(getattr(config, "vap_layers", None))

    def training_conditioning(self, config: Any, expand_timesteps: bool) -> Conditioning | None:
        return VAP_CONDITIONING if self.claims_config(config) else None

    def load_training_transformer(self, path: Path, torch_dtype: torch.dtype) -> torch.nn.Module | None:
        """The release's ``transformer/`` folder (``WanTransformer3DMOTModel``), as DiffSynth-Studio pairs it with
        Wan2.1-I2V-14B's files."""
        config = path / "config.json"
        if not (path.is_dir() and config.is_file()):
            return None
        if read_json(config, "transformer config").get("_class_name") != RELEASE_CLASS:
            return None
        return load_vap_transformer(path, torch_dtype=torch_dtype)
