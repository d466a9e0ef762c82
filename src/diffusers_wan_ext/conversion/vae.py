"""Wan VAE checkpoints: original ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` layout <-> Diffusers ``AutoencoderKLWan``.

The original files are plain state dicts whose keys are the module names of ``WanVAE_`` in Wan-Video
``wan/modules/vae.py`` (Wan2.1, also Wan2.2's ``vae2_1.py``) and ``wan/modules/vae2_2.py`` (Wan2.2 TI2V-5B VAE).
DiffSynth-Studio uses the same keys (its loader only unwraps ``model_state`` and adds a ``model.`` prefix; both are
accepted here).

How the key map works
---------------------
The map is data:

* :data:`LEAF_MAPS` - parameter names inside one module kind (original suffix -> Diffusers suffix), e.g. the residual
  block's ``residual.2.weight`` -> ``conv1.weight``.
* :data:`FIXED_MODULE_MAP` - modules that exist once (``conv1`` -> ``quant_conv``, ``encoder.middle.1`` ->
  ``encoder.mid_block.attentions.0``, ...), as ``(original module, diffusers module, leaf-map name)``.
* :data:`STAGE_MODULE_MAP` - per VAE version, the templates of the repeated down / up sampling modules with the
  placeholders ``{n}`` (index in the original flat ``nn.Sequential``), ``{stage}`` and ``{j}`` (stage and position
  inside the stage).  Wan2.1 stores the encoder / decoder stages flat (``decoder.upsamples.0..14``); Wan2.2 nests them
  (``decoder.upsamples.{stage}.upsamples.{j}``); Diffusers always groups by stage for the decoder.

For one config the templates are expanded over the stage structure (:func:`_stage_slots`) into an explicit
``original key -> diffusers key`` table, restricted to the parameters the Diffusers model really has (optional
parameters such as ``shortcut`` or ``time_conv`` exist only on some blocks; the table is checked against a
meta-device ``AutoencoderKLWan`` of that config).  :func:`convert_vae_state_dict` and :func:`export_vae_state_dict`
are lookups in that table and its inverse, so they are exact inverses and never reshape a tensor.

Configs are read from shapes: ``base_dim`` (``encoder.conv1``), ``decoder_base_dim`` (``decoder.conv1``), ``z_dim``
(``conv2``), ``dim_mult`` / ``num_res_blocks`` / ``temperal_downsample`` (the encoder stages, their residual blocks,
and which down-samplers have a ``time_conv``), in/out channels and the 2x2 patchify (``encoder.conv1`` input width),
the spatial / temporal factors (number of down-samplers / ``time_conv`` s).  The latent mean / std are the real
per-channel constants of the release (16 values for Wan2.1, 48 for Wan2.2).

Example:
    >>> from diffusers_wan_ext.conversion.vae import load_vae_from_original  # doctest: +SKIP
    >>> vae = load_vae_from_original("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from typing import Any, Iterator, Mapping

import torch

from ..utils import ConversionError
from ..utils.io import format_keys, load_state_dict, raise_for_key_problems, strip_known_prefixes

__all__ = [
    "FIXED_MODULE_MAP",
    "LATENTS_MEAN_STD",
    "LEAF_MAPS",
    "STAGE_MODULE_MAP",
    "convert_vae_state_dict",
    "detect_vae_version",
    "export_vae_state_dict",
    "load_vae_from_original",
    "vae_config_from_state_dict",
    "vae_key_table",
]

WAN21, WAN22 = "wan2.1", "wan2.2"

# ----------------------------------------------------------------------------------------------------------------
# Key map (data)
# ----------------------------------------------------------------------------------------------------------------

# Parameters inside one module kind: (original suffix, diffusers suffix).  Optional entries (``shortcut``,
# ``time_conv``) are kept only where the Diffusers model has the parameter.
LEAF_MAPS: dict[str, tuple[tuple[str, str], ...]] = {
    "conv": (("weight", "weight"), ("bias", "bias")),
    "norm": (("gamma", "gamma"),),
    # original ResidualBlock.residual = [RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d]
    "resblock": (
        ("residual.0.gamma", "norm1.gamma"),
        ("residual.2.weight", "conv1.weight"),
        ("residual.2.bias", "conv1.bias"),
        ("residual.3.gamma", "norm2.gamma"),
        ("residual.6.weight", "conv2.weight"),
        ("residual.6.bias", "conv2.bias"),
        ("shortcut.weight", "conv_shortcut.weight"),
        ("shortcut.bias", "conv_shortcut.bias"),
    ),
    "attention": (
        ("norm.gamma", "norm.gamma"),
        ("to_qkv.weight", "to_qkv.weight"),
        ("to_qkv.bias", "to_qkv.bias"),
        ("proj.weight", "proj.weight"),
        ("proj.bias", "proj.bias"),
    ),
    # Resample: resample = [Upsample | ZeroPad2d, Conv2d]; time_conv only on the temporal (3d) ones
    "resample": (
        ("resample.1.weight", "resample.1.weight"),
        ("resample.1.bias", "resample.1.bias"),
        ("time_conv.weight", "time_conv.weight"),
        ("time_conv.bias", "time_conv.bias"),
    ),
}

# Modules that exist once in both versions: (original module, diffusers module, leaf map).
FIXED_MODULE_MAP: tuple[tuple[str, str, str], ...] = (
    ("conv1", "quant_conv", "conv"),
    ("conv2", "post_quant_conv", "conv"),
    ("encoder.conv1", "encoder.conv_in", "conv"),
    ("encoder.middle.0", "encoder.mid_block.resnets.0", "resblock"),
    ("encoder.middle.1", "encoder.mid_block.attentions.0", "attention"),
    ("encoder.middle.2", "encoder.mid_block.resnets.1", "resblock"),
    ("encoder.head.0", "encoder.norm_out", "norm"),
    ("encoder.head.2", "encoder.conv_out", "conv"),
    ("decoder.conv1", "decoder.conv_in", "conv"),
    ("decoder.middle.0", "decoder.mid_block.resnets.0", "resblock"),
    ("decoder.middle.1", "decoder.mid_block.attentions.0", "attention"),
    ("decoder.middle.2", "decoder.mid_block.resnets.1", "resblock"),
    ("decoder.head.0", "decoder.norm_out", "norm"),
    ("decoder.head.2", "decoder.conv_out", "conv"),
)

# Repeated modules per version: slot -> (original module template, diffusers module template, leaf map).
# Placeholders: {n} flat index in the original nn.Sequential, {stage} stage index, {j} index inside the stage.
STAGE_MODULE_MAP: dict[str, dict[str, tuple[str, str, str]]] = {
    WAN21: {
        "down_res": ("encoder.downsamples.{n}", "encoder.down_blocks.{n}", "resblock"),
        "down_sample": ("encoder.downsamples.{n}", "encoder.down_blocks.{n}", "resample"),
        "up_res": ("decoder.upsamples.{n}", "decoder.up_blocks.{stage}.resnets.{j}", "resblock"),
        "up_sample": ("decoder.upsamples.{n}", "decoder.up_blocks.{stage}.upsamplers.0", "resample"),
    },
    WAN22: {
        "down_res": ("encoder.downsamples.{stage}.downsamples.{j}", "encoder.down_blocks.{stage}.resnets.{j}", "resblock"),
        "down_sample": ("encoder.downsamples.{stage}.downsamples.{j}", "encoder.down_blocks.{stage}.downsampler", "resample"),
        "up_res": ("decoder.upsamples.{stage}.upsamples.{j}", "decoder.up_blocks.{stage}.resnets.{j}", "resblock"),
        "up_sample": ("decoder.upsamples.{stage}.upsamples.{j}", "decoder.up_blocks.{stage}.upsampler", "resample"),
    },
}

# How the encoder's stage structure shows in each layout: regex over a key -> (stage?, position, leaf), and the leaf
# that marks a residual block (its shape[0] is the block's output width), a down-sampler, a temporal down-sampler and
# an attention block.  Used to infer dim_mult / num_res_blocks / temperal_downsample.
ENCODER_SCAN: dict[tuple[str, str], dict[str, str]] = {
    ("original", WAN21): {"re": r"^encoder\.downsamples\.(?P<pos>\d+)\.(?P<leaf>.+)$",
                          "res": "residual.2.weight", "down": "resample.1.weight", "time": "time_conv.weight",
                          "attn": "to_qkv.weight"},
    ("original", WAN22): {"re": r"^encoder\.downsamples\.(?P<stage>\d+)\.downsamples\.(?P<pos>\d+)\.(?P<leaf>.+)$",
                          "res": "residual.2.weight", "down": "resample.1.weight", "time": "time_conv.weight",
                          "attn": "to_qkv.weight"},
    ("diffusers", WAN21): {"re": r"^encoder\.down_blocks\.(?P<pos>\d+)\.(?P<leaf>.+)$",
                           "res": "conv1.weight", "down": "resample.1.weight", "time": "time_conv.weight",
                           "attn": "to_qkv.weight"},
    ("diffusers", WAN22): {"re": r"^encoder\.down_blocks\.(?P<stage>\d+)\.(?P<pos>resnets\.\d+|downsampler)\.(?P<leaf>.+)$",
                           "res": "conv1.weight", "down": "resample.1.weight", "time": "time_conv.weight",
                           "attn": "to_qkv.weight"},
}

# Keys that every original Wan VAE has, and the Diffusers keys that identify a converted one.
REQUIRED_ORIGINAL_KEYS = (
    "conv1.weight",
    "conv2.weight",
    "encoder.conv1.weight",
    "encoder.head.0.gamma",
    "encoder.head.2.weight",
    "decoder.conv1.weight",
    "decoder.head.0.gamma",
    "decoder.head.2.weight",
)
REQUIRED_DIFFUSERS_KEYS = (
    "quant_conv.weight",
    "post_quant_conv.weight",
    "encoder.conv_in.weight",
    "encoder.conv_out.weight",
    "decoder.conv_in.weight",
    "decoder.conv_out.weight",
)
# Keys that only the nested Wan2.2 layout / only the flat Wan2.1 layout has.
_WAN22_MARK = re.compile(r"^(encoder\.downsamples\.\d+\.downsamples\.|decoder\.upsamples\.\d+\.upsamples\.)")
_WAN21_MARK = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.\d+\.(residual|shortcut|resample|time_conv)\.")

# Real per-channel latent statistics of the releases (Wan2.1 wan/modules/vae.py, Wan2.2 wan/modules/vae2_2.py).
LATENTS_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    WAN21: (
        (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
         0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
        (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
         3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160),
    ),
    WAN22: (
        (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
         -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
         -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
         -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
         -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
         0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667),
        (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
         0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
         0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
         0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
         0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
         0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744),
    ),
}

# AutoencoderKLWan.__init__ arguments a config may carry (anything else, e.g. the script's ``clip_output``, is dropped).
_CONFIG_FIELDS = (
    "base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
    "dropout", "latents_mean", "latents_std", "is_residual", "in_channels", "out_channels", "patch_size",
    "scale_factor_temporal", "scale_factor_spatial",
)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _unwrap(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Accept the DiffSynth / training wrappers: ``{"model_state": sd}`` and a ``model.`` (etc.) prefix on every key."""
    if "model_state" in sd and isinstance(sd["model_state"], Mapping):
        sd = sd["model_state"]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"VAE state dict: values that are not tensors under keys {format_keys(bad)}")
    sd = dict(sd)
    for anchor in ("encoder.", "decoder."):
        stripped = strip_known_prefixes(sd, anchor)
        if stripped is not sd:
            return stripped
    return sd


