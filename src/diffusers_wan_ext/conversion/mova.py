"""MOVA release components (openmoss/MOVA-360p / MOVA-720p) -> our Diffusers classes.

The release is a Diffusers-style folder, one sub-folder per component (``config.json`` + ``diffusion_pytorch_model*``
safetensors): ``video_dit/`` (high-noise expert) and ``video_dit_2/`` (low-noise expert) in the original Wan key
layout (Wan2.2-I2V without CLIP -> stock ``WanTransformer3DModel`` through :mod:`~diffusers_wan_ext.conversion.dit`),
``audio_dit/`` (Wan keys with a ``Conv1d`` ``patch_embedding``), ``dual_tower_bridge/``
(``audio_to_video_conditioners.N.*`` / ``video_to_audio_conditioners.N.*``) and ``audio_vae/`` (a continuous DAC VAE
whose keys are already :class:`~diffusers_wan_ext.models.autoencoder_dac.AutoencoderDac`'s; ``weight_g`` /
``weight_v`` pairs of a file that still has weight norm are fused).  Every key map here is a table of module-path pairs; widths
come from the shapes, what shapes cannot tell (heads, the bridge's head dim and depths) from the release
``config.json``, else the release values.

Each ``config.json`` is what the original classes' ``save_pretrained`` writes (OpenMOSS/MOVA, ``mova/diffusion/models``:
Diffusers ``ConfigMixin`` classes): ``_class_name`` (:data:`MOVA_RELEASE_CLASSES`) and the constructor arguments --
``WanModel`` / ``WanAudioModel`` (``dim``, ``in_dim``, ``ffn_dim``, ``out_dim``, ``text_dim``, ``freq_dim``, ``eps``,
``patch_size``, ``num_heads``, ``num_layers``, ``has_image_input``, ...; the audio DiT adds ``vae_type``),
``DualTowerConditionalBridge`` (``visual_layers``, ``audio_layers``, ``visual_hidden_dim``, ``audio_hidden_dim``,
``audio_fps``, ``head_dim``, ``interaction_strategy``, ``apply_cross_rope``, ``apply_first_frame_bias_in_rope``,
``trainable_condition_scale``, ``pooled_adaln``) and ``DAC`` (``encoder_dim``, ``encoder_rates``, ``latent_dim``,
``decoder_dim``, ``decoder_rates``, ``n_codebooks``, ``codebook_size``, ``codebook_dim``, ``quantizer_dropout``,
``sample_rate``, ``continuous``, ``use_weight_norm``).  DiffSynth-Studio reads none of them: it hard-codes the release
values (its ``model_configs.py`` ``extra_kwargs`` and class defaults), which are the values used here where a field
is absent.  Where the original class's default differs from those values (:data:`MOVA_REQUIRED_CONFIG_FIELDS`), a
release ``config.json`` without the field is ambiguous and refused, naming the file and the field; a weights file
without any ``config.json`` (what DiffSynth loads) takes the release values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import init_empty_weights

from ..models.autoencoder_dac import AutoencoderDac
from ..models.mova_bridge import INTERACTION_STRATEGIES, MovaDualTowerBridge, interaction_layers
from ..models.transformer_mova_audio import MovaAudioTransformer1DModel
from ..utils.io import ConversionError, format_keys
from .dit import (
    BLOCK_KEY_MAP,
    RELEASE_HEAD_DIM,
    block_indices,
    check_block_layout,
    flip_table,
    load_converted_state_dict,
    read_original_dit,
    rename_by_table,
)

__all__ = [
    "AUDIO_DIT_TOP_LEVEL_KEY_MAP",
    "MOVA_RELEASE_CLASSES",
    "MOVA_RELEASE_FIXED_FIELDS",
    "MOVA_REQUIRED_CONFIG_FIELDS",
    "check_release_config",
    "mova_release_config",
    "audio_vae_config_from_state_dict",
    "fuse_weight_norm",
    "is_mova_audio_vae",
    "load_mova_audio_vae",
    "BRIDGE_BLOCK_KEY_MAP",
    "BRIDGE_GROUPS",
    "MOVA_AUDIO_DIT_MODULES",
    "MOVA_BRIDGE_MODULES",
    "MOVA_COMPONENT_FOLDERS",
    "rename_mova_audio_dit_module",
    "rename_mova_bridge_module",
    "audio_dit_config_from_state_dict",
    "bridge_config_from_state_dict",
    "convert_mova_audio_dit_state_dict",
    "convert_mova_bridge_state_dict",
    "export_mova_audio_dit_state_dict",
    "export_mova_bridge_state_dict",
    "is_mova_audio_dit",
    "is_mova_bridge",
    "load_mova_audio_dit",
    "load_mova_bridge",
]

#: Release sub-folder -> the ``_class_name`` of its ``config.json`` (the original OpenMOSS/MOVA class).
MOVA_RELEASE_CLASSES = {
    "video_dit": "WanModel",
    "video_dit_2": "WanModel",
    "audio_dit": "WanAudioModel",
    "dual_tower_bridge": "DualTowerConditionalBridge",
    "audio_vae": "DAC",
}
#: Fields a release ``config.json`` must carry, with the release values DiffSynth-Studio hard-codes: the weights
#: cannot tell them and the original class's default is another value (``num_heads``: none; ``vae_type``: "oobleck",
#: another RoPE; ``interaction_strategy`` "shallow_focus"; ``apply_cross_rope`` false; ``audio_fps`` 44100 / 2048;
#: ``sample_rate`` 44100).
MOVA_REQUIRED_CONFIG_FIELDS = {
    "audio_dit": {"num_heads": 12, "vae_type": "dac"},
    "dual_tower_bridge": {"interaction_strategy": "full", "apply_cross_rope": True, "audio_fps": 50.0},
    "audio_vae": {"sample_rate": 48000},
}
#: The release values of the fields a tiny or hand-made release folder needs besides the widths (the ones the
#: converter checks or requires; see :func:`mova_release_config`).
MOVA_RELEASE_FIXED_FIELDS = {
    "video_dit": dict(has_image_input=False, patch_size=[1, 2, 2], eps=1e-6, in_dim=36, out_dim=16),
    "audio_dit": dict(vae_type="dac", has_image_input=False, patch_size=[1], eps=1e-6, in_dim=128, out_dim=128),
    "dual_tower_bridge": dict(audio_fps=50.0, head_dim=128, interaction_strategy="full", apply_cross_rope=True,
                              apply_first_frame_bias_in_rope=False, trainable_condition_scale=False,
                              pooled_adaln=False),
    "audio_vae": dict(sample_rate=48000, continuous=True, use_weight_norm=False),
}

#: Release sub-folder -> what it holds.
MOVA_COMPONENT_FOLDERS = {
    "video_dit": "high-noise video expert (Wan2.2-I2V DiT without CLIP, original Wan keys)",
    "video_dit_2": "low-noise video expert (same layout)",
    "audio_dit": "audio DiT (Wan keys, Conv1d patch_embedding)",
    "dual_tower_bridge": "dual-tower bridge (audio_to_video_conditioners.N.* / video_to_audio_conditioners.N.*)",
    "audio_vae": "DAC audio VAE (48 kHz, hop 960, 128 latent channels)",
}

# (release module path, ours) -- the audio DiT's top level; its blocks use the Wan block table.
AUDIO_DIT_TOP_LEVEL_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
)

#: The bridge's two conditioner groups: release prefix -> ours (then ``.N.`` and the block table).
BRIDGE_GROUPS: tuple[tuple[str, str], ...] = (
    ("audio_to_video_conditioners", "audio_to_video"),
    ("video_to_audio_conditioners", "video_to_audio"),
)
BRIDGE_BLOCK_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("y_norm", "norm_context"),
    ("inner.q", "to_q"),
    ("inner.k", "to_k"),
    ("inner.v", "to_v"),
    ("inner.o", "to_out.0"),
    ("inner.norm_q", "norm_q"),
    ("inner.norm_k", "norm_k"),
)
_AUDIO_REQUIRED = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
                   "time_projection.1.weight", "head.head.weight", "head.modulation", "blocks.0.self_attn.q.weight",
                   "blocks.0.ffn.0.weight")


def _rename_path(path: str, top, groups) -> str | None:
    """One key or module path renamed by ``top`` (top-level pairs) and ``groups`` (prefix -> (new prefix, block
    table)); ``None`` when nothing matches."""
    head, _, rest = path.partition(".")
    if head in groups and rest.split(".", 1)[0].isdigit():
        index, _, local = rest.partition(".")
        prefix, table = groups[head]
        renamed = rename_by_table(local, table)
        return None if renamed is None else f"{prefix}.{index}.{renamed}"
    return rename_by_table(path, top) if top else None


def _rename(sd: Mapping[str, torch.Tensor], top, groups, what: str) -> dict[str, torch.Tensor]:
    """Rename every key (:func:`_rename_path`); unknown keys raise naming them."""
    out, unknown = {}, []
    for key, value in sd.items():
        new = _rename_path(key, top, groups)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ConversionError(f"{len(unknown)} key(s) do not belong to {what}: {format_keys(unknown)}")
    return out


def _audio_tables(reverse: bool):
    top = flip_table(AUDIO_DIT_TOP_LEVEL_KEY_MAP) if reverse else AUDIO_DIT_TOP_LEVEL_KEY_MAP
    return top, {"blocks": ("blocks", flip_table(BLOCK_KEY_MAP) if reverse else BLOCK_KEY_MAP)}


def _bridge_groups(reverse: bool):
    table = flip_table(BRIDGE_BLOCK_KEY_MAP) if reverse else BRIDGE_BLOCK_KEY_MAP
    return {(b if reverse else a): ((a if reverse else b), table) for a, b in BRIDGE_GROUPS}


def convert_mova_audio_dit_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release ``audio_dit`` keys -> :class:`MovaAudioTransformer1DModel` names (no tensor changes)."""
    return _rename(sd, *_audio_tables(False), "MOVA's audio DiT (release layout)")


