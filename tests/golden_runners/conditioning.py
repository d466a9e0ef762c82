"""Conditioning cases: what the pipelines build for the DiT (I2V / FLF2V ``y``), run through stock Diffusers'
``WanImageToVideoPipeline.prepare_latents`` with the VAE our converter produced."""

from __future__ import annotations

import torch
from PIL import Image

from .core import GoldenCase, runner
from .vae import load_case_vae


@runner("i2v_condition")
def run_i2v_condition(case: GoldenCase, tmp_path) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    (vae_file,) = case.weight_paths()
    vae = load_case_vae(case, vae_file)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler())
    cfg, outputs = case.config, case.manifest["outputs"]
    # sizes: the manifest's call values, else the image's pixels and the output's latent frames (x the VAE's stride)
    h, w = cfg.get("height", case.inputs["image_uint8"].shape[0]), cfg.get("width", case.inputs["image_uint8"].shape[1])
    t_lat = case.outputs[outputs[next(iter(outputs))]["key"].split(".", 1)[1]].shape[2]
    f = cfg.get("num_frames", (t_lat - 1) * int(vae.config.scale_factor_temporal) + 1)
    image = pipe.video_processor.preprocess(Image.fromarray(case.inputs["image_uint8"].numpy()), height=h, width=w)
    torch.testing.assert_close(image, case.inputs["image"])  # the pipeline's own preprocessing = the reference's
    recipes = {"y_i2v": None, "y_flf2v": "end_image_uint8"}
    missing = [n for n in outputs if n not in recipes or (recipes[n] and recipes[n] not in case.inputs)]
    if missing:
        return {"__skip__": f"no recipe or input for output(s) {missing}"}
    out = {}
    with torch.no_grad():
        for name in outputs:
            last = None
            if recipes[name]:
                last = pipe.video_processor.preprocess(Image.fromarray(case.inputs[recipes[name]].numpy()), height=h,
                                                       width=w)
            _, y = pipe.prepare_latents(image, 1, vae.config.z_dim, h, w, f, dtype=torch.float32,
                                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                                        last_image=last)
            out[name] = y
    return out