@functools.lru_cache(maxsize=None)
def _known_key_patterns(version: str) -> tuple[re.Pattern, ...]:
    """Regexes of every key the original layout of ``version`` may contain, derived from the key-map tables.

    Attention blocks inside the down / up stages (``attn_scales``) are recognised here so that they are reported as
    unsupported by :func:`vae_config_from_state_dict` rather than as unknown keys.
    """
    entries = [(m, leaf) for m, _, leaf in FIXED_MODULE_MAP]
    entries += [(m, leaf) for m, _, leaf in STAGE_MODULE_MAP[version].values()]
    entries += [(m, "attention") for m, _, _ in STAGE_MODULE_MAP[version].values()]
    pats = []
    for module, leaf in entries:
        mod_re = re.escape(module)
        for ph in ("{n}", "{stage}", "{j}"):
            mod_re = mod_re.replace(re.escape(ph), r"\d+")
        pats += [re.compile(f"^{mod_re}\\.{re.escape(src)}$") for src, _ in LEAF_MAPS[leaf]]
    return tuple(pats)


def _unknown_keys(keys, version: str) -> list[str]:
    pats = _known_key_patterns(version)
    return [k for k in keys if not any(p.match(k) for p in pats)]


# ----------------------------------------------------------------------------------------------------------------
# Version detection and config inference
# ----------------------------------------------------------------------------------------------------------------


