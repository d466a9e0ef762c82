"""Pipeline subclasses for reference-exact Wan sampling (stock Diffusers pipelines plus the missing options).

* :class:`WanVideoToVideoReferencePipeline` -- ``WanVideoToVideoPipeline`` with DiffSynth-Studio's
  ``denoising_strength`` (all steps on a schedule that starts at ``shift(strength)``) and pre-encoded
  ``video_latents`` / explicit ``noise``.
* :class:`WanImageToVideoReferencePipeline` -- ``WanImageToVideoPipeline`` with the original / DiffSynth per-step
  first-frame pinning of Wan2.2 TI2V-5B and pre-encoded ``image_latents``.
* :class:`WanFunInpaintPipeline` -- Wan-Fun InP (Wan2.1 Fun-InP, Wan2.2-Fun-A14B-InP): first frame, optional end frame.
* :class:`WanFunControlPipeline` -- Wan-Fun Control (Wan2.1 Fun-Control, Fun-V1.1-Control with ``reference_image``,
  Wan2.2-Fun-A14B-Control): control video, optional start frame and reference image.
* :class:`WanFunCameraControlPipeline` -- Wan-Fun Control-Camera (Wan2.1 Fun-V1.1, Wan2.2-Fun-A14B): first frame and
  a camera direction or explicit per-frame poses.
* :class:`WanSpeedControlPipeline` -- ``WanPipeline`` with the Wan2.1 speed-control ``motion_controller``
  (``motion_bucket_id``).
* :class:`WanVideoAsPromptPipeline` -- ByteDance Video-As-Prompt: image-to-video following a reference video
  (``vap_video``, ``vap_prompt``) through the mixture-of-transformers reference stream.
* :class:`WanStreamingPipeline` -- streaming text-to-video for Self-Forcing-distilled models (krea realtime):
  block-causal attention with a KV cache, few-step blocks, each block decoded and yielded as soon as it is ready.
* :class:`WanExtPipeline` -- ``WanPipeline`` with CFG batching (cond + uncond in one transformer forward).
* :class:`WanAnimateExtPipeline` -- ``WanAnimatePipeline`` (Wan2.2-Animate) with video-file / array inputs, strict
  validation and the relighting LoRA.
* :class:`WanAnimate2Pipeline` -- Wan2.2-Animate-2-14B (and its distilled DiT): reference image + driving video,
  reference-video K/V cache per clip, multi-clip long videos.
* :class:`WanDancerPipeline` -- Wan2.2-Dancer-14B: reference image + music -> global keyframes, then 30-fps local
  segments.
* :class:`WanSpeechToVideoPipeline` -- Wan2.2-S2V-14B: reference image + audio (+ pose video), multi-clip with
  motion history, as long as the audio.

All of them have the runtime options of :class:`~.runtime_options.WanRuntimeOptionsMixin` (``set_attention_backend``,
``enable_vram_management``, ``enable_teacache``); see ``docs/runtime.md``.

The three Wan-Fun pipelines share one core, :class:`~.pipeline_wan_fun_base.WanFunPipelineBase` (a
``WanImageToVideoPipeline`` subclass with the stock two-expert loop); each variant only builds its conditioning.

Text-to-video, including Wan2.2 A14B's two experts with either one guidance scale (DiffSynth-Studio) or the original
``(low, high)`` pair (``guidance_scale`` = high, ``guidance_scale_2`` = low), needs no subclass: stock ``WanPipeline``
with a reference scheduler (:mod:`diffusers_wan_ext.schedulers`) reproduces it (``WanExtPipeline`` adds only speed
and runtime options).

:class:`LongCatVideoPipeline` runs meituan-longcat/LongCat-Video (its own DiT,
:class:`~diffusers_wan_ext.LongCatVideoTransformer3DModel`, with the Wan2.1 VAE and umT5): text-to-video, video
continuation and image-to-video.
"""

from .pipeline_longcat_video import LongCatVideoPipeline
from .pipeline_mova import MovaPipeline
from .pipeline_wan_animate2 import WanAnimate2Pipeline
from .pipeline_wan_animate_ext import WanAnimateExtPipeline
from .pipeline_wan_dancer import WanDancerPipeline
from .pipeline_wan_ext import WanExtPipeline
from .pipeline_wan_fun_camera import WanFunCameraControlPipeline
from .pipeline_wan_fun_control import WanFunControlPipeline
from .pipeline_wan_fun_inpaint import WanFunInpaintPipeline
from .pipeline_wan_i2v_reference import WanImageToVideoReferencePipeline
from .pipeline_wan_s2v import WanSpeechToVideoPipeline
from .pipeline_wan_speed_control import WanSpeedControlPipeline
from .pipeline_wan_streaming import WanStreamChunk, WanStreamingPipeline, self_forcing_schedule
from .pipeline_wan_video2video_reference import WanVideoToVideoReferencePipeline
from .pipeline_wan_video_as_prompt import WanVideoAsPromptPipeline

__all__ = [
    "LongCatVideoPipeline",
    "MovaPipeline",
    "WanAnimate2Pipeline",
    "WanAnimateExtPipeline",
    "WanDancerPipeline",
    "WanExtPipeline",
    "WanFunCameraControlPipeline",
    "WanFunControlPipeline",
    "WanFunInpaintPipeline",
    "WanImageToVideoReferencePipeline",
    "WanSpeedControlPipeline",
    "WanSpeechToVideoPipeline",
    "WanStreamChunk",
    "WanStreamingPipeline",
    "WanVideoAsPromptPipeline",
    "WanVideoToVideoReferencePipeline",
    "self_forcing_schedule",
]