def export_mova_audio_dit_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`convert_mova_audio_dit_state_dict`."""
    return _rename(sd, *_audio_tables(True), "MovaAudioTransformer1DModel")


def convert_mova_bridge_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release ``dual_tower_bridge`` keys -> :class:`MovaDualTowerBridge` names (no tensor changes)."""
    return _rename(sd, (), _bridge_groups(False), "MOVA's dual-tower bridge (release layout)")


def export_mova_bridge_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`convert_mova_bridge_state_dict`."""
    return _rename(sd, (), _bridge_groups(True), "MovaDualTowerBridge")


def rename_mova_audio_dit_module(path: str, reverse: bool = False) -> str | None:
    """One audio-DiT module path, release -> ours (``reverse``: ours -> release); ``None`` if unknown (LoRA files)."""
    return _rename_path(path, *_audio_tables(reverse))


def rename_mova_bridge_module(path: str, reverse: bool = False) -> str | None:
    """One bridge module path, release -> ours (``reverse``: ours -> release); ``None`` if unknown (LoRA files)."""
    return _rename_path(path, (), _bridge_groups(reverse))


#: Release module paths of the audio DiT and the bridge (``N`` for the layer index): what LoRA readers need to know
#: about their names.
MOVA_AUDIO_DIT_MODULES = frozenset([src for src, _ in AUDIO_DIT_TOP_LEVEL_KEY_MAP]
                                   + [f"blocks.N.{src}" for src, _ in BLOCK_KEY_MAP])
MOVA_BRIDGE_MODULES = frozenset(f"{group}.N.{src}" for group, _ in BRIDGE_GROUPS for src, _ in BRIDGE_BLOCK_KEY_MAP)


def is_mova_audio_dit(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is MOVA's audio DiT (a Wan DiT whose ``patch_embedding`` is a ``Conv1d``)."""
    pe = sd.get("patch_embedding.weight")
    return pe is not None and pe.ndim == 3 and "blocks.0.self_attn.q.weight" in sd