def detect_vae_version(sd: Mapping[str, torch.Tensor]) -> str:
    """Return ``"wan2.1"`` or ``"wan2.2"`` for an original-layout Wan VAE state dict.

    Wan2.2 (``vae2_2.py``) nests its stages (``encoder.downsamples.{i}.downsamples.{j}``), Wan2.1 (``vae.py``) keeps
    them flat (``encoder.downsamples.{n}``).  Anything else raises :class:`ConversionError` naming the missing
    required keys and / or the keys that belong to neither layout.

    Example:
        >>> detect_vae_version(torch.load("Wan2.2_VAE.pth"))  # doctest: +SKIP
        'wan2.2'
    """
    sd = _unwrap(sd)
    keys = list(sd)
    if all(k in sd for k in REQUIRED_DIFFUSERS_KEYS) and not any(k in sd for k in REQUIRED_ORIGINAL_KEYS):
        raise ConversionError(
            "VAE state dict is already in the Diffusers AutoencoderKLWan layout (keys "
            f"{format_keys(REQUIRED_DIFFUSERS_KEYS, 3)}); load it with AutoencoderKLWan directly or use "
            "export_vae_state_dict to go back to the original layout"
        )
    missing = [k for k in REQUIRED_ORIGINAL_KEYS if k not in sd]
    nested = [k for k in keys if _WAN22_MARK.match(k)]
    flat = [k for k in keys if _WAN21_MARK.match(k)]
    problems = []
    if missing:
        problems.append(f"missing keys: {format_keys(missing)}")
    if nested and flat:
        problems.append(
            "mixes the Wan2.2 nested layout (e.g. "
            f"{format_keys(nested, 3)}) with the Wan2.1 flat layout: unexpected keys {format_keys(flat)}"
        )
        version = None
    elif nested:
        version = WAN22
    elif flat:
        version = WAN21
    else:
        version = None
        problems.append("no encoder.downsamples.* / decoder.upsamples.* keys of either layout")
    if version is not None:
        unknown = _unknown_keys(keys, version)
        if unknown:
            problems.append(f"unexpected keys for the {version} layout: {format_keys(unknown)}")
    if problems:
        raise ConversionError("not an original Wan VAE state dict (Wan2.1_VAE.pth / Wan2.2_VAE.pth layout): "
                              + "; ".join(problems))
    return version


