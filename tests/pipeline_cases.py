"""Tiny pipelines of every class we ship (plus stock ``WanPipeline``), for tests that run each one the same way.

One factory per pipeline class: ``factory(folders) -> (pipe, call_kwargs)``.  The pipe is fp32 on the CPU, built with
fixed seeds (every process that calls a factory gets the same weights); ``call_kwargs`` run one denoising step (two
where two experts take turns) on a few frames with classifier-free guidance, returning decoded frames.
``folders`` is the folder :func:`prepare_folders` filled once (converted tiny releases for the pipelines whose
components are easier to convert than to build: S2V with its audio encoder, Animate with its adapters).

:func:`pipeline_cases` lists them as :class:`PipelineCase` with what each declares: CFG parallel (the pipeline's
``supports_cfg_parallel``) and sequence parallel (the transformer has a context-parallel plan; Video-As-Prompt, S2V
and Animate declare ``_cp_unsupported_reason`` instead, and streaming declares ``supports_sequence_parallel = False``
for its block-causal attention).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from PIL import Image

from diffusers_wan_ext import (
    LongCatVideoPipeline,
    LongCatVideoTransformer3DModel,
    WanAnimateExtPipeline,
    WanExtPipeline,
    WanFunCameraControlPipeline,
    WanFunControlPipeline,
    WanFunInpaintPipeline,
    WanImageToVideoReferencePipeline,
    WanSpeechToVideoPipeline,
    WanSpeedControlPipeline,
    WanStreamingPipeline,
    WanVideoAsPromptPipeline,
    WanVideoAsPromptTransformer3DModel,
    WanVideoToVideoReferencePipeline,
)
from diffusers_wan_ext.schedulers import WanFlowMatchScheduler
from test_fun_pipelines import CLIP_DIM, make_clip, make_scheduler, make_text_parts, make_transformer, make_vae, picture
from test_speed_control_pipeline import make_motion_controller

H = W = 16  # 2 x 2 latents: one token per latent frame (two latent frames: the Ulysses-2 split still divides)
F = 5
STEPS = 1  # 2 where a pipeline switches between two experts
S2V_SIZE = 64  # the FramePack 4x group needs latent sizes >= 8
ANIMATE_TEXT_LEN = 16  # a text_len other than 512 loads our WanAnimateExtTransformer3DModel

Factory = Callable[[Path], "tuple[Any, dict[str, Any]]"]


@dataclass(frozen=True)
class PipelineCase:
    """A tiny pipeline and what it declares for parallel inference."""

    name: str
    factory: Factory
    cfg_parallel: bool = True  # the pipeline declares supports_cfg_parallel
    #: what refuses sequence parallel (a fragment of the error), None where it runs: the transformer's
    #: ``_cp_unsupported_reason`` or the pipeline's ``supports_sequence_parallel = False``
    refusal: str | None = None

    @property
    def sequence_parallel(self) -> bool:
        return self.refusal is None


# ------------------------------------------------------------------------------------------------ shared parts
_TEXT: dict[Path, tuple] = {}


def text_parts(folders: Path) -> tuple:
    """The tiny umT5 tokenizer + encoder (built once per process, in a folder of its own: ranks run concurrently)."""
    if folders not in _TEXT:
        _TEXT[folders] = make_text_parts(folders / f"umt5-{os.getpid()}")
    return _TEXT[folders]


def _text(folders: Path) -> dict[str, Any]:
    tokenizer, text_encoder = text_parts(folders)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder)


def _common(**kwargs) -> dict[str, Any]:
    return {**dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=4.0),
            **kwargs}


def _frames(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _image(seed: int) -> Image.Image:
    return picture(seed, size=(W, H))


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Stock inits leave some tables at zero: make every path live."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def prepare_folders(folders: Path) -> Path:
    """Convert the tiny releases that :func:`speech_to_video` and :func:`animate` load, into ``folders``."""
    from diffusers_wan_ext.release_converter import convert_release
    from diffusers_wan_ext.demo import TINY, make_tiny_release

    folders.mkdir(parents=True, exist_ok=True)
    for arch, text_len in (("s2v", 512), ("animate", ANIMATE_TEXT_LEN)):
        if not (folders / arch / "model_index.json").exists():
            release = make_tiny_release(folders / f"release-{arch}", arch=arch, text_len=text_len)
            convert_release(release, folders / arch, dtype="fp32", progress=False,
                            image_encoder_heads=TINY["clip_heads"])
    return folders


# --------------------------------------------------------------------------------------------------- factories
def wan_ext(folders: Path):
    """``WanExtPipeline``: Wan2.2 A14B layout (two experts), text-to-video."""
    pipe = WanExtPipeline(**_text(folders), vae=make_vae(), scheduler=make_scheduler(),
                          transformer=make_transformer(16, clip=False, stock=True, seed=1),
                          transformer_2=make_transformer(16, clip=False, stock=True, seed=2), boundary_ratio=0.875)
    return pipe, _common(height=H, width=W, num_frames=F, guidance_scale_2=2.5, num_inference_steps=2)


def stock_wan(folders: Path):
    """Stock Diffusers ``WanPipeline`` (no ``supports_cfg_parallel``: sequence parallel only)."""
    pipe = WanPipeline(**_text(folders), vae=make_vae(), scheduler=make_scheduler(),
                       transformer=make_transformer(16, clip=False, stock=True, seed=1))
    return pipe, _common(height=H, width=W, num_frames=F)


def fun_inpaint(folders: Path):
    """``WanFunInpaintPipeline`` (Wan2.2-Fun InP layout: no CLIP branch), first and last frame."""
    pipe = WanFunInpaintPipeline(**_text(folders), vae=make_vae(), scheduler=make_scheduler(),
                                 transformer=make_transformer(36, clip=False, seed=3))
    return pipe, _common(height=H, width=W, num_frames=F, image=_image(1), end_image=_image(2))


def fun_control(folders: Path):
    """``WanFunControlPipeline`` with a reference image (Wan2.2-Fun Control layout, 52 channels, ``ref_conv``)."""
    pipe = WanFunControlPipeline(**_text(folders), vae=make_vae(), scheduler=make_scheduler(),
                                 transformer=make_transformer(52, clip=False, ref_conv=True, seed=4))
    return pipe, _common(height=H, width=W, num_frames=F, control_video=_frames(F, H, 7), image=_image(3),
                         reference_image=_image(4))


def fun_camera(folders: Path):
    """``WanFunCameraControlPipeline`` (camera adapter, no CLIP)."""
    pipe = WanFunCameraControlPipeline(**_text(folders), vae=make_vae(), scheduler=make_scheduler(),
                                       transformer=make_transformer(36, clip=False, camera=True, seed=5))
    return pipe, _common(height=H, width=W, num_frames=F, image=_image(5), camera_control_direction="LeftUp",
                         camera_control_speed=0.05)


def speed_control(folders: Path):
    """``WanSpeedControlPipeline`` with its motion controller."""
    pipe = WanSpeedControlPipeline(**_text(folders), vae=make_vae(), scheduler=make_scheduler(),
                                   transformer=make_transformer(16, clip=False, stock=True, seed=6),
                                   motion_controller=make_motion_controller())
    return pipe, _common(height=H, width=W, num_frames=F, motion_bucket_id=3)


def video_as_prompt(folders: Path):
    """``WanVideoAsPromptPipeline`` (joint attention with the reference stream: no sequence parallel)."""
    torch.manual_seed(7)
    model = WanVideoAsPromptTransformer3DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=36, text_dim=32, freq_dim=32, ffn_dim=96,
        num_layers=2, image_dim=CLIP_DIM, added_kv_proj_dim=48, text_len=512, vap_layers=[0],
    )
    processor, clip = make_clip()
    pipe = WanVideoAsPromptPipeline(**_text(folders), vae=make_vae(), scheduler=make_scheduler(),
                                    image_processor=processor, image_encoder=clip, transformer=_perturbed(model, 7))
    return pipe, _common(height=H, width=W, num_frames=F, image=_image(6), vap_video=_frames(F, H, 8),
                         vap_prompt="a shoe turns into a balloon", negative_vap_prompt="static")


def speech_to_video(folders: Path):
    """``WanSpeechToVideoPipeline`` from the converted tiny S2V release (audio injection: no sequence parallel)."""
    pipe = WanSpeechToVideoPipeline.from_pretrained(folders / "s2v")
    audio = (np.sin(np.linspace(0, 400, 8000)) * 0.2).astype(np.float32)
    return pipe, _common(height=S2V_SIZE, width=S2V_SIZE, image=picture(7, size=(S2V_SIZE, S2V_SIZE)), audio=audio,
                         audio_sample_rate=16000, num_frames_per_clip=8, num_clips=1, fps=16, max_sequence_length=16)


def animate(folders: Path):
    """``WanAnimateExtPipeline`` from the converted tiny Animate release (our transformer subclass), one segment
    (the face adapter attends per latent frame: no sequence parallel)."""
    pipe = WanAnimateExtPipeline.from_pretrained(folders / "animate")
    return pipe, _common(height=H, width=W, image=picture(8, size=(H, W)), pose_video=_frames(F, H, 9),
                         face_video=_frames(F, 16, 10), segment_frame_length=F, max_sequence_length=ANIMATE_TEXT_LEN)


def i2v_reference(folders: Path):
    """``WanImageToVideoReferencePipeline`` (Wan2.2 I2V-A14B layout: no CLIP, one expert here)."""
    pipe = WanImageToVideoReferencePipeline(**_text(folders), vae=make_vae(), scheduler=WanFlowMatchScheduler(),
                                            transformer=make_transformer(36, clip=False, stock=True, seed=11))
    return pipe, _common(height=H, width=W, num_frames=F, image=_image(11))


def v2v_reference(folders: Path):
    """``WanVideoToVideoReferencePipeline`` (DiffSynth's ``denoising_strength``)."""
    pipe = WanVideoToVideoReferencePipeline(**_text(folders), vae=make_vae(), scheduler=WanFlowMatchScheduler(),
                                            transformer=make_transformer(16, clip=False, stock=True, seed=12))
    return pipe, _common(height=H, width=W, video=_frames(F, H, 12), denoising_strength=0.7)


def longcat(folders: Path):
    """``LongCatVideoPipeline`` (CFG-zero* guidance), text-to-video."""
    torch.manual_seed(13)
    model = LongCatVideoTransformer3DModel(num_attention_heads=2, attention_head_dim=24, num_layers=2, text_dim=32,
                                           freq_dim=32, time_embed_dim=32, ffn_dim=256)
    pipe = LongCatVideoPipeline(**_text(folders), vae=make_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=12.0),
                                transformer=_perturbed(model, 13))
    # its self-attention takes no key mask: the tokens of one latent frame (2 x 2 at 32 x 32) divide by Ulysses 2
    return pipe, _common(height=32, width=32, num_frames=F, max_sequence_length=16)


