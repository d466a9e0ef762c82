"""``dit_wantodance_global`` / ``dit_wantodance_local`` (Wan2.2-Dancer): release-layout weights (Wan I2V keys +
``music_*``, ``img_emb_refimage.*``, ``patch_embedding_global.*``, ``head_global.*``, ``ref_conv.*``) -> our converter
-> :class:`~diffusers_wan_ext.models.WanDancerTransformer3DModel` -> one forward per output (``velocity_uncond``:
the negative branch, block 9 skipped).  Every width comes from the weights and ``original_config``, every shape from
the tensors; ``wantodance_fps`` decides the global / local path as in the reference."""

from __future__ import annotations

import torch

from diffusers_wan_ext.models.transformer_wan_dancer import DANCER_UNCOND_SKIP_BLOCKS

from .core import GoldenCase, runner
from .dit import load_case_dit


@runner("dit_wantodance_global", "dit_wantodance_local")
def run_dancer_dit(case: GoldenCase, tmp_path) -> dict:
    model = load_case_dit(case)
    x = case.inputs
    hidden = torch.cat([x["latents"], x["y"]], dim=1)
    out = {}
    with torch.no_grad():
        for name in case.manifest["outputs"]:
            out[name] = model(
                hidden, x["timestep"], x["context"], encoder_hidden_states_image=x["clip_feature"],
                reference_image_embeds=x.get("wantodance_refimage_feature"), music_features=x["music_feature"],
                fps=float(x["wantodance_fps"]), skip_blocks=DANCER_UNCOND_SKIP_BLOCKS if name == "velocity_uncond"
                else (), return_dict=False,
            )[0]
    return out
