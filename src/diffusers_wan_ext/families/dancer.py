"""The Wan2.2-Dancer family (Wan-AI/Wan-Dancer-14B; DiffSynth-Studio's "WanToDance"): music-driven dance video.

The release ships two DiTs of one layout -- ``global_model.safetensors`` (keyframes at a low frame rate, 7.5 fps)
and ``local_model.safetensors`` (30-fps rendering between keyframes) -- plus the Wan2.1 umT5, VAE and CLIP files.
Each DiT is a Wan I2V DiT with a music encoder, per-layer music injection, reference-image tokens and a global patch
embedding / head (:class:`~diffusers_wan_ext.models.WanDancerTransformer3DModel`; key tables and detection in
:mod:`diffusers_wan_ext.conversion.dancer`).

Converted, the two-stage release is one pipeline folder: ``transformer`` = the global model, ``transformer_2`` = the
local model (:class:`~diffusers_wan_ext.pipelines.WanDancerPipeline`)::

    diffusers-wan convert Wan-Dancer-14B Wan-Dancer-14B-diffusers \\
        --transformer Wan-Dancer-14B/global_model.safetensors \\
        --transformer-2 Wan-Dancer-14B/local_model.safetensors --tokenizer umt5-xxl

Either DiT alone converts too (``--variant wan-dancer-14b-global`` / ``-local``).  TeaCache is refused (the music
injections between the blocks are not part of its cached residual), and so are context parallelism and sliding
windows (the music tokens and the keyframe RoPE span the whole clip): see the model class.
"""

from __future__ import annotations

from typing import Any

from ..conversion.dancer import DANCER_BLOCK_TABLES, DANCER_TOP_LEVEL_KEYS, dancer_config, detect_dancer
from ..conversion.dit import DitExtension, DitInfo
from ..models import WanDancerTransformer3DModel
from ..models.transformer_wan_dancer import WanDancerCrossAttnProcessor
from ..pipelines import WanDancerPipeline
from .base import GenerateInput, ModelFamily, TinyArch, WanVariant

__all__ = ["DancerFamily", "TINY_DANCER_CONFIG"]

_COMMON = dict(arch="dancer", release="Wan-AI/Wan-Dancer-14B", dim=5120, num_layers=40, image_encoder=True,
               pipeline="WanDancerPipeline", flow_shift=5.0, guidance_scale=5.0, height=1280, width=720,
               num_frames=149, fps=30)
# Sampling defaults of DiffSynth-Studio's examples (Wan-Dancer-14B-global.py / -local.py): 1280x720 portrait,
# 149 keyframes at 7.5 fps (48 steps), 149-frame local segments at 30 fps (24 steps), CFG 5 with the negative branch
# skipping block 9, sigma shift 5.
WAN_DANCER = WanVariant(
    "wan-dancer-14b", experts=2, num_inference_steps=48,
    notes="transformer = global_model (keyframes at 7.5 fps), transformer_2 = local_model (30 fps); music + "
          "reference image -> dance video; 24 local steps",
    aliases=("wan2.2-dancer-14b",), **_COMMON,
)
WAN_DANCER_GLOBAL = WanVariant(
    "wan-dancer-14b-global", num_inference_steps=48,
    notes="global_model.safetensors alone: keyframes at 7.5 fps", file_hints=(("global",),),
    aliases=("wan2.2-dancer-14b-global",), **_COMMON,
)
WAN_DANCER_LOCAL = WanVariant(
    "wan-dancer-14b-local", num_inference_steps=24,
    notes="local_model.safetensors alone: 30-fps segments between given keyframes", file_hints=(("local",),),
    aliases=("wan2.2-dancer-14b-local",), **_COMMON,
)

#: The tiny Dancer DiT's Dancer options (release: 4 music heads, 2 layers; widths 256 / 1024; 8 inject layers).
TINY_DANCER_CONFIG = dict(music_latent_dim=32, music_ff_size=64, music_num_heads=4, music_num_layers=2,
                          music_inject_layers=[0, 1])


def _model_class(info: DitInfo) -> type:
    return WanDancerTransformer3DModel


class DancerFamily(ModelFamily):
    name = "dancer"
    title = "Wan2.2-Dancer (music + reference image -> dance video)"
    variants = (WAN_DANCER, WAN_DANCER_GLOBAL, WAN_DANCER_LOCAL)
    dit = DitExtension(
        name="dancer", arches=("dancer",), layouts="Dancer 36/16 + music_* / img_emb_refimage / head_global",
        top_level_keys=DANCER_TOP_LEVEL_KEYS, block_tables=DANCER_BLOCK_TABLES, config=dancer_config,
        detect=detect_dancer, model_class=_model_class, priority=25,
    )
    model_classes = (WanDancerTransformer3DModel,)
    pipeline_classes = (WanDancerPipeline,)
    hook_processors = (WanDancerCrossAttnProcessor,)
    generate_inputs = (
        GenerateInput("--music", "music", "Wan-Dancer: the music file (wav / mp3 / flac); --image = the dancer's "
                      "reference image"),
    )
    card_calls = {
        "WanDancerPipeline": (
            'image=load_image("dancer.png"), music="music.wav", prompt="a person is dancing",\n'
            "             height={height}, width={width}, num_inference_steps={num_inference_steps}, "
            "guidance_scale={guidance_scale}"
        ),
    }
    tiny_arches = {"dancer": TinyArch("i2v", 36, 16, clip=True)}

    def tiny_dit_model(self, arch: str, experts: int, kwargs: dict[str, Any]):
        model = WanDancerTransformer3DModel(**kwargs, **TINY_DANCER_CONFIG, ref_conv_in_channels=16)
        extra = dict(wantodance_music_inject_layers=TINY_DANCER_CONFIG["music_inject_layers"],
                     music_num_heads=TINY_DANCER_CONFIG["music_num_heads"])
        return model, extra
