"""DiT cases of the conditioning variants (Fun Control / V1.1 reference / Camera, Wan2.2-Fun, VACE, speed control):
original-layout weights -> our converter -> our (or stock) Diffusers transformer -> one forward."""

from __future__ import annotations

import torch

from diffusers_wan_ext.conversion.motion_controller import load_motion_controller_from_original
from diffusers_wan_ext.models.motion_controller import apply_motion_control

from .core import GoldenCase, runner
from .dit import load_case_dit


def _forward_all(case: GoldenCase, model, hidden, context, **kwargs) -> dict:
    timestep = case.inputs["timestep"].expand(hidden.shape[0])
    with torch.no_grad():
        out = model(hidden, timestep, context, return_dict=False, **kwargs)[0]
    return {name: out for name in case.manifest["outputs"]}


@runner("dit_fun_control", "dit_fun_v11_control_ref", "dit_wan22_fun_control", "dit_fun_v11_camera")
def run_fun_dit(case: GoldenCase, tmp_path) -> dict:
    model = load_case_dit(case)
    x = case.inputs
    # model input channels = cat([latents, control latents (Control models), y])
    parts = [x["latents"]] + ([x["control_latents"]] if "control_latents" in x else []) + [x["y"]]
    kwargs = {}
    if "clip_feature" in x:
        kwargs["encoder_hidden_states_image"] = x["clip_feature"]
    if "reference_latents" in x:
        kwargs["reference_latents"] = x["reference_latents"]
    if "camera_latents" in x:
        kwargs["control_camera_latents"] = x["camera_latents"]
    return _forward_all(case, model, torch.cat(parts, dim=1), x["context"], **kwargs)


@runner("dit_vace")
def run_vace_dit(case: GoldenCase, tmp_path) -> dict:
    model = load_case_dit(case)  # stock WanVACETransformer3DModel
    x = case.inputs
    scale = torch.full((len(model.config.vace_layers),), float(x["vace_scale"].reshape(-1)[0]))
    return _forward_all(case, model, x["latents"], x["context"], control_hidden_states=x["vace_context"],
                        control_hidden_states_scale=scale)


@runner("dit_speedcontrol")
def run_speedcontrol_dit(case: GoldenCase, tmp_path) -> dict:
    model = load_case_dit(case)  # stock WanTransformer3DModel
    mc = load_motion_controller_from_original(case.weights("motion_controller"))
    x = case.inputs
    with torch.no_grad():
        offset = mc(x["motion_bucket_id"])
    with apply_motion_control(model, offset):
        return _forward_all(case, model, x["latents"], x["context"])
