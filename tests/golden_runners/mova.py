"""MOVA cases: release-layout weights -> our converters -> our audio DiT / bridge / stock Wan video DiT.

``dit_mova`` is one joint forward (:func:`~diffusers_wan_ext.models.mova_joint_forward.mova_joint_forward`): the
video expert the manifest names, the audio DiT and the bridge, each from its release sub-folder and its
``original_config.<role>`` entry.  ``dit_mova_audio`` is the audio DiT alone.
"""

from __future__ import annotations

import torch

from diffusers_wan_ext.conversion.dit import load_dit_from_original
from diffusers_wan_ext.conversion.mova import load_mova_audio_dit, load_mova_bridge
from diffusers_wan_ext.models.mova_joint_forward import mova_joint_forward

from .core import GoldenCase, runner


@runner("dit_mova_audio")
def run_mova_audio(case: GoldenCase, tmp_path) -> dict:
    model = load_mova_audio_dit(case.weights("audio_dit"), case.config["audio_dit"])
    x = case.inputs
    with torch.no_grad():
        return {"audio_velocity": model(x["audio_latents"], x["timestep"], x["context"], return_dict=False)[0]}


@runner("dit_mova")
def run_mova(case: GoldenCase, tmp_path) -> dict:
    cfg = case.config
    video = load_dit_from_original(case.weights("video_dit"), cfg["video_dit"])
    audio = load_mova_audio_dit(case.weights("audio_dit"), cfg["audio_dit"])
    bridge = load_mova_bridge(case.weights("dual_tower_bridge"), cfg["dual_tower_bridge"])
    x = case.inputs
    with torch.no_grad():
        v, a = mova_joint_forward(video, audio, bridge, x["video_latents"], x["audio_latents"], x["timestep"],
                                  x["context"], float(x["frame_rate"]), image_condition=x["y"])
    return {"video_velocity": v, "audio_velocity": a}
