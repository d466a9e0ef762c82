"""Wan2.2-S2V DiT case: original-layout weights -> our converter -> WanS2VTransformer3DModel -> one forward.

The reference (DiffSynth-Studio ``model_fn_wans2v``) takes ``latents`` whose frame 0 is the clean reference-image
latent and returns it unchanged in frame 0 of the velocity; our transformer takes the reference latent as
``image_latents`` and returns the video frames only, so frame 0 is split off before and put back after.
"""

from __future__ import annotations

import torch

from .core import GoldenCase, runner
from .dit import load_case_dit


@runner("dit_s2v")
def run_s2v_dit(case: GoldenCase, tmp_path) -> dict:
    model = load_case_dit(case)
    x = case.inputs
    latents = x["latents"]
    ref, video = latents[:, :, :1], latents[:, :, 1:]
    out = {}
    with torch.no_grad():
        for name, drop in (("velocity", False), ("velocity_drop_motion", True)):
            if name not in case.manifest["outputs"]:
                continue
            v = model(
                video, x["timestep"], x["context"], audio_embeds=x["audio_embeds"], image_latents=ref,
                pose_latents=x.get("s2v_pose_latents"), motion_latents=x["motion_latents"], drop_motion_frames=drop,
                return_dict=False,
            )[0]
            out[name] = torch.cat([ref, v], dim=2)
    return out
