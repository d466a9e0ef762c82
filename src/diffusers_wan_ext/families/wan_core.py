"""The Wan core family: Wan2.1 T2V / I2V / FLF2V, Wan2.2 T2V-A14B / I2V-A14B (two experts) / TI2V-5B, krea.

Stock Diffusers covers these models (``WanTransformer3DModel``, ``WanPipeline``, ``WanImageToVideoPipeline``); we add
:class:`~diffusers_wan_ext.WanExtTransformer3DModel` for CLIP-branch DiTs whose ``text_len`` is not 512 (tiny test
models), the pipelines with our loop and reference options, and krea's block-causal streaming pipeline.
"""

from __future__ import annotations

from typing import Any

from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from ..conversion.dit import DitExtension, DitInfo, DitShape
from ..hooks.sliding_window import register_sliding_window_inputs
from ..models import WanExtTransformer3DModel, WanTextLenAttnProcessor
from ..pipelines import (
    WanExtPipeline,
    WanImageToVideoReferencePipeline,
    WanStreamingPipeline,
    WanVideoToVideoReferencePipeline,
)
from ..utils.io import ConversionError
from .base import Conditioning, ModelFamily, TinyArch, WanVariant

__all__ = ["WanCoreFamily", "core_model_class", "encode_first_frame"]

#: ``(in_dim - out_dim, CLIP branch)`` -> architecture of a DiT without extension modules (20 = 4 mask + 16 image
#: latents).
EXTRA_CHANNELS_ARCH: dict[tuple[int, bool], str] = {(20, True): "i2v", (20, False): "i2v-noclip"}


def core_model_class(info: DitInfo) -> type:
    """Stock ``WanTransformer3DModel``, or ours when a CLIP branch meets a ``text_len`` other than 512."""
    return WanExtTransformer3DModel if info.needs_text_len_processor else WanTransformer3DModel


def _detect(shape: DitShape, ext: dict[str, Any]) -> str | None:
    if shape.pos_len is not None:
        return "flf2v"
    model_type = shape.cfg.get("model_type")
    if shape.extra_channels == 0:
        arch = "ti2v" if (shape.in_dim == 48 or model_type == "ti2v") else "t2v"
        if arch == "t2v" and shape.in_dim != 16 and model_type not in (None, "t2v"):
            raise ConversionError(f"config model_type {model_type!r} does not match t2v weights")
        return arch
    return EXTRA_CHANNELS_ARCH.get((shape.extra_channels, shape.has_img))


def encode_first_frame(builder, sample: dict, inputs, num_frames: int, height: int, width: int) -> None:
    """Wan2.2 TI2V training input: the clean latent frame 0 from ``input_image`` (kept clean, not in the loss)."""
    # a one-frame clip (an image) keeps its only frame noisy: pinning it would leave nothing to predict
    if "input_image" in builder.extra_inputs and inputs.latents.shape[2] > 1:
        image = builder.image(sample, "input_image")
        inputs.first_frame_latents = builder.encode_latents(image.unsqueeze(2))


