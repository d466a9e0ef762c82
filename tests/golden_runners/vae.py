"""VAE cases (``vae21``, ``vae22``): release-layout weights -> our converter -> stock ``AutoencoderKLWan``.

Outputs (see the manifests): the raw encoder mean, the pipeline-normalised latent ``(mu - mean) * (1 / std)``, the
decode of a normalised latent (clamped and un-clamped) and DiffSynth-Studio's tiled encode / decode with its blend
ramps (:mod:`diffusers_wan_ext.vae.tiling`).  Every shape, tile size and stride comes from the manifest and the
tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusers_wan_ext.conversion.vae import load_vae_from_original
from diffusers_wan_ext.vae import (
    decode_unclamped,
    denormalize_latents,
    normalize_latents,
    tile_layout,
    tiled_decode,
    tiled_encode,
)

from .core import GoldenCase, runner

# original_config field -> AutoencoderKLWan config field (the VAE constructor arguments the manifest states)
_CONFIG_FIELDS = (
    ("dim", "base_dim"),
    ("z_dim", "z_dim"),
    ("dim_mult", "dim_mult"),
    ("num_res_blocks", "num_res_blocks"),
    ("temperal_downsample", "temperal_downsample"),
    ("spatial_factor", "scale_factor_spatial"),
    ("temporal_factor", "scale_factor_temporal"),
)


def load_case_vae(case: GoldenCase, path=None):
    """Our converter's VAE of the case (``path``: one of its weight files, default all of them) with the latent
    statistics the fixture states -- the case's own ``latent_normalization``, else that of the case the shared weights
    file belongs to (``../vae21/weights.safetensors`` -> ``vae21/manifest.json``).  The weights carry no statistics:
    without this, a z_dim no release has would get the converter's mean 0 / std 1."""
    norm = case.manifest.get("latent_normalization")
    if norm is None and path is not None and (Path(path).parent / "manifest.json").is_file():
        norm = json.loads((Path(path).parent / "manifest.json").read_text()).get("latent_normalization")
    stats = {}
    if norm and "mean" in norm and "std" in norm:
        stats = {"latents_mean": [float(v) for v in norm["mean"]], "latents_std": [float(v) for v in norm["std"]]}
    return load_vae_from_original(case.weights() if path is None else path, torch_dtype=torch.float32, **stats)


def _check_config(case: GoldenCase, vae) -> None:
    """Our shape-inferred config must agree with the constructor arguments the manifest states."""
    cfg, ours = case.config, vae.config
    for src, dst in _CONFIG_FIELDS:
        if src in cfg:
            assert list(cfg[src]) == list(ours[dst]) if isinstance(cfg[src], list) else cfg[src] == ours[dst], (
                f"{case.name}: inferred {dst}={ours[dst]!r}, manifest {src}={cfg[src]!r}")
    if "dec_dim" in cfg:
        assert (ours.decoder_base_dim or ours.base_dim) == cfg["dec_dim"], f"{case.name}: decoder_base_dim mismatch"
    if "attn_scales" in cfg:
        assert list(cfg["attn_scales"]) == list(ours.attn_scales), f"{case.name}: attn_scales mismatch"


def _check_tiles(case: GoldenCase, video: torch.Tensor, latents: torch.Tensor, factor: int) -> None:
    """Our tile layout must be the one the manifest lists (when it lists one)."""
    t = case.manifest.get("tiling", {})
    enc, dec = t.get("encode", {}), t.get("decode", {})
    if "tiles_px_h0_h1_w0_w1" in enc:
        size = [s * factor for s in enc["tile_size_latent"]]
        stride = [s * factor for s in enc["tile_stride_latent"]]
        got = [list(x) for x in tile_layout(video.shape[-2], video.shape[-1], size, stride)]
        assert got == enc["tiles_px_h0_h1_w0_w1"], f"{case.name}: encode tiles {got} != {enc['tiles_px_h0_h1_w0_w1']}"
    if "tiles_latent_h0_h1_w0_w1" in dec:
        got = [list(x) for x in tile_layout(latents.shape[-2], latents.shape[-1], dec["tile_size_latent"],
                                            dec["tile_stride_latent"])]
        assert got == dec["tiles_latent_h0_h1_w0_w1"], (
            f"{case.name}: decode tiles {got} != {dec['tiles_latent_h0_h1_w0_w1']}")


@runner("vae21", "vae22")
def run_vae(case: GoldenCase, tmp_path) -> dict:
    vae = load_case_vae(case)
    _check_config(case, vae)
    video = case.inputs["video"].float()
    z_in = case.inputs["latent_for_decode"].float()
    tiling = case.manifest.get("tiling", {})
    factor = int(vae.config.scale_factor_spatial)
    _check_tiles(case, video, z_in, factor)

    produce = {
        # stock encode: posterior mode == mean (conv1 output, first z_dim channels)
        "mu_raw": lambda: vae.encode(video).latent_dist.mode(),
        "latent": lambda: normalize_latents(vae, vae.encode(video).latent_dist.mode()),
        # stock decode clamps to [-1, 1]
        "decoded_video": lambda: vae.decode(denormalize_latents(vae, z_in)).sample,
        "decoded_video_unclamped": lambda: decode_unclamped(vae, denormalize_latents(vae, z_in)),
        "latent_tiled": lambda: tiled_encode(vae, video, tiling["encode"]["tile_size_latent"],
                                             tiling["encode"]["tile_stride_latent"]),
        "decoded_video_tiled": lambda: tiled_decode(vae, z_in, tiling["decode"]["tile_size_latent"],
                                                    tiling["decode"]["tile_stride_latent"]),
    }
    unknown = [name for name in case.manifest["outputs"] if name not in produce]
    if unknown:
        return {"__skip__": f"no recipe for output(s) {unknown}"}
    for name, kind in (("latent_tiled", "encode"), ("decoded_video_tiled", "decode")):
        stated = set(tiling.get(kind, {}))
        if name in case.manifest["outputs"] and not {"tile_size_latent", "tile_stride_latent"} <= stated:
            return {"__skip__": f"output {name!r} needs the manifest's tiling.{kind}.tile_size_latent / "
                                "tile_stride_latent, which this fixture set does not state"}
    out = {}
    with torch.no_grad():
        for name in case.manifest["outputs"]:
            out[name] = produce[name]()
    return out
