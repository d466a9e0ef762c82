"""Video-As-Prompt DiT case (``dit_vap``): the Diffusers-format release file (main stream + ``_mot_ref`` reference
stream) -> our converter (:mod:`diffusers_wan_ext.conversion.vap`) -> :class:`WanVideoAsPromptTransformer3DModel`.

``output.velocity`` follows ByteDance's release (output head modulated with the main timestep embedding).  The
manifest's variant ``velocity_diffsynth_as_is`` is DiffSynth-Studio's unpatched result, whose head uses the reference
stream's embedding of the clean timestep instead; we reproduce it from our model's final hidden states and the
reference stream's time embedding, which checks both streams and the head independently of the fix.
"""

from __future__ import annotations

import torch

from diffusers_wan_ext.conversion.vap import load_vap_transformer

from .core import GoldenCase, runner


def _head(model, hidden_states: torch.Tensor, temb: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    b, _, f, h, w = latents.shape
    p_t, p_h, p_w = model.config.patch_size
    return model._output_projection(hidden_states, temb, b, (f // p_t, h // p_h, w // p_w))


@runner("dit_vap")
def run_vap_dit(case: GoldenCase, tmp_path) -> dict:
    x = case.inputs
    # text_len: the fixture's contexts are not padded (the release pads umT5 contexts to 512)
    model = load_vap_transformer(case.weights("dit"), case.config, text_len=x["context"].shape[1])
    assert model.config.vap_layers == list(case.config["block_idx_with_mot_ref"])
    latents = x["latents"]
    timestep = x["timestep"].expand(latents.shape[0])
    captured = {}
    hook = model.norm_out.register_forward_pre_hook(lambda m, args: captured.setdefault("hidden", args[0]))
    try:
        with torch.no_grad():
            velocity = model(
                torch.cat([latents, x["y"]], dim=1), timestep, x["context"], x["clip_feature"],
                vap_hidden_states=x["vap_hidden_state"], vap_encoder_hidden_states=x["context_vap"],
                vap_encoder_hidden_states_image=x["vap_clip_feature"], return_dict=False,
            )[0]
    finally:
        hook.remove()
    out = {name: velocity for name in case.manifest["outputs"]}

    variant = case.variants.get("velocity_diffsynth_as_is")
    if variant is not None:
        with torch.no_grad():
            temb_ref = model.vap_condition_embedder(torch.ones_like(timestep), x["context_vap"])[0]
            as_is = _head(model, captured["hidden"], temb_ref, latents)
        tol = case.manifest["tolerance"]
        torch.testing.assert_close(as_is, variant, rtol=tol["rtol"], atol=tol["atol"],
                                   msg="DiffSynth's as-is variant (head with the reference time embedding)")
        assert not torch.allclose(velocity, variant, rtol=tol["rtol"], atol=tol["atol"]), \
            "our velocity matches DiffSynth's head bug instead of the release"
    return out