class WanCoreFamily(ModelFamily):
    name = "wan"
    title = "Wan core (T2V, I2V, FLF2V, TI2V, two experts, krea)"
    variants = (
        WanVariant("wan2.1-t2v-1.3b", "t2v", "Wan-AI/Wan2.1-T2V-1.3B", dim=1536, num_layers=30),
        WanVariant("wan2.1-t2v-14b", "t2v", "Wan-AI/Wan2.1-T2V-14B", dim=5120, num_layers=40, height=720, width=1280),
        WanVariant(
            "wan2.1-i2v-14b-480p", "i2v", "Wan-AI/Wan2.1-I2V-14B-480P", dim=5120, num_layers=40, image_encoder=True,
            pipeline="WanImageToVideoPipeline", flow_shift=3.0, num_inference_steps=40,
        ),
        WanVariant(
            "wan2.1-i2v-14b-720p", "i2v", "Wan-AI/Wan2.1-I2V-14B-720P", dim=5120, num_layers=40, image_encoder=True,
            pipeline="WanImageToVideoPipeline", flow_shift=5.0, num_inference_steps=40, height=720, width=1280,
        ),
        WanVariant(
            "wan2.1-flf2v-14b-720p", "flf2v", "Wan-AI/Wan2.1-FLF2V-14B-720P", dim=5120, num_layers=40,
            image_encoder=True, pipeline="WanImageToVideoPipeline", flow_shift=16.0, height=720, width=1280,
        ),
        WanVariant(
            "wan2.2-t2v-a14b", "t2v", "Wan-AI/Wan2.2-T2V-A14B", dim=5120, num_layers=40, experts=2,
            boundary_ratio=0.875, flow_shift=12.0, num_inference_steps=40, guidance_scale=4.0, guidance_scale_2=3.0,
            height=720, width=1280,
        ),
        WanVariant(
            "wan2.2-i2v-a14b", "i2v-noclip", "Wan-AI/Wan2.2-I2V-A14B", dim=5120, num_layers=40, experts=2,
            pipeline="WanImageToVideoPipeline", boundary_ratio=0.9, flow_shift=5.0, num_inference_steps=40,
            guidance_scale=3.5, guidance_scale_2=3.5, height=720, width=1280,
        ),
        WanVariant(
            "wan2.2-ti2v-5b", "ti2v", "Wan-AI/Wan2.2-TI2V-5B", dim=3072, num_layers=30, vae="wan2.2",
            expand_timesteps=True, flow_shift=5.0, height=704, width=1280, num_frames=121, fps=24,
        ),
        WanVariant(
            "krea-realtime-video", "t2v", "krea/krea-realtime-video", dim=5120, num_layers=40,
            flow_shift=20.0, num_inference_steps=6, guidance_scale=1.0, file_hints=(("krea",),),
            notes="distilled Wan2.1-T2V-14B (single file, 'model.' prefix); few steps, no CFG; block-by-block "
                  "streaming with WanStreamingPipeline (same folder)",
        ),
    )
    dit = DitExtension(
        name="wan", arches=("t2v", "i2v", "i2v-noclip", "flf2v", "ti2v"),
        layouts="t2v 16/16, i2v / Fun-InP 36/16, ti2v 48/48", detect=_detect, model_class=core_model_class,
        priority=90,
    )
    model_classes = (WanExtTransformer3DModel,)
    # stock registers only the deprecated WanAttnProcessor2_0 alias
    hook_processors = (WanAttnProcessor, WanTextLenAttnProcessor)
    pipeline_classes = (
        WanExtPipeline, WanImageToVideoReferencePipeline, WanVideoToVideoReferencePipeline, WanStreamingPipeline,
    )
    tiny_arches = {
        "t2v": TinyArch("t2v", 16, 16),
        "i2v": TinyArch("i2v", 36, 16, clip=True),
        "i2v-noclip": TinyArch("i2v", 36, 16),
        "flf2v": TinyArch("flf2v", 36, 16, clip=True),
        "ti2v": TinyArch("ti2v", 48, 48, vae="wan2.2"),
    }
    conditionings = (
        Conditioning("text-to-video", WanPipeline, optional=("motion_bucket_id",)),
        Conditioning("Wan2.2 TI2V (first frame in the latents)", WanPipeline, optional=("input_image",),
                     encode=encode_first_frame),
    )

    def tiny_dit_model(self, arch: str, experts: int, kwargs: dict[str, Any]):
        if arch == "flf2v":
            kwargs = dict(kwargs, pos_embed_seq_len=2 * 257)
        return WanTransformer3DModel(**kwargs), {}

    def register_runtime_hooks(self) -> None:
        # sliding windows: stock's only frame-carrying inputs are hidden_states (I2V: y in its channels) and TI2V's
        # per-token timesteps, which the hook slices itself
        register_sliding_window_inputs(WanTransformer3DModel, {})

    def training_conditioning(self, config: Any, expand_timesteps: bool) -> Conditioning | None:
        if config.in_channels != config.out_channels:
            return None
        return self.conditionings[1] if expand_timesteps else self.conditionings[0]