def is_mova_bridge(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is MOVA's dual-tower bridge."""
    return any(k.startswith(BRIDGE_GROUPS[0][0] + ".") for k in sd)


def mova_release_config(component: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of the release sub-folder ``component`` as the original class writes it: ``_class_name``,
    the release's fixed fields (:data:`MOVA_RELEASE_FIXED_FIELDS`) and ``values`` (the widths; they win).

    Example:
        >>> mova_release_config("audio_vae", {"latent_dim": 128})["_class_name"]
        'DAC'
    """
    if component not in MOVA_RELEASE_CLASSES:
        raise ValueError(f"unknown MOVA component {component!r}; one of {', '.join(MOVA_RELEASE_CLASSES)}")
    fixed = MOVA_RELEASE_FIXED_FIELDS.get("video_dit" if component == "video_dit_2" else component, {})
    return {"_class_name": MOVA_RELEASE_CLASSES[component], **fixed, **values}


def check_release_config(component: str, cfg: Mapping[str, Any], source: str) -> None:
    """Refuse a release ``config.json`` (``source``) of ``component`` that names another class or lacks a field of
    :data:`MOVA_REQUIRED_CONFIG_FIELDS` (one line naming the file and the fields)."""
    expected = MOVA_RELEASE_CLASSES[component]
    name = cfg.get("_class_name")
    if name is not None and name != expected:
        raise ConversionError(f"{source}: _class_name {name!r}, but MOVA's {component}/config.json names {expected!r}")
    required = MOVA_REQUIRED_CONFIG_FIELDS.get(component, {})
    missing = [k for k in required if cfg.get(k) is None]
    if missing:
        values = ", ".join(f"{k}={json.dumps(required[k])}" for k in missing)
        raise ConversionError(
            f"{source}: MOVA's {component} config.json lacks {', '.join(missing)}, which the weights do not tell and "
            f"whose {expected} default is not the release's; add the release's value(s) ({values} in "
            "openmoss/MOVA-360p / 720p, as DiffSynth-Studio assumes)")


def _read_component(sd_or_path, original_config: Mapping[str, Any] | None, component: str):
    """Weights and config of one component; a ``config.json`` found beside the weights is checked
    (:func:`check_release_config`), a config given as ``original_config`` may be partial."""
    sd, cfg = read_original_dit(sd_or_path, original_config)
    if original_config is None and cfg:
        path = Path(sd_or_path)
        check_release_config(component, cfg, str((path if path.is_dir() else path.parent) / "config.json"))
    return sd, cfg


def _checked_int(cfg: Mapping[str, Any], key: str, value: int, source: str) -> int:
    if key in cfg and cfg[key] is not None and int(cfg[key]) != int(value):
        raise ConversionError(f"config.json says {key}={cfg[key]} but the weights have {key}={value} (from {source})")
    return int(value)


def audio_dit_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], original_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """:class:`MovaAudioTransformer1DModel` config from release-layout weights (and the release ``config.json``:
    ``num_heads``, ``eps``; other widths must agree with the shapes; ``vae_type`` must be "dac", ``patch_size``
    ``[1]``, ``has_image_input`` false)."""
    cfg = dict(original_config or {})
    if cfg.get("vae_type", "dac") != "dac":
        raise ConversionError(
            f"audio_dit config.json: vae_type {cfg['vae_type']!r} is not supported: MOVA-360p / 720p's audio DiT is "
            "the 'dac' one (48 kHz DAC latents, plain 1-D RoPE); 'oobleck' uses another RoPE scale")
    if cfg.get("patch_size") is not None and list(cfg["patch_size"]) != [1]:
        raise ConversionError(f"audio_dit config.json: patch_size {cfg['patch_size']} is not [1] (MOVA's audio DiT)")
    if cfg.get("has_image_input"):
        raise ConversionError("audio_dit config.json: has_image_input=true is not supported (MOVA's audio DiT has no "
                              "image input)")
    num_layers = len(check_block_layout(sd, _AUDIO_REQUIRED, "MOVA's audio DiT"))
    pe = sd["patch_embedding.weight"]
    if pe.ndim != 3 or pe.shape[2] != 1:
        raise ConversionError(f"patch_embedding.weight must be a Conv1d weight [dim, in, 1], got {tuple(pe.shape)}")
    dim = _checked_int(cfg, "dim", pe.shape[0], "patch_embedding.weight")
    num_heads = int(cfg.get("num_heads") or max(1, dim // RELEASE_HEAD_DIM))
    if dim % num_heads or (dim // num_heads) % 2:
        raise ConversionError(f"audio DiT: dim {dim} with num_heads {num_heads} gives no even head dim")
    return dict(
        in_channels=_checked_int(cfg, "in_dim", pe.shape[1], "patch_embedding.weight"),
        out_channels=_checked_int(cfg, "out_dim", sd["head.head.weight"].shape[0], "head.head.weight"),
        num_attention_heads=num_heads,
        attention_head_dim=dim // num_heads,
        text_dim=_checked_int(cfg, "text_dim", sd["text_embedding.0.weight"].shape[1], "text_embedding.0.weight"),
        freq_dim=_checked_int(cfg, "freq_dim", sd["time_embedding.0.weight"].shape[1], "time_embedding.0.weight"),
        ffn_dim=_checked_int(cfg, "ffn_dim", sd["blocks.0.ffn.0.weight"].shape[0], "blocks.0.ffn.0.weight"),
        num_layers=_checked_int(cfg, "num_layers", num_layers, "the blocks.N keys"),
        cross_attn_norm="blocks.0.norm3.weight" in sd,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in sd else None,
        eps=float(cfg.get("eps", 1e-6)),
    )


def bridge_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], original_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """:class:`MovaDualTowerBridge` config from release-layout weights and the release ``config.json``
    (``head_dim``, depths, strategy, RoPE flags; release values where absent)."""
    cfg = dict(original_config or {})
    for flag in ("pooled_adaln", "trainable_condition_scale"):
        if cfg.get(flag):
            raise ConversionError(f"dual_tower_bridge config.json: {flag}=true is not supported (MOVA releases use false)")
    a2v, v2a = (block_indices(sd, prefix) for prefix, _ in BRIDGE_GROUPS)
    if not a2v or a2v != v2a:
        raise ConversionError(
            f"not MOVA's dual-tower bridge: audio_to_video_conditioners layers {a2v} and "
            f"video_to_audio_conditioners layers {v2a} must be the same, non-empty set"
        )
    for needed in (f"audio_to_video_conditioners.{a2v[0]}.inner.q.weight",
                   f"video_to_audio_conditioners.{a2v[0]}.inner.q.weight"):
        if needed not in sd:
            raise ConversionError(f"dual_tower_bridge: missing key {needed}")
    visual = _checked_int(cfg, "visual_hidden_dim", sd[f"audio_to_video_conditioners.{a2v[0]}.inner.q.weight"].shape[0],
                          "audio_to_video_conditioners.*.inner.q.weight")
    audio = _checked_int(cfg, "audio_hidden_dim", sd[f"video_to_audio_conditioners.{a2v[0]}.inner.q.weight"].shape[0],
                         "video_to_audio_conditioners.*.inner.q.weight")
    strategy = str(cfg.get("interaction_strategy", "full"))
    if strategy not in INTERACTION_STRATEGIES:
        raise ConversionError(f"dual_tower_bridge config.json: interaction_strategy {strategy!r} is not one of "
                              f"{', '.join(INTERACTION_STRATEGIES)}")
    visual_layers = int(cfg.get("visual_layers") or a2v[-1] + 1)
    audio_layers = int(cfg.get("audio_layers") or a2v[-1] + 1)
    expected = interaction_layers(strategy, visual_layers, audio_layers)
    if expected != a2v:
        raise ConversionError(
            f"dual_tower_bridge: strategy {strategy!r} with {visual_layers} / {audio_layers} layers gives "
            f"conditioners at {expected}, the weights have them at {a2v}"
        )
    head_dim = int(cfg.get("head_dim") or RELEASE_HEAD_DIM)
    return dict(
        visual_layers=visual_layers, audio_layers=audio_layers, visual_hidden_dim=visual, audio_hidden_dim=audio,
        audio_fps=float(cfg.get("audio_fps", 50.0)), head_dim=head_dim, interaction_strategy=strategy,
        apply_cross_rope=bool(cfg.get("apply_cross_rope", True)),
        apply_first_frame_bias_in_rope=bool(cfg.get("apply_first_frame_bias_in_rope", False)),
        eps=float(cfg.get("eps", 1e-6)),
    )


def _build(cls, config: dict[str, Any]):
    try:
        with init_empty_weights():
            return cls(**config)
    except ValueError as e:
        raise ConversionError(f"{cls.__name__}: {e}") from e


def load_mova_audio_dit(
    sd_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
    original_config: Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
) -> MovaAudioTransformer1DModel:
    """:class:`MovaAudioTransformer1DModel` from the release ``audio_dit`` (a state dict, file or folder)."""
    sd, cfg = _read_component(sd_or_path, original_config, "audio_dit")
    if not is_mova_audio_dit(sd):
        raise ConversionError(f"{_source(sd_or_path)}: not MOVA's audio DiT (no Conv1d patch_embedding.weight)")
    model = _build(MovaAudioTransformer1DModel, audio_dit_config_from_state_dict(sd, cfg))
    return load_converted_state_dict(model, convert_mova_audio_dit_state_dict(sd), torch_dtype)


def load_mova_bridge(
    sd_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
    original_config: Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
) -> MovaDualTowerBridge:
    """:class:`MovaDualTowerBridge` from the release ``dual_tower_bridge`` (a state dict, file or folder)."""
    sd, cfg = _read_component(sd_or_path, original_config, "dual_tower_bridge")
    if not is_mova_bridge(sd):
        raise ConversionError(f"{_source(sd_or_path)}: not MOVA's dual-tower bridge (no audio_to_video_conditioners.*)")
    model = _build(MovaDualTowerBridge, bridge_config_from_state_dict(sd, cfg))
    return load_converted_state_dict(model, convert_mova_bridge_state_dict(sd), torch_dtype)


def _source(sd_or_path) -> str:
    return str(Path(sd_or_path)) if isinstance(sd_or_path, (str, os.PathLike)) else "state dict"


def fuse_weight_norm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every ``X.weight_g`` / ``X.weight_v`` pair (``torch.nn.utils.weight_norm``, dim 0) by ``X.weight``."""
    out = {k: v for k, v in sd.items() if not k.endswith((".weight_g", ".weight_v"))}
    for key in (k for k in sd if k.endswith(".weight_v")):
        base = key[: -len("_v")]
        g = sd.get(base + "_g")
        if g is None:
            raise ConversionError(f"weight-norm pair incomplete: {key} without {base}_g")
        v = sd[key].float()
        norm = v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.ndim - 1)))
        out[base] = (v * (g.float() / norm)).to(sd[key].dtype)
    return out


