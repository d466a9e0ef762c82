"""The Wan releases this package converts, as data.

Each :class:`WanVariant` row states how a release is recognised (architecture from key names, release widths from
shapes) and what a converted Diffusers folder needs (pipeline class, VAE, image encoder, experts, sampling
defaults taken from the original configs).  Detection (:func:`detect_variant`) never guesses between rows that the
weights cannot tell apart (e.g. I2V 480P vs 720P): it picks the first row of the architecture and the ``--variant``
flag chooses another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["WanVariant", "VARIANTS", "ARCHITECTURES", "get_variant", "variants_for_arch"]


@dataclass(frozen=True)
class WanVariant:
    """One release: how it is recognised and what its converted folder contains."""

    name: str
    arch: str  # one of dit.ARCHITECTURES (what the DiT keys say), or "longcat" (its own DiT, conversion.longcat)
    release: str  # Hub id of the original release
    dim: int | None = None  # release width (None: any width, e.g. tiny test models)
    num_layers: int | None = None
    experts: int = 1  # 2 = high_noise_model/ + low_noise_model/
    vae: str = "wan2.1"
    image_encoder: bool = False
    audio_encoder: bool = False  # Wan2.2-S2V: wav2vec2 audio encoder + processor
    pipeline: str = "WanPipeline"
    boundary_ratio: float | None = None
    expand_timesteps: bool = False
    # sampling defaults of the original code (generate.py / configs)
    flow_shift: float = 5.0
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    guidance_scale_2: float | None = None  # low-noise expert (Wan2.2 A14B)
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: int = 16
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


VARIANTS: tuple[WanVariant, ...] = (
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
    # --- Wan-Fun (PAI / VideoX-Fun): sampling defaults of VideoX-Fun's predict_* examples -----------------------
    WanVariant(
        "wan2.1-fun-1.3b-inp", "i2v", "PAI/Wan2.1-Fun-1.3B-InP", dim=1536, num_layers=30, image_encoder=True,
        pipeline="WanFunInpaintPipeline", flow_shift=3.0, guidance_scale=6.0,
        aliases=("wan2.1-fun-v1.1-1.3b-inp",), notes="V1.1-1.3B-InP has the same layout: --variant picks the name",
    ),
    WanVariant(
        "wan2.1-fun-14b-inp", "i2v", "PAI/Wan2.1-Fun-14B-InP", dim=5120, num_layers=40, image_encoder=True,
        pipeline="WanFunInpaintPipeline", flow_shift=3.0, guidance_scale=6.0, aliases=("wan2.1-fun-v1.1-14b-inp",),
        notes="same layout as Wan2.1-I2V-14B: detected from a folder name containing 'Fun' or chosen by --variant",
    ),
    WanVariant(
        "wan2.1-fun-1.3b-control", "fun-control", "PAI/Wan2.1-Fun-1.3B-Control", dim=1536, num_layers=30,
        image_encoder=True, pipeline="WanFunControlPipeline", flow_shift=3.0, guidance_scale=6.0,
    ),
    WanVariant(
        "wan2.1-fun-14b-control", "fun-control", "PAI/Wan2.1-Fun-14B-Control", dim=5120, num_layers=40,
        image_encoder=True, pipeline="WanFunControlPipeline", flow_shift=3.0, guidance_scale=6.0,
    ),
    WanVariant(
        "wan2.1-fun-v1.1-1.3b-control", "fun-control-ref", "PAI/Wan2.1-Fun-V1.1-1.3B-Control", dim=1536,
        num_layers=30, image_encoder=True, pipeline="WanFunControlPipeline", flow_shift=3.0, guidance_scale=6.0,
    ),
    WanVariant(
        "wan2.1-fun-v1.1-14b-control", "fun-control-ref", "PAI/Wan2.1-Fun-V1.1-14B-Control", dim=5120,
        num_layers=40, image_encoder=True, pipeline="WanFunControlPipeline", flow_shift=3.0, guidance_scale=6.0,
    ),
    WanVariant(
        "wan2.1-fun-v1.1-1.3b-control-camera", "fun-camera", "PAI/Wan2.1-Fun-V1.1-1.3B-Control-Camera", dim=1536,
        num_layers=30, image_encoder=True, pipeline="WanFunCameraControlPipeline", flow_shift=3.0, guidance_scale=6.0,
    ),
    WanVariant(
        "wan2.1-fun-v1.1-14b-control-camera", "fun-camera", "PAI/Wan2.1-Fun-V1.1-14B-Control-Camera", dim=5120,
        num_layers=40, image_encoder=True, pipeline="WanFunCameraControlPipeline", flow_shift=3.0,
        guidance_scale=6.0,
    ),
    WanVariant(
        "wan2.2-fun-a14b-inp", "i2v-noclip", "PAI/Wan2.2-Fun-A14B-InP", dim=5120, num_layers=40, experts=2,
        pipeline="WanFunInpaintPipeline", boundary_ratio=0.9, flow_shift=5.0, guidance_scale=6.0,
        notes="same layout as Wan2.2-I2V-A14B: detected from a folder name containing 'Fun' or chosen by --variant",
    ),
    WanVariant(
        "wan2.2-fun-a14b-control", "fun-control-ref", "PAI/Wan2.2-Fun-A14B-Control", dim=5120, num_layers=40,
        experts=2, pipeline="WanFunControlPipeline", boundary_ratio=0.9, flow_shift=5.0, guidance_scale=6.0,
    ),
    WanVariant(
        "wan2.2-fun-a14b-control-camera", "fun-camera", "PAI/Wan2.2-Fun-A14B-Control-Camera", dim=5120,
        num_layers=40, experts=2, pipeline="WanFunCameraControlPipeline", boundary_ratio=0.9, flow_shift=5.0,
        guidance_scale=6.0,
    ),
    # --- VACE: stock WanVACEPipeline ---------------------------------------------------------------------------
    WanVariant(
        "wan2.1-vace-1.3b", "vace", "Wan-AI/Wan2.1-VACE-1.3B", dim=1536, num_layers=30, pipeline="WanVACEPipeline",
        aliases=("vace-wan2.1-1.3b-preview",), notes="iic/VACE-Wan2.1-1.3B-Preview has the same layout",
    ),
    WanVariant(
        "wan2.1-vace-14b", "vace", "Wan-AI/Wan2.1-VACE-14B", dim=5120, num_layers=40, pipeline="WanVACEPipeline",
        height=720, width=1280,
    ),
    WanVariant(
        "wan2.2-vace-fun-a14b", "vace", "PAI/Wan2.2-VACE-Fun-A14B", dim=5120, num_layers=40, experts=2,
        pipeline="WanVACEPipeline", boundary_ratio=0.875, flow_shift=5.0, guidance_scale=5.0,
    ),
    # --- Wan2.2-Animate: stock WanAnimatePipeline (sampling defaults of wan_animate_14B.py / generate.py) -------
    WanVariant(
        "wan2.2-animate-14b", "animate", "Wan-AI/Wan2.2-Animate-14B", dim=5120, num_layers=40, image_encoder=True,
        pipeline="WanAnimatePipeline", flow_shift=5.0, num_inference_steps=20, guidance_scale=1.0, height=720,
        width=1280, num_frames=77, fps=30,
        notes="num_frames = frames per segment (clip_len); relighting_lora.ckpt -> relighting_lora/ (Diffusers LoRA)",
    ),
    # --- Wan2.2-S2V: speech-to-video (num_frames = frames per clip; clips follow the audio) ----------------------
    WanVariant(
        "wan2.2-s2v-14b", "s2v", "Wan-AI/Wan2.2-S2V-14B", dim=5120, num_layers=40, audio_encoder=True,
        pipeline="WanSpeechToVideoPipeline", flow_shift=3.0, num_inference_steps=40, guidance_scale=4.5,
        height=448, width=832, num_frames=80, fps=16,
        notes="num_frames is per clip (4n); the pipeline generates as many clips as the audio spans",
    ),
    WanVariant(
        "krea-realtime-video", "t2v", "krea/krea-realtime-video", dim=5120, num_layers=40,
        flow_shift=20.0, num_inference_steps=6, guidance_scale=1.0,
        notes="distilled Wan2.1-T2V-14B (single file, 'model.' prefix); few steps, no CFG; block-by-block streaming "
              "with WanStreamingPipeline (same folder)",
    ),
    # --- LongCat-Video: its own DiT with the Wan2.1 VAE and umT5 (conversion.longcat) ----------------------------
    WanVariant(
        "longcat-video", "longcat", "meituan-longcat/LongCat-Video", dim=4096, num_layers=48,
        pipeline="LongCatVideoPipeline", flow_shift=12.0, num_inference_steps=50, guidance_scale=4.0,
        height=480, width=832, num_frames=93, fps=15,
        notes="LongCatVideoTransformer3DModel; dit/ converted, vae/ text_encoder/ tokenizer/ scheduler/ kept; "
        "text-to-video and continuation (video=, num_cond_frames=13)",
    ),
)

from .dit import ARCHITECTURES  # noqa: E402  (what the DiT weights can say)


def get_variant(name: str) -> WanVariant:
    key = name.lower()
    for v in VARIANTS:
        if key == v.name or key in v.aliases:
            return v
    raise ValueError(f"unknown variant {name!r}; choose one of: {', '.join(v.name for v in VARIANTS)}")


def variants_for_arch(arch: str, experts: int) -> list[WanVariant]:
    return [v for v in VARIANTS if v.arch == arch and v.experts == experts]
