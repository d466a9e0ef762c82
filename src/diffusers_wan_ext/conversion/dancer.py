"""Wan2.2-Dancer-14B DiT (``global_model.safetensors`` / ``local_model.safetensors``): release layout <-> our
:class:`~diffusers_wan_ext.models.WanDancerTransformer3DModel`.

Both release files have one layout (DiffSynth-Studio identifies them by the same key hash): the original Wan I2V keys
plus the Dancer modules below; the global model is run at a low frame rate (keyframes), the local one at 30 fps.
The Wan part converts with the Wan DiT tables (:mod:`diffusers_wan_ext.conversion.dit`); the Dancer modules with
the tables here, registered by the family declaration (:mod:`diffusers_wan_ext.families.dancer`) as a
``DitExtension``.  No tensor is reshaped, so export is the exact reverse.

* ``music_projection`` and ``music_encoder.N.*`` keep their names (``nn.MultiheadAttention`` / ``nn.Linear`` /
  ``nn.LayerNorm`` parameters);
* ``music_injector.injector.N.{q,k,v,o,norm_q,norm_k}`` -> stock ``WanAttention`` names (``to_q`` ...);
* ``img_emb_refimage.proj.{0,1,3,4}`` -> ``reference_image_embedder`` (stock ``WanImageEmbedding`` names);
* ``patch_embedding_global`` keeps its name, ``head_global.{head,modulation}`` -> ``proj_out_global`` /
  ``scale_shift_table_global`` (as stock's ``head`` -> ``proj_out`` / ``scale_shift_table``);
* ``ref_conv`` (present in the release, unused by the reference pipeline) is kept unchanged (the Fun tables name it),
  so the converted folder exports back to the release file.

The release has no ``config.json``: widths come from the shapes, ``num_heads`` from ``dim // 128``, the music inject
layers are the release's ``0, 4, ..., 27`` unless a ``config.json`` states ``wantodance_music_inject_layers`` (the
count must match the ``music_injector.injector.N`` keys), the music encoder heads are 4 unless it states
``music_num_heads``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..models.transformer_wan_dancer import DANCER_RELEASE_INJECT_LAYERS
from ..utils.io import ConversionError, format_keys
from .dit import DitShape, block_indices

__all__ = [
    "DANCER_BLOCK_TABLES",
    "DANCER_KEY_PREFIXES",
    "DANCER_RELEASE_FILES",
    "DANCER_TOP_LEVEL_KEYS",
    "dancer_config",
    "detect_dancer",
    "is_dancer_state_dict",
]

#: The DiT files of the Wan-AI/Wan-Dancer-14B release: ``{"global": ..., "local": ...}``.
DANCER_RELEASE_FILES = {"global": "global_model.safetensors", "local": "local_model.safetensors"}
#: Keys that mark the Dancer layout (any of them).
DANCER_KEY_PREFIXES = ("music_projection.", "music_encoder.", "music_injector.", "img_emb_refimage.",
                       "patch_embedding_global.", "head_global.")
#: Top-level module pairs ``(release, ours)``.
DANCER_TOP_LEVEL_KEYS = (
    ("music_projection", "music_projection"),
    ("img_emb_refimage.proj.0", "reference_image_embedder.norm1"),
    ("img_emb_refimage.proj.1", "reference_image_embedder.ff.net.0.proj"),
    ("img_emb_refimage.proj.3", "reference_image_embedder.ff.net.2"),
    ("img_emb_refimage.proj.4", "reference_image_embedder.norm2"),
    ("patch_embedding_global", "patch_embedding_global"),
    ("head_global.head", "proj_out_global"),
    ("head_global.modulation", "scale_shift_table_global"),
)
#: Repeated groups ``<group>.N.<local>``: local module pairs ``(release, ours)``.
DANCER_BLOCK_TABLES = {
    "music_encoder": (
        ("self_attn", "self_attn"), ("linear1", "linear1"), ("linear2", "linear2"), ("norm1", "norm1"),
        ("norm2", "norm2"),
    ),
    "music_injector.injector": (
        ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"), ("norm_k", "norm_k"),
    ),
}
#: Keys a complete Dancer DiT has (the release's four additions).
REQUIRED_KEYS = ("music_projection.weight", "music_encoder.0.linear1.weight", "music_injector.injector.0.q.weight",
                 "img_emb_refimage.proj.0.weight", "patch_embedding_global.weight", "head_global.head.weight",
                 "head_global.modulation")
#: Release values of what the shapes do not tell.
RELEASE_MUSIC_HEADS = 4


def is_dancer_state_dict(sd: Mapping[str, Any]) -> bool:
    """Whether an original-layout state dict (or its key names) has the Wan-Dancer modules."""
    return any(k.startswith(DANCER_KEY_PREFIXES) for k in sd)


def _inject_layers(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], num_layers: int) -> list[int]:
    injectors = block_indices(sd, "music_injector.injector")
    if injectors != list(range(len(injectors))):
        raise ConversionError(f"music injectors are not contiguous (music_injector.injector indices {injectors})")
    layers = [int(i) for i in cfg.get("wantodance_music_inject_layers", cfg.get("music_inject_layers",
                                                                                DANCER_RELEASE_INJECT_LAYERS))]
    valid = sorted({i for i in layers if 0 <= i < num_layers})
    if len(valid) != len(injectors) or len(valid) != len(layers):
        raise ConversionError(
            f"{len(injectors)} music injectors (music_injector.injector.*) but music inject layers {layers} with "
            f"{num_layers} DiT blocks: give wantodance_music_inject_layers in config.json (the release lists "
            f"{list(DANCER_RELEASE_INJECT_LAYERS)} for 40 blocks)"
        )
    return layers


def _check_widths(sd: Mapping[str, torch.Tensor], shape: DitShape) -> None:
    ref = sd["img_emb_refimage.proj.0.weight"]
    if not shape.has_img or int(ref.shape[0]) != shape.clip_dim:
        raise ConversionError(
            f"img_emb_refimage.proj.0.weight {tuple(ref.shape)} needs the CLIP branch img_emb.* of the same width "
            f"(img_emb.proj.0.weight: {shape.clip_dim})"
        )
    head = sd["head_global.head.weight"]
    if tuple(head.shape) != tuple(sd["head.head.weight"].shape):
        raise ConversionError(f"head_global.head.weight {tuple(head.shape)} differs from head.head.weight "
                              f"{tuple(sd['head.head.weight'].shape)}")
    pe = sd["patch_embedding_global.weight"]
    if tuple(pe.shape) != tuple(sd["patch_embedding.weight"].shape):
        raise ConversionError(f"patch_embedding_global.weight {tuple(pe.shape)} differs from patch_embedding.weight "
                              f"{tuple(sd['patch_embedding.weight'].shape)}")


def dancer_config(shape: DitShape) -> dict[str, Any]:
    """Config entries of a Wan-Dancer DiT (``{}`` for other DiTs), from the shapes and the optional ``config.json``."""
    sd, cfg = shape.sd, shape.cfg
    if not is_dancer_state_dict(sd):
        return {}
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        raise ConversionError(
            f"incomplete Wan-Dancer DiT: missing key(s) {format_keys(missing)} (the global_model / local_model "
            "release layout has the music encoder, music injectors, img_emb_refimage and the global patch embedding "
            "/ head)"
        )
    _check_widths(sd, shape)
    proj = sd["music_projection.weight"]
    heads = int(cfg.get("music_num_heads", RELEASE_MUSIC_HEADS))
    if proj.shape[0] % heads:
        raise ConversionError(f"music_projection.weight {tuple(proj.shape)}: width {proj.shape[0]} is not divisible "
                              f"by music_num_heads {heads}")
    return dict(
        music_feature_dim=int(proj.shape[1]),
        music_latent_dim=int(proj.shape[0]),
        music_ff_size=int(sd["music_encoder.0.linear1.weight"].shape[0]),
        music_num_heads=heads,
        music_num_layers=len(block_indices(sd, "music_encoder")),
        music_inject_layers=_inject_layers(sd, cfg, shape.num_layers),
        rope_max_seq_len=max(int(cfg.get("rope_max_seq_len", 0)), 2794),
    )


def detect_dancer(shape: DitShape, ext: dict[str, Any]) -> str | None:
    """``"dancer"`` for a Wan-Dancer DiT (music modules present), else ``None``; a non-I2V base is an error."""
    if "music_inject_layers" not in ext:
        return None
    if shape.extra_channels != 20 or not shape.has_img or shape.pos_len is not None:
        raise ConversionError(
            f"Wan-Dancer weights (music_*) on a DiT with in_dim {shape.in_dim} / out_dim {shape.out_dim} / img_emb "
            f"{'present' if shape.has_img else 'absent'}: the Dancer DiT is a Wan I2V DiT (36 / 16 channels, CLIP)"
        )
    return "dancer"
