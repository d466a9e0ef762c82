"""Schedulers that reproduce the reference Wan samplers exactly.

* :class:`WanFlowMatchScheduler` -- DiffSynth-Studio's flow-matching Euler schedule (template ``"Wan"``), with
  DiffSynth's ``denoising_strength`` for video-to-video.
* :class:`WanFlowUniPCScheduler` -- the original Wan code's ``FlowUniPCMultistepScheduler`` schedule on top of stock
  Diffusers' UniPC solver.

Both drop into the stock Diffusers Wan pipelines (``WanPipeline.from_pretrained(dir, scheduler=...)``).
"""

from .scheduling_wan_flow_match import WanFlowMatchScheduler, WanFlowMatchSchedulerOutput
from .scheduling_wan_flow_unipc import WanFlowUniPCScheduler

__all__ = ["WanFlowMatchScheduler", "WanFlowUniPCScheduler"]