def _scan_encoder(sd: Mapping[str, torch.Tensor], layout: str, version: str) -> list[dict]:
    """Encoder stages as ``[{"res": [out widths], "down": bool, "time": bool, "attn": bool}, ...]``."""
    spec = ENCODER_SCAN[(layout, version)]
    pat = re.compile(spec["re"])
    layers: dict[tuple, dict] = {}
    for k, v in sd.items():
        m = pat.match(k)
        if not m:
            continue
        g = m.groupdict()
        pos = g["pos"]
        order = (int(g["stage"]) if g.get("stage") is not None else -1,
                 int(pos.rsplit(".", 1)[-1]) if pos[-1].isdigit() else math.inf)
        info = layers.setdefault(order, {"kind": None, "width": None, "time": False})
        leaf = g["leaf"]
        if leaf == spec["res"]:
            info["kind"], info["width"] = "res", int(v.shape[0])
        elif leaf == spec["down"]:
            info["kind"] = "down"
        elif leaf == spec["attn"]:
            info["kind"] = "attn"
        if leaf == spec["time"]:
            info["time"] = True
    stages: list[dict] = []
    current = {"res": [], "down": False, "time": False, "attn": False}
    last_stage = None
    for (stage, _), info in sorted(layers.items()):
        if stage != -1 and last_stage is not None and stage != last_stage and (current["res"] or current["down"]):
            stages.append(current)
            current = {"res": [], "down": False, "time": False, "attn": False}
        last_stage = stage
        if info["kind"] == "res":
            current["res"].append(info["width"])
        elif info["kind"] == "attn":
            current["attn"] = True
        elif info["kind"] == "down":
            current["down"], current["time"] = True, info["time"]
            if stage == -1:  # flat layout: a down-sampler closes the stage
                stages.append(current)
                current = {"res": [], "down": False, "time": False, "attn": False}
    if current["res"] or current["down"]:
        stages.append(current)
    return stages


