"""``dit_animate``: Wan2.2-Animate-14B release-layout weights (DiT + Animate adapter in one file) -> our converter ->
Diffusers' ``WanAnimateTransformer3DModel`` (our ``WanAnimateExtTransformer3DModel`` when the fixture's ``text_len``
is not 512: stock splits CLIP and text tokens at a hard-coded 512) -> one forward."""

from __future__ import annotations

import torch

from .core import GoldenCase, runner
from .dit import load_case_dit


@runner("dit_animate")
def run_animate_dit(case: GoldenCase, tmp_path) -> dict:
    # the adapter widths have no release config.json: the fixture states them next to original_config
    config = {**case.config, **case.manifest.get("animate_adapter_config", {})}
    model = load_case_dit(case, config=config)
    x = case.inputs
    hidden = torch.cat([x["latents"], x["y"]], dim=1)
    timestep = x["timestep"].expand(hidden.shape[0])
    with torch.no_grad():
        out = model(
            hidden, timestep, x["context"], encoder_hidden_states_image=x["clip_feature"],
            pose_hidden_states=x["pose_latents"], face_pixel_values=x["face_pixel_values"], return_dict=False,
        )[0]
    return {name: out for name in case.manifest["outputs"]}
