"""DiT forward cases: original-layout weights -> our converter -> Diffusers transformer -> one forward."""

from __future__ import annotations

import torch

from diffusers_wan_ext.conversion.dit import load_dit_from_original

from .core import GoldenCase, runner


def load_case_dit(case: GoldenCase, role: str = "dit", config: dict | None = None):
    return load_dit_from_original(case.weights(role), config if config is not None else case.config)


def ti2v_timestep(timestep: torch.Tensor, latents: torch.Tensor, patch_size) -> torch.Tensor:
    """Per-token timestep of TI2V image-to-video: 0 for the tokens of latent frame 0, ``t`` elsewhere."""
    _, _, f, h, w = latents.shape
    per_frame = (h // patch_size[1]) * (w // patch_size[2])
    t = timestep.reshape(-1, 1).expand(latents.shape[0], f // patch_size[0] * per_frame).clone()
    t[:, :per_frame] = 0
    return t


@runner("dit_wan21_t2v", "dit_wan21_t2v_cfgbatch", "dit_wan21_i2v", "dit_wan21_flf2v_upstream", "dit_wan22_ti2v")
def run_dit(case: GoldenCase, tmp_path) -> dict:
    model = load_case_dit(case)
    x = case.inputs
    latents, context = x["latents"], x["context"]
    timestep = x["timestep"].expand(latents.shape[0])
    kwargs = {}
    if "y" in x:
        latents = torch.cat([latents, x["y"]], dim=1)
    if "clip_feature" in x:
        clip = x["clip_feature"]
        if model.config.pos_embed_seq_len:  # FLF2V: Diffusers takes the two images as rows [2B, 257, D]
            clip = clip.reshape(-1, clip.shape[1] // 2, clip.shape[2])
        kwargs["encoder_hidden_states_image"] = clip
    out = {}
    with torch.no_grad():
        for name in case.manifest["outputs"]:
            t = timestep
            if case.name == "dit_wan22_ti2v" and name == "velocity":
                t = ti2v_timestep(timestep, latents, model.config.patch_size)
            out[name] = model(latents, t, context, return_dict=False, **kwargs)[0]
    return out


@runner("dit_wan21_flf2v")
def run_flf2v_diffsynth(case: GoldenCase, tmp_path) -> dict:
    sem = case.manifest.get("semantics", {})
    return {"__skip__": "DiffSynth's FLF2V image/text split (context[:, :257]) deviates from upstream Wan2.1; we follow "
            f"upstream and pass {sem.get('twin_case', 'dit_wan21_flf2v_upstream')} instead ({sem.get('detail', '')})"}
