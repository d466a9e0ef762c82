"""Sliding-window DiT cases (DiffSynth's ``TemporalTiler_BCTHW``): our converted DiT under
:func:`diffusers_wan_ext.hooks.sliding_window.apply_sliding_window`, size / stride from the manifest."""

from __future__ import annotations

import torch

from diffusers_wan_ext.hooks.sliding_window import apply_sliding_window, sliding_windows, skipped_window_starts

from .core import GoldenCase, runner
from .dit import load_case_dit


@runner("dit_sliding_window", "dit_sliding_window_i2v")
def run_sliding_window(case: GoldenCase, tmp_path) -> dict:
    spec = case.manifest.get("sliding_window", {})
    if not {"size", "stride"} <= set(spec):
        return {"__skip__": "the manifest states no sliding_window size / stride"}
    size, stride = int(spec["size"]), int(spec["stride"])
    x = case.inputs
    latents, context = x["latents"], x["context"]
    num_frames = latents.shape[2]
    # the manifest's enumeration is the one the hook runs
    if "windows" in spec:
        assert [list(w) for w in sliding_windows(num_frames, size, stride)] == [list(w) for w in spec["windows"]]
    if "skipped_window_starts" in spec:
        assert skipped_window_starts(num_frames, size, stride) == list(spec["skipped_window_starts"])
    model = load_case_dit(case)
    apply_sliding_window(model, size, stride)
    kwargs = {}
    if "y" in x:  # stock I2V: y joins the latents' channels, so it is sliced with them
        latents = torch.cat([latents, x["y"]], dim=1)
    if "clip_feature" in x:
        kwargs["encoder_hidden_states_image"] = x["clip_feature"]
    timestep = x["timestep"].expand(latents.shape[0])
    with torch.no_grad():
        velocity = model(latents, timestep, context, return_dict=False, **kwargs)[0]
    return {name: velocity for name in case.manifest["outputs"]}
