"""Pipeline subclasses for reference-exact Wan sampling (stock Diffusers pipelines plus the missing options).

* :class:`WanVideoToVideoReferencePipeline` -- ``WanVideoToVideoPipeline`` with DiffSynth-Studio's
  ``denoising_strength`` (all steps on a schedule that starts at ``shift(strength)``) and pre-encoded
  ``video_latents`` / explicit ``noise``.
* :class:`WanImageToVideoReferencePipeline` -- ``WanImageToVideoPipeline`` with the original / DiffSynth per-step
  first-frame pinning of Wan2.2 TI2V-5B and pre-encoded ``image_latents``.

Text-to-video, including Wan2.2 A14B's two experts with either one guidance scale (DiffSynth-Studio) or the original
``(low, high)`` pair (``guidance_scale`` = high, ``guidance_scale_2`` = low), needs no subclass: stock ``WanPipeline``
with a reference scheduler (:mod:`diffusers_wan_ext.schedulers`) reproduces it.
"""

from .pipeline_wan_i2v_reference import WanImageToVideoReferencePipeline
from .pipeline_wan_video2video_reference import WanVideoToVideoReferencePipeline

__all__ = ["WanImageToVideoReferencePipeline", "WanVideoToVideoReferencePipeline"]
