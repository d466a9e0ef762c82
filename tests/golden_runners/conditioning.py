"""Conditioning cases: what the pipelines build for the DiT (I2V / FLF2V ``y``), run through stock Diffusers'
``WanImageToVideoPipeline.prepare_latents`` with the VAE our converter produced."""

from __future__ import annotations

import torch
from PIL import Image

from diffusers_wan_ext.conversion.vae import load_vae_from_original

from .core import GoldenCase, runner


@runner("i2v_condition")
def run_i2v_condition(case: GoldenCase, tmp_path) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    (vae_file,) = case.weight_paths()
    vae = load_vae_from_original(vae_file)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler())
    cfg = case.config
    h, w, f = cfg["height"], cfg["width"], cfg["num_frames"]
    image = pipe.video_processor.preprocess(Image.fromarray(case.inputs["image_uint8"].numpy()), height=h, width=w)
    torch.testing.assert_close(image, case.inputs["image"])  # the pipeline's own preprocessing = the reference's
    end = pipe.video_processor.preprocess(Image.fromarray(case.inputs["end_image_uint8"].numpy()), height=h, width=w)
    out = {}
    with torch.no_grad():
        for name, last in (("y_i2v", None), ("y_flf2v", end)):
            _, y = pipe.prepare_latents(image, 1, vae.config.z_dim, h, w, f, dtype=torch.float32,
                                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                                        last_image=last)
            out[name] = y
    return out