def streaming(folders: Path):
    """``WanStreamingPipeline`` (few-step Self-Forcing sampler, no classifier-free guidance)."""
    torch.manual_seed(14)
    model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
                                  text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, rope_max_seq_len=1024)
    pipe = WanStreamingPipeline(**_text(folders), vae=make_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                transformer=_perturbed(model, 14))
    return pipe, dict(prompt="a cat surfing", num_blocks=2, num_frames_per_block=2, height=H, width=W,
                      num_inference_steps=2)


_TRANSFORMER_REFUSAL = "context (sequence) parallel is not supported for {}"


def pipeline_cases() -> list[PipelineCase]:
    """Every pipeline class we ship, and stock ``WanPipeline``."""
    return [
        PipelineCase("WanExtPipeline", wan_ext),
        PipelineCase("WanFunInpaintPipeline", fun_inpaint),
        PipelineCase("WanFunControlPipeline", fun_control),
        PipelineCase("WanFunCameraControlPipeline", fun_camera),
        PipelineCase("WanSpeedControlPipeline", speed_control),
        PipelineCase("WanVideoAsPromptPipeline", video_as_prompt, refusal=_TRANSFORMER_REFUSAL.format(
            "WanVideoAsPromptTransformer3DModel")),
        PipelineCase("WanSpeechToVideoPipeline", speech_to_video, refusal=_TRANSFORMER_REFUSAL.format(
            "WanS2VTransformer3DModel")),
        PipelineCase("WanAnimateExtPipeline", animate, refusal=_TRANSFORMER_REFUSAL.format(
            "WanAnimateExtTransformer3DModel")),
        PipelineCase("WanImageToVideoReferencePipeline", i2v_reference),
        PipelineCase("WanVideoToVideoReferencePipeline", v2v_reference),
        PipelineCase("LongCatVideoPipeline", longcat),
        PipelineCase("WanStreamingPipeline", streaming, cfg_parallel=False,
                     refusal="sequence parallel is not supported by WanStreamingPipeline"),
        PipelineCase("WanPipeline", stock_wan, cfg_parallel=False),
    ]
