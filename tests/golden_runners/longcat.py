"""LongCat-Video DiT case: original ``dit/`` weights -> our converter -> ``LongCatVideoTransformer3DModel``.

The reference call (DiffSynth's ``model_fn_longcat_video``) overwrites the first ``K`` latent frames with the clean
``longcat_latents``, derives the caption mask as ``any(context != 0)`` and NEGATES the transformer output.
``velocity_t2v`` is the same call without conditioning latents.
"""

from __future__ import annotations

import torch

from diffusers_wan_ext.conversion.longcat import load_longcat_transformer_from_original

from .core import GoldenCase, runner


@runner("dit_longcat")
def run_longcat_dit(case: GoldenCase, tmp_path) -> dict:
    model = load_longcat_transformer_from_original(case.weights(), case.config)
    x = case.inputs
    context = x["context"]
    mask = (context != 0).any(dim=-1)
    out = {}
    for name in case.manifest["outputs"]:
        latents, num_cond = x["latents"].clone(), 0
        if name != "velocity_t2v" and "longcat_latents" in x:
            num_cond = x["longcat_latents"].shape[2]
            latents[:, :, :num_cond] = x["longcat_latents"]
        with torch.no_grad():
            pred = model(latents, x["timestep"], context, encoder_attention_mask=mask, num_cond_latents=num_cond)
        out[name] = -pred.sample
    return out
