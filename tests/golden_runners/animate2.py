"""``dit_animate2``: Wan2.2-Animate-2-14B release-layout weights (``blocks.N.block.*``) -> our converter ->
``WanAnimate2ExtTransformer3DModel`` (stock ``WanAnimate2Transformer3DModel`` plus the CLIP width from the weights,
``log_scale`` and a flex-free generation attention) -> the reference pass filling the K/V cache, then the
generation pass for each output (``velocity``; ``velocity_uncond``: block 9 skipped; ``velocity_log_scale``).

Every shape comes from the tensors: the token grids from the latents and the patch size; the video geometry of the
mask (``origin_len``, ``origin_area``) from ``animate2_call`` when the manifest states it, else the clip's own, as
the model's one-call form derives it: ``4 (F_ref - 1) + 1`` frames (the model maps it back to ``F_ref`` latent frames)
and an area of 16 px per token of the generation grid (the model maps ``W * H / 256`` back to the tokens per frame), so
the fallback holds for any patch size or VAE stride."""

from __future__ import annotations

import torch

from diffusers_wan_ext.conversion.animate2 import load_animate2_transformer_from_original

from .core import GoldenCase, runner

#: pixels per token side in the reference's ``origin_latent_hw = W * H / 256`` (a formula constant, not a size)
PIXELS_PER_TOKEN = 16


def _grid(latents: torch.Tensor, patch_size) -> torch.Tensor:
    f, h, w = latents.shape[-3:]
    return torch.tensor([[f // patch_size[0], h // patch_size[1], w // patch_size[2]]], dtype=torch.long)


@runner("dit_animate2")
def run_animate2_dit(case: GoldenCase, tmp_path) -> dict:
    model = load_animate2_transformer_from_original(case.weights(), case.config)
    x = case.inputs
    patch = model.config.patch_size
    ref_latents = x["condition_latents"]
    grid, grid_ref = _grid(x["latents"], patch), _grid(ref_latents, patch)
    # the video geometry the mask is built over: the manifest's call values, else the clip's own (single clip)
    call = case.manifest.get("animate2_call", {})
    origin_len = int(call.get("origin_len", 4 * (ref_latents.shape[2] - 1) + 1))
    origin_area = call.get("origin_area", [int(grid[0, 2]) * PIXELS_PER_TOKEN, int(grid[0, 1]) * PIXELS_PER_TOKEN])
    cache = model.new_kv_cache()
    with torch.no_grad():
        model([ref_latents[0]], x["timestep"], [x["context_ref"][0]], [x["condition_y"]], cache, "extract",
              seq_len=int(grid_ref.prod()), encoder_hidden_states_image=x["clip_fea_ref"], offset_grid_sizes=grid_ref)
        log_scale = float(call.get("log_scale_for_velocity_log_scale", 0.7))
        out = {}
        for name in case.manifest["outputs"]:
            pred = model(
                [x["latents"][0]], x["timestep"], [x["context"][0]], [x["y"][0]], cache, "cached",
                seq_len=int(grid.prod()), encoder_hidden_states_image=x["clip_feature"], reference_grid_sizes=grid_ref,
                origin_len=origin_len, origin_area=origin_area, is_uncondtion=name == "velocity_uncond",
                log_scale=log_scale if name == "velocity_log_scale" else 0.0, return_dict=False,
            )[0]
            out[name] = torch.stack(pred)
    return out
