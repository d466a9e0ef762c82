"""Golden runners for the text encoder (``t5``) and the CLIP image encoder (``clip``).

Both start from the release-layout weights of the case, go through our converters into transformers models, and take
every width / head count / size from the case (manifest ``original_config`` and tensor shapes).
"""

from __future__ import annotations

import torch

from diffusers_wan_ext.conversion.image_encoder import clip_image_features, load_clip_from_original, wan_clip_preprocess
from diffusers_wan_ext.conversion.text_encoder import encode_prompt_context, load_t5_from_original, prompt_lengths

from .core import GoldenCase, runner


@runner("t5")
def run_t5(case: GoldenCase, tmp_path) -> dict:
    cfg = case.config
    # the head count comes from the relative-position table; num_heads, when stated, is checked against it
    model = load_t5_from_original(case.weights(), torch_dtype=torch.float32, num_heads=cfg.get("num_heads"))
    for ours, theirs in (("d_model", "dim"), ("num_layers", "num_layers"), ("vocab_size", "vocab"), ("d_ff", "dim_ffn")):
        if theirs in cfg:
            assert getattr(model.config, ours) == cfg[theirs], f"{ours}: {getattr(model.config, ours)} != {cfg[theirs]}"
    ids, mask = case.inputs["ids"], case.inputs["mask"]
    with torch.no_grad():
        raw = model(input_ids=ids, attention_mask=mask).last_hidden_state
    values = {
        "hidden_states_raw": raw,
        "context_pipeline": encode_prompt_context(model, ids, mask),
        "real_lengths": prompt_lengths(mask).tolist(),
    }
    return {name: values[name] for name in case.manifest["outputs"]}


@runner("clip")
def run_clip(case: GoldenCase, tmp_path) -> dict:
    vision = case.config.get("vision", {})
    if "heads" not in vision:  # the head count is not in the weights
        return {"__skip__": "original_config states no vision.heads (the CLIP head count)"}
    model = load_clip_from_original(case.weights(), num_heads=vision["heads"], torch_dtype=torch.float32)
    assert model.config.image_size == vision.get("image_size", model.config.image_size)
    assert model.config.num_hidden_layers == vision.get("layers", model.config.num_hidden_layers)
    # Wan resizes to the encoder's own input size (224 in the release), which the converter derived from the weights
    size = model.config.image_size
    resize = case.manifest.get("preprocessing", {}).get("resize", {})
    assert list(resize.get("size", [size, size])) == [size, size], f"manifest resize {resize} != encoder size {size}"
    pixel_values = wan_clip_preprocess(case.inputs["image"], size=size)
    with torch.no_grad():
        all_blocks = model(pixel_values=pixel_values).last_hidden_state
    values = {
        "pixel_values": pixel_values,
        "features": clip_image_features(model, pixel_values),
        "all_blocks": all_blocks,
    }
    return {name: values[name] for name in case.manifest["outputs"]}