def _structure_config(stages: list[dict], base_dim: int, where: str) -> dict:
    if not stages or not stages[0]["res"]:
        raise ConversionError(f"{where}: cannot find the encoder's residual blocks")
    if any(s["attn"] for s in stages):
        raise ConversionError(
            f"{where}: attention blocks inside the encoder stages (non-empty attn_scales) cannot be represented by "
            "Diffusers' AutoencoderKLWan (its decoder has no stage attention); no Wan release uses them"
        )
    num_res = len(stages[0]["res"])
    dim_mult = []
    for i, s in enumerate(stages):
        if len(s["res"]) != num_res or len(set(s["res"])) != 1:
            raise ConversionError(f"{where}: encoder stage {i} has residual blocks of widths {s['res']}; expected "
                                  f"{num_res} blocks of one width (as in stage 0)")
        if s["res"][0] % base_dim:
            raise ConversionError(f"{where}: encoder stage {i} width {s['res'][0]} is not a multiple of base_dim "
                                  f"{base_dim}")
        dim_mult.append(s["res"][0] // base_dim)
        if s["down"] != (i != len(stages) - 1):
            raise ConversionError(f"{where}: encoder stage {i} {'has' if s['down'] else 'lacks'} a down-sampler; "
                                  "every stage but the last must have one")
    temporal = [bool(s["time"]) for s in stages[:-1]]
    return {"dim_mult": dim_mult, "num_res_blocks": num_res, "temperal_downsample": temporal}


def _finish_config(version: str, base_dim: int, dec_top_width: int, z_dim: int, in_ch: int, out_ch: int,
                   structure: dict, where: str) -> dict:
    dim_mult = structure["dim_mult"]
    if dec_top_width % dim_mult[-1]:
        raise ConversionError(f"{where}: decoder input width {dec_top_width} is not a multiple of dim_mult[-1]")
    dec_dim = dec_top_width // dim_mult[-1]
    patch = math.isqrt(in_ch // 3) if in_ch % 3 == 0 else 0
    if patch < 1 or 3 * patch * patch != in_ch or out_ch != in_ch:
        raise ConversionError(f"{where}: encoder input / decoder output channels {in_ch} / {out_ch} are not "
                              "3 x patch^2 RGB channels")
    mean, std = LATENTS_MEAN_STD[version]
    if len(mean) != z_dim:
        warnings.warn(f"{where}: z_dim {z_dim} has no known latent statistics for {version}; using mean 0 / std 1")
        mean, std = (0.0,) * z_dim, (1.0,) * z_dim
    return {
        "base_dim": base_dim,
        "decoder_base_dim": None if dec_dim == base_dim else dec_dim,
        "z_dim": z_dim,
        "dim_mult": list(dim_mult),
        "num_res_blocks": structure["num_res_blocks"],
        "attn_scales": [],
        "temperal_downsample": list(structure["temperal_downsample"]),
        "dropout": 0.0,
        "latents_mean": list(mean),
        "latents_std": list(std),
        "is_residual": version == WAN22,
        "in_channels": in_ch,
        "out_channels": out_ch,
        "patch_size": None if patch == 1 else patch,
        "scale_factor_temporal": 2 ** sum(structure["temperal_downsample"]),
        "scale_factor_spatial": 2 ** (len(dim_mult) - 1) * patch,
    }


def vae_config_from_state_dict(sd: Mapping[str, torch.Tensor], version: str | None = None) -> dict:
    """``AutoencoderKLWan`` config kwargs for an original-layout Wan VAE state dict, inferred from its shapes.

    ``version`` (``"wan2.1"`` / ``"wan2.2"``) is detected when not given.

    Example:
        >>> cfg = vae_config_from_state_dict(sd)  # doctest: +SKIP
        >>> cfg["z_dim"], cfg["scale_factor_spatial"]  # doctest: +SKIP
        (48, 16)
    """
    sd = _unwrap(sd)
    detected = detect_vae_version(sd)
    if version is not None and version != detected:
        raise ConversionError(f"VAE state dict has the {detected} layout, not {version}")
    where = f"{detected} VAE"
    base_dim = int(sd["encoder.conv1.weight"].shape[0])
    structure = _structure_config(_scan_encoder(sd, "original", detected), base_dim, where)
    return _finish_config(
        detected, base_dim, int(sd["decoder.conv1.weight"].shape[0]), int(sd["conv2.weight"].shape[0]),
        int(sd["encoder.conv1.weight"].shape[1]), int(sd["decoder.head.2.weight"].shape[0]), structure, where,
    )


def _config_from_diffusers_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    missing = [k for k in REQUIRED_DIFFUSERS_KEYS if k not in sd]
    if missing:
        raise ConversionError(f"not a Diffusers AutoencoderKLWan state dict: missing keys {format_keys(missing)}")
    version = WAN22 if any(re.match(r"^encoder\.down_blocks\.\d+\.resnets\.", k) for k in sd) else WAN21
    where = f"Diffusers AutoencoderKLWan ({version})"
    base_dim = int(sd["encoder.conv_in.weight"].shape[0])
    structure = _structure_config(_scan_encoder(sd, "diffusers", version), base_dim, where)
    return _finish_config(
        version, base_dim, int(sd["decoder.conv_in.weight"].shape[0]), int(sd["post_quant_conv.weight"].shape[0]),
        int(sd["encoder.conv_in.weight"].shape[1]), int(sd["decoder.conv_out.weight"].shape[0]), structure, where,
    )


# ----------------------------------------------------------------------------------------------------------------
# Key table for one config
# ----------------------------------------------------------------------------------------------------------------


def _clean_config(config: Mapping[str, Any]) -> dict:
    return {k: config[k] for k in _CONFIG_FIELDS if k in config}


def _stage_slots(config: Mapping[str, Any]) -> Iterator[tuple[str, dict]]:
    """Yield ``(slot, {n, stage, j})`` for every repeated module of the encoder and decoder, in original order."""
    n_stages = len(config["dim_mult"])
    res = config["num_res_blocks"]
    n = 0
    for stage in range(n_stages):
        for j in range(res):
            yield "down_res", {"n": n, "stage": stage, "j": j}
            n += 1
        if stage != n_stages - 1:
            yield "down_sample", {"n": n, "stage": stage, "j": res}
            n += 1
    n = 0
    for stage in range(n_stages):
        for j in range(res + 1):
            yield "up_res", {"n": n, "stage": stage, "j": j}
            n += 1
        if stage != n_stages - 1:
            yield "up_sample", {"n": n, "stage": stage, "j": res + 1}
            n += 1


@functools.lru_cache(maxsize=32)
def _meta_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan(**json.loads(config_json))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _target_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    try:
        return _meta_shapes(json.dumps(_clean_config(config), sort_keys=True))
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ConversionError(f"cannot build AutoencoderKLWan from config {dict(config)}: {e}") from e


@functools.lru_cache(maxsize=32)
def _key_table_cached(config_json: str) -> tuple[tuple[str, str], ...]:
    config = json.loads(config_json)
    version = WAN22 if config.get("is_residual") else WAN21
    shapes = _target_shapes(config)
    modules = [(o, d, leaf) for o, d, leaf in FIXED_MODULE_MAP]
    for slot, fields in _stage_slots(config):
        o, d, leaf = STAGE_MODULE_MAP[version][slot]
        modules.append((o.format(**fields), d.format(**fields), leaf))
    table = []
    for o_mod, d_mod, leaf in modules:
        for o_leaf, d_leaf in LEAF_MAPS[leaf]:
            d_key = f"{d_mod}.{d_leaf}"
            if d_key in shapes:  # optional parameters (shortcut, time_conv) only where the model has them
                table.append((f"{o_mod}.{o_leaf}", d_key))
    uncovered = set(shapes) - {d for _, d in table}
    if uncovered:  # the tables do not describe this diffusers version's AutoencoderKLWan
        raise ConversionError(f"VAE key map does not cover AutoencoderKLWan parameters {format_keys(uncovered)}")
    return tuple(table)


def vae_key_table(config: Mapping[str, Any]) -> dict[str, str]:
    """The explicit ``original key -> diffusers key`` table of one ``AutoencoderKLWan`` config."""
    return dict(_key_table_cached(json.dumps(_clean_config(config), sort_keys=True)))


def _rename_checked(sd: Mapping[str, torch.Tensor], table: Mapping[str, str], target_shape_of, src_layout: str,
                    version: str) -> dict[str, torch.Tensor]:
    what = f"{version} VAE ({src_layout} layout)"
    raise_for_key_problems(what, missing=[k for k in table if k not in sd], unexpected=[k for k in sd if k not in table])
    out, bad = {}, []
    for k, v in sd.items():
        new = table[k]
        want = target_shape_of(k, new)
        if tuple(v.shape) != want:
            bad.append(f"{k} {tuple(v.shape)} (expected {want})")
        out[new] = v
    raise_for_key_problems(f"{what} vs. the inferred config", wrong_shapes=bad)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Public conversion API
# ----------------------------------------------------------------------------------------------------------------


def convert_vae_state_dict(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
                           ) -> dict[str, torch.Tensor]:
    """Original Wan VAE keys -> Diffusers ``AutoencoderKLWan`` keys (tensors are not copied or reshaped).

    ``config`` defaults to :func:`vae_config_from_state_dict`; every tensor's shape is checked against the model that
    config builds.  Unknown / missing keys and shape mismatches raise :class:`ConversionError` naming them.

    Example:
        >>> dsd = convert_vae_state_dict(torch.load("Wan2.1_VAE.pth"))  # doctest: +SKIP
        >>> dsd["encoder.conv_in.weight"].shape  # doctest: +SKIP
        torch.Size([96, 3, 3, 3, 3])
    """
    sd = _unwrap(sd)
    version = detect_vae_version(sd)
    config = vae_config_from_state_dict(sd, version) if config is None else _clean_config(config)
    if bool(config.get("is_residual")) != (version == WAN22):
        raise ConversionError(f"config is_residual={config.get('is_residual')} does not match the {version} layout")
    table = vae_key_table(config)
    shapes = _target_shapes(config)
    return _rename_checked(sd, table, lambda old, new: shapes[new], "original", version)


def export_vae_state_dict(sd: Mapping[str, torch.Tensor] | Any, config: Mapping[str, Any] | None = None
                          ) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKLWan`` keys -> original Wan VAE keys; the exact inverse of :func:`convert_vae_state_dict`.

    ``sd`` may also be an ``AutoencoderKLWan`` (its state dict and config are used).  The config is otherwise read
    from the shapes.  Unknown / missing keys and shape mismatches raise :class:`ConversionError`.

    Example:
        >>> torch.save(export_vae_state_dict(vae), "Wan2.1_VAE.pth")  # doctest: +SKIP
    """
    if hasattr(sd, "state_dict") and hasattr(sd, "config"):
        config = dict(sd.config) if config is None else config
        sd = sd.state_dict()
    sd = dict(sd)
    config = _config_from_diffusers_state_dict(sd) if config is None else _clean_config(config)
    version = WAN22 if config.get("is_residual") else WAN21
    inverse = {d: o for o, d in vae_key_table(config).items()}
    shapes = _target_shapes(config)
    return _rename_checked(sd, inverse, lambda old, new: shapes[old], "diffusers", version)


def _read_original(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_state_dict(path)
    except ConversionError as err:  # a .pth wrapped as {"model_state": sd}
        if not str(path).endswith((".pth", ".pt", ".ckpt", ".bin")):
            raise
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            raise err from None
        if isinstance(obj, Mapping) and isinstance(obj.get("model_state"), Mapping):
            return dict(obj["model_state"])
        raise


def load_vae_from_original(sd_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
                           torch_dtype: torch.dtype = torch.float32, **config_overrides):
    """Build a stock Diffusers ``AutoencoderKLWan`` from an original Wan2.1 / Wan2.2 VAE state dict or file.

    The weights are converted with :func:`convert_vae_state_dict` and loaded strictly; missing / unexpected keys are
    reported by name.  ``config_overrides`` replace inferred config fields (e.g. ``latents_mean``); structural
    overrides that contradict the weights fail the shape check.

    Example:
        >>> vae = load_vae_from_original("Wan2.2-TI2V-5B/Wan2.2_VAE.pth", torch_dtype=torch.float32)  # doctest: +SKIP
        >>> vae.config.z_dim  # doctest: +SKIP
        48
    """
    from diffusers import AutoencoderKLWan

    if isinstance(sd_or_path, (str, os.PathLike)):
        sd = _read_original(sd_or_path)
        where = str(sd_or_path)
    else:
        sd, where = sd_or_path, "VAE state dict"
    sd = _unwrap(sd)
    config = vae_config_from_state_dict(sd)
    unknown = set(config_overrides) - set(_CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"unknown AutoencoderKLWan config fields: {sorted(unknown)}")
    config.update(config_overrides)
    converted = convert_vae_state_dict(sd, config)
    with torch.device("meta"):
        model = AutoencoderKLWan(**config)
    converted = {k: v.to(dtype=torch_dtype) for k, v in converted.items()}
    result = model.load_state_dict(converted, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ConversionError(f"{where}: loading into AutoencoderKLWan failed: missing keys "
                              f"{format_keys(result.missing_keys)}; unexpected keys "
                              f"{format_keys(result.unexpected_keys)}")
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ConversionError(f"{where}: parameters left uninitialised: {format_keys(still_meta)}")
    return model.eval()