def is_mova_audio_vae(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is MOVA's DAC audio VAE."""
    return "quant_conv.weight" in sd and any(k.startswith("decoder.model.") for k in sd)


def _stage_strides(sd: Mapping[str, torch.Tensor], pattern: str, first: int) -> list[int]:
    strides, i = [], first
    while pattern.format(i=i) in sd:
        strides.append(int(sd[pattern.format(i=i)].shape[-1]) // 2)
        i += 1
    return strides


def audio_vae_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], original_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """:class:`AutoencoderDac` config from the (weight-norm fused) release ``audio_vae`` weights and its
    ``config.json`` (``sample_rate``; the widths and strides must agree with the shapes)."""
    cfg = dict(original_config or {})
    needed = ("encoder.block.0.weight", "quant_conv.weight", "decoder.model.0.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ConversionError(f"not MOVA's DAC audio VAE: missing key(s) {format_keys(missing)}")
    if cfg.get("continuous") is False:
        raise ConversionError("audio_vae config.json: continuous=false (vector-quantized DAC) is not supported; "
                              "MOVA uses the continuous VAE")
    encoder_rates = _stage_strides(sd, "encoder.block.{i}.block.4.weight", 1)
    decoder_rates = _stage_strides(sd, "decoder.model.{i}.block.1.weight", 1)
    config = dict(
        encoder_dim=_checked_int(cfg, "encoder_dim", sd["encoder.block.0.weight"].shape[0], "encoder.block.0.weight"),
        encoder_rates=encoder_rates,
        latent_dim=_checked_int(cfg, "latent_dim", sd["quant_conv.weight"].shape[1], "quant_conv.weight"),
        decoder_dim=_checked_int(cfg, "decoder_dim", sd["decoder.model.0.weight"].shape[0], "decoder.model.0.weight"),
        decoder_rates=decoder_rates,
        sample_rate=int(cfg.get("sample_rate", 48000)),
    )
    for key in ("encoder_rates", "decoder_rates"):
        if key in cfg and list(cfg[key]) != config[key]:
            raise ConversionError(f"audio_vae config.json says {key}={cfg[key]} but the weights have {config[key]}")
    return config


def load_mova_audio_vae(
    sd_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
    original_config: Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
) -> AutoencoderDac:
    """:class:`AutoencoderDac` from the release ``audio_vae`` (a state dict, file or folder)."""
    sd, cfg = _read_component(sd_or_path, original_config, "audio_vae")
    if not is_mova_audio_vae(sd):
        raise ConversionError(f"{_source(sd_or_path)}: not MOVA's DAC audio VAE (no quant_conv / decoder.model keys)")
    sd = fuse_weight_norm(sd)
    model = _build(AutoencoderDac, audio_vae_config_from_state_dict(sd, cfg))
    return load_converted_state_dict(model, sd, torch_dtype)
