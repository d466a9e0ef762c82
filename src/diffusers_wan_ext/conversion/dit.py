"""Wan DiT checkpoints: original (Wan-AI / DiffSynth) key layout <-> Diffusers ``WanTransformer3DModel`` layout.

The key map is a table of module-path pairs (:data:`TOP_LEVEL_KEY_MAP`, :data:`BLOCK_KEY_MAP`): a key is renamed
by its longest matching table prefix, the parameter suffix (``.weight`` / ``.bias``) is kept, and no tensor is
reshaped, so ``export_dit_state_dict(convert_dit_state_dict(sd)) == sd`` exactly.

Configs are read from the weights (shapes decide widths, in/out channels, layers, CLIP width, FLF2V position
embedding) plus the release ``config.json`` for what shapes cannot tell (``num_heads``, ``eps``, ``text_len``).
Anything that does not fit is a :class:`~diffusers_wan_ext.utils.ConversionError` naming the keys.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..utils.io import ConversionError, _format_keys, load_state_dict, raise_for_key_problems, strip_known_prefixes

__all__ = [
    "TOP_LEVEL_KEY_MAP",
    "BLOCK_KEY_MAP",
    "DitInfo",
    "convert_dit_state_dict",
    "export_dit_state_dict",
    "rename_dit_key",
    "dit_config_from_state_dict",
    "load_dit_from_original",
    "find_dit_files",
]

# (original module path, diffusers module path); matched on whole path components.
TOP_LEVEL_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    # Wan-Fun additions (WanFunTransformer3DModel keeps the release names)
    ("ref_conv", "ref_conv"),
    ("control_adapter", "control_adapter"),
    # VACE (stock WanVACETransformer3DModel)
    ("vace_patch_embedding", "vace_patch_embedding"),
    # Wan2.2-S2V (WanS2VTransformer3DModel; names of the Diffusers S2V port)
    ("cond_encoder", "condition_embedder.pose_embedder"),
    ("casual_audio_encoder", "condition_embedder.causal_audio_encoder"),
    ("trainable_cond_mask", "trainable_condition_mask"),
    ("frame_packer", "frame_packer"),
    ("audio_injector.injector_adain_layers", "audio_injector.injector_adain_layers"),
)

# Inside ``blocks.N.``.  The original ``norm3`` (affine, before cross-attention) is Diffusers' ``norm2``; the
# original ``norm1`` / ``norm2`` and Diffusers' ``norm1`` / ``norm3`` have no parameters.
BLOCK_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("modulation", "scale_shift_table"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("norm3", "norm2"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
)

# Inside ``vace_blocks.N.``: a full DiT block plus the hint projections (stock ``WanVACETransformerBlock``).
VACE_BLOCK_KEY_MAP: tuple[tuple[str, str], ...] = BLOCK_KEY_MAP + (
    ("before_proj", "proj_in"),
    ("after_proj", "proj_out"),
)
# Inside ``audio_injector.injector.N.`` (Wan2.2-S2V audio cross-attention; stock ``WanAttention`` names).
AUDIO_INJECTOR_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("o", "to_out.0"),
    ("norm_q", "norm_q"),
    ("norm_k", "norm_k"),
)
BLOCK_TABLES = {
    "blocks": BLOCK_KEY_MAP,
    "vace_blocks": VACE_BLOCK_KEY_MAP,
    "audio_injector.injector": AUDIO_INJECTOR_KEY_MAP,
}

# Key families of Wan checkpoints that other converters handle (key fragment -> what it is / where it lands).
KNOWN_EXTENSION_KEYS: tuple[tuple[str, str], ...] = (
    ("_mot_ref", "Video-As-Prompt reference stream"),
)

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_ANY_BLOCK_RE = re.compile(rf"^({'|'.join(re.escape(k) for k in BLOCK_TABLES)})\.(\d+)\.(.+)$")
REQUIRED_KEYS = (
    "patch_embedding.weight",
    "text_embedding.0.weight",
    "time_embedding.0.weight",
    "time_projection.1.weight",
    "head.head.weight",
    "head.modulation",
    "blocks.0.self_attn.q.weight",
)
RELEASE_HEAD_DIM = 128


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str | None:
    best = None
    for src, dst in table:
        if (key == src or key.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst)
    if best is None:
        return None
    return best[1] + key[len(best[0]):]


def _flip(table: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((b, a) for a, b in table)


_TABLES = {
    False: (TOP_LEVEL_KEY_MAP, BLOCK_TABLES),
    True: (_flip(TOP_LEVEL_KEY_MAP), {name: _flip(table) for name, table in BLOCK_TABLES.items()}),
}


def rename_dit_key(key: str, reverse: bool = False) -> str | None:
    """One DiT key or module path, original -> Diffusers (``reverse``: Diffusers -> original); ``None`` if unknown.

    Example:
        >>> rename_dit_key("blocks.3.self_attn.q.weight")
        'blocks.3.attn1.to_q.weight'
        >>> rename_dit_key("vace_blocks.0.proj_out", reverse=True)
        'vace_blocks.0.after_proj'
    """
    top, blocks = _TABLES[reverse]
    m = _ANY_BLOCK_RE.match(key)
    if m:
        local = _rename(m.group(3), blocks[m.group(1)])
        return None if local is None else f"{m.group(1)}.{m.group(2)}.{local}"
    return _rename(key, top)


def _convert(sd: Mapping[str, torch.Tensor], reverse: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        new = rename_dit_key(key, reverse)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ConversionError(_unknown_keys_message(unknown, "Diffusers" if reverse else "original Wan"))
    return out


def _unknown_keys_message(keys: list[str], layout: str) -> str:
    families = sorted({what for k in keys for frag, what in KNOWN_EXTENSION_KEYS if frag in k})
    msg = f"{len(keys)} key(s) do not belong to a Wan DiT in the {layout} layout: {_format_keys(keys)}"
    if families:
        msg += f". They look like: {'; '.join(families)} - not handled by the base Wan DiT converter."
    return msg


def convert_dit_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-layout Wan DiT state dict to Diffusers' ``WanTransformer3DModel`` names.

    Wrapper prefixes (``model.`` as in krea's file, ``model.diffusion_model.`` / ``diffusion_model.`` as in ComfyUI
    files) are stripped first.  Unknown keys raise :class:`ConversionError` naming them.

    Example:
        >>> from safetensors.torch import load_file  # doctest: +SKIP
        >>> diffusers_sd = convert_dit_state_dict(load_file("diffusion_pytorch_model.safetensors"))  # doctest: +SKIP
    """
    sd = strip_known_prefixes(dict(sd), "blocks.")
    base, adapter = _split_animate(sd)
    out = _convert(base, reverse=False)
    if adapter:  # Wan2.2-Animate: adapter keys live in the DiT file
        from .animate import convert_animate_state_dict

        out.update(convert_animate_state_dict(adapter))
    return out


def export_dit_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`convert_dit_state_dict`: Diffusers names back to the original Wan release layout.

    This is the layout ComfyUI and the original Wan code load (add ``model.diffusion_model.`` for ComfyUI
    single-file checkpoints if wanted).
    """
    base, adapter = _split_animate(dict(sd))
    out = _convert(base, reverse=True)
    if adapter:
        from .animate import export_animate_state_dict

        out.update(export_animate_state_dict(adapter))
    return out


def _split_animate(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(DiT keys, Wan2.2-Animate adapter keys) of a state dict in either layout."""
    from .animate import is_animate_key

    adapter = {k: v for k, v in sd.items() if is_animate_key(k)}
    return ({k: v for k, v in sd.items() if k not in adapter}, adapter) if adapter else (sd, {})


@dataclass
class DitInfo:
    """What the weights say about a DiT: its architecture and the Diffusers config to build it."""

    arch: str  # one of ARCHITECTURES
    config: dict[str, Any]  # config of :attr:`model_class`
    text_len: int
    model_type: str | None = None  # as stated by the release config.json, if any

    @property
    def needs_text_len_processor(self) -> bool:
        # stock WanAttnProcessor splits image tokens at a hard-coded 512 text tokens
        return self.config.get("added_kv_proj_dim") is not None and self.text_len != 512

    @property
    def model_class(self) -> str:
        """The Diffusers class that holds these weights: stock wherever stock can represent them."""
        if "vace_layers" in self.config:
            return "WanVACETransformer3DModel"
        if "motion_encoder_dim" in self.config:  # Wan2.2-Animate
            return "WanAnimateExtTransformer3DModel" if self.needs_text_len_processor else "WanAnimateTransformer3DModel"
        if "audio_inject_layers" in self.config:
            return "WanS2VTransformer3DModel"
        if self.config.get("ref_conv_in_channels") or self.config.get("control_adapter_in_channels"):
            return "WanFunTransformer3DModel"
        return "WanExtTransformer3DModel" if self.needs_text_len_processor else "WanTransformer3DModel"


# What the DiT weights say about the release family (see :data:`diffusers_wan_ext.conversion.variants.VARIANTS`).
ARCHITECTURES = (
    "t2v", "i2v", "i2v-noclip", "flf2v", "ti2v", "fun-control", "fun-control-ref", "fun-camera", "vace", "animate",
    "s2v",
)
# in_dim - out_dim -> architecture, for DiTs without extension modules (``ref_conv``, ``control_adapter``, VACE).
# 20 = 4 mask + 16 image latents; 32 = 16 control + 16 image latents (Wan2.1 Fun-Control);
# 36 = 16 control + 20 (Wan2.2 Fun-Control); 16 = image latents without mask (Wan2.1 Fun-Camera).
EXTRA_CHANNELS_ARCH: dict[tuple[int, bool], str] = {
    (20, True): "i2v",
    (20, False): "i2v-noclip",
    (32, True): "fun-control",
    (36, False): "fun-control",
}


def _block_indices(sd: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))})


def check_block_layout(sd: Mapping[str, torch.Tensor], required: tuple[str, ...] = (), what: str = "a DiT") -> list[int]:
    """The indices of the ``blocks.N.*`` of an original-layout DiT; raises :class:`ConversionError` unless every
    ``required`` key is present, the blocks are ``0 .. n-1`` and every block has block 0's keys (the error names the
    keys)."""
    missing = [k for k in required if k not in sd]
    if missing:
        raise ConversionError(
            f"not {what} in the original layout: missing key(s) {_format_keys(missing)}"
            + (f" (found e.g. {_format_keys(list(sd)[:5], 5)})" if sd else " (the state dict is empty)")
        )
    blocks = _block_indices(sd)
    if blocks != list(range(len(blocks))):
        gaps = sorted(set(range(max(blocks) + 1)) - set(blocks))
        raise ConversionError(f"DiT blocks are not contiguous: blocks.{gaps[0]}.* missing (have {len(blocks)} blocks)")
    local0 = {k.split(".", 2)[2] for k in sd if k.startswith("blocks.0.")}
    for i in blocks[1:]:
        local = {k.split(".", 2)[2] for k in sd if k.startswith(f"blocks.{i}.")}
        if local != local0:
            diff = sorted((local0 - local) | (local - local0))
            raise ConversionError(
                f"blocks.{i} differs from blocks.0: inconsistent key(s) {_format_keys(f'blocks.{i}.{d}' for d in diff)}"
            )
    return blocks


def dit_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], original_config: Mapping[str, Any] | None = None
) -> DitInfo:
    """Read the architecture and Diffusers config from an ORIGINAL-layout DiT state dict.

    ``original_config`` is the release ``config.json`` (``dim``, ``num_heads``, ``in_dim``, ``text_len`` ...); its
    values must agree with the shapes.  ``num_heads`` defaults to ``dim // 128`` (every Wan release uses head dim
    128) when the config does not give it (Wan2.2-Animate weights state the head dim in their face blocks).
    """
    cfg = dict(original_config or {})
    sd = strip_known_prefixes(dict(sd), "blocks.")
    num_layers = len(check_block_layout(sd, REQUIRED_KEYS, "a Wan DiT"))

    pe = sd["patch_embedding.weight"]
    if pe.ndim != 5:
        raise ConversionError(f"patch_embedding.weight must be a Conv3d weight [dim, in, pt, ph, pw], got {tuple(pe.shape)}")
    dim, in_dim = pe.shape[0], pe.shape[1]
    patch_size = tuple(int(s) for s in pe.shape[2:])
    head_out = sd["head.head.weight"].shape[0]
    if head_out % math.prod(patch_size):
        raise ConversionError(f"head.head.weight has {head_out} outputs, not a multiple of the patch volume {patch_size}")
    out_dim = head_out // math.prod(patch_size)
    text_dim = sd["text_embedding.0.weight"].shape[1]
    freq_dim = sd["time_embedding.0.weight"].shape[1]
    ffn_dim = sd["blocks.0.ffn.0.weight"].shape[0] if "blocks.0.ffn.0.weight" in sd else None
    if ffn_dim is None:
        raise ConversionError("missing key blocks.0.ffn.0.weight")

    has_img = "img_emb.proj.0.weight" in sd
    has_img_kv = "blocks.0.cross_attn.k_img.weight" in sd
    if has_img != has_img_kv:
        present, absent = ("img_emb.proj.*", "blocks.N.cross_attn.k_img/v_img") if has_img else (
            "blocks.N.cross_attn.k_img/v_img", "img_emb.proj.*")
        raise ConversionError(f"inconsistent image branch: {present} present but {absent} missing")
    clip_dim = sd["img_emb.proj.0.weight"].shape[0] if has_img else None
    pos_len = sd["img_emb.emb_pos"].shape[1] if "img_emb.emb_pos" in sd else None

    for k, v in (("dim", dim), ("in_dim", in_dim), ("out_dim", out_dim), ("ffn_dim", ffn_dim), ("freq_dim", freq_dim),
                 ("num_layers", num_layers), ("text_dim", text_dim)):
        if k in cfg and int(cfg[k]) != int(v):
            raise ConversionError(
                f"config.json says {k}={cfg[k]} but the weights have {k}={v} "
                f"(from {'patch_embedding.weight' if k in ('dim', 'in_dim') else 'the weight shapes'})"
            )
    face_norm = sd.get("face_adapter.fuser_blocks.0.q_norm.weight")  # Animate face blocks: per-head RMSNorm
    default_heads = dim // face_norm.shape[0] if face_norm is not None and face_norm.shape[0] else dim // RELEASE_HEAD_DIM
    num_heads = int(cfg.get("num_heads") or max(1, default_heads))
    if dim % num_heads:
        raise ConversionError(f"dim {dim} is not divisible by num_heads {num_heads}")
    text_len = int(cfg.get("text_len", 512))
    eps = float(cfg.get("eps", 1e-6))

    ext = _extension_config(sd, cfg, dim, patch_size, num_layers)
    extra = int(in_dim) - int(out_dim)
    if _split_animate(sd)[1]:  # Wan2.2-Animate adapter keys (pose / motion / face modules)
        from .animate import animate_config_from_state_dict

        ext.update(animate_config_from_state_dict(sd, cfg, dim=int(dim), in_dim=int(in_dim), num_layers=num_layers,
                                                  num_heads=num_heads))
        if not has_img:
            raise ConversionError("Wan2.2-Animate adapter (pose_patch_embedding, motion_encoder, face_*) on a DiT "
                                  "without the CLIP image branch (img_emb.*): the Animate DiT is an I2V DiT with CLIP")
        arch = "animate"
    elif "vace_layers" in ext:
        if has_img or extra:
            raise ConversionError(
                f"VACE weights (vace_blocks.*) on a DiT with in_dim {in_dim} / img_emb {'present' if has_img else 'absent'}: "
                "only text-to-video VACE DiTs (in_dim == out_dim, no CLIP branch) exist"
            )
        arch = "vace"
    elif "audio_inject_layers" in ext:
        if has_img or extra:
            raise ConversionError(
                f"Wan2.2-S2V weights (casual_audio_encoder.*) on a DiT with in_dim {in_dim} / out_dim {out_dim} / "
                f"img_emb {'present' if has_img else 'absent'}: the S2V DiT takes 16 latent channels and no CLIP"
            )
        arch = "s2v"
    elif "control_adapter_in_channels" in ext:
        arch = "fun-camera"
    elif "ref_conv_in_channels" in ext:
        arch = "fun-control-ref"
    elif pos_len is not None:
        arch = "flf2v"
    elif extra == 0:
        arch = "ti2v" if (in_dim == 48 or cfg.get("model_type") == "ti2v") else "t2v"
    elif (extra, has_img) in EXTRA_CHANNELS_ARCH:
        arch = EXTRA_CHANNELS_ARCH[(extra, has_img)]
    else:
        raise ConversionError(
            f"unknown DiT layout: in_dim {in_dim} (patch_embedding.weight) with out_dim {out_dim} (head.head.weight) "
            f"and {'a' if has_img else 'no'} CLIP branch (img_emb.*) matches no Wan release (t2v 16/16, i2v / Fun-InP "
            "36/16, Fun-Control 48/16 with CLIP or 52/16 without, Fun-Camera 32 or 36 + control_adapter.*, "
            "ti2v 48/48, VACE 16/16 + vace_blocks.*)"
        )
    if arch == "t2v" and in_dim != 16 and cfg.get("model_type") not in (None, "t2v"):
        raise ConversionError(f"config model_type {cfg.get('model_type')!r} does not match t2v weights")

    config = dict(
        patch_size=list(patch_size),
        num_attention_heads=num_heads,
        attention_head_dim=dim // num_heads,
        in_channels=int(in_dim),
        out_channels=int(out_dim),
        text_dim=int(text_dim),
        freq_dim=int(freq_dim),
        ffn_dim=int(ffn_dim),
        num_layers=num_layers,
        cross_attn_norm="blocks.0.norm3.weight" in sd,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in sd else None,
        eps=eps,
        image_dim=int(clip_dim) if has_img else None,
        added_kv_proj_dim=int(dim) if has_img else None,
        rope_max_seq_len=1024,
        pos_embed_seq_len=int(pos_len) if pos_len is not None else None,
    )
    if arch == "s2v":  # no CLIP branch: WanS2VTransformer3DModel has no image arguments
        for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            config.pop(key)
    config.update(ext)
    return DitInfo(arch=arch, config=config, text_len=text_len, model_type=cfg.get("model_type"))


def _indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _extension_config(
    sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], dim: int, patch_size: tuple[int, ...], num_layers: int
) -> dict[str, Any]:
    """Config entries of the Fun (``ref_conv``, camera ``control_adapter``) and VACE modules found in ``sd``."""
    ext: dict[str, Any] = {}
    if "ref_conv.weight" in sd:
        w = sd["ref_conv.weight"]
        if w.ndim != 4 or w.shape[0] != dim or tuple(w.shape[2:]) != tuple(patch_size[1:]):
            raise ConversionError(
                f"ref_conv.weight {tuple(w.shape)}: expected [{dim}, C, {patch_size[1]}, {patch_size[2]}] "
                "(a Conv2d with the DiT's spatial patch)"
            )
        ext["ref_conv_in_channels"] = int(w.shape[1])
    if "control_adapter.conv.weight" in sd:
        w = sd["control_adapter.conv.weight"]
        in_ch = int(cfg.get("in_dim_control_adapter", 24))
        packed = int(w.shape[1]) if w.ndim == 4 else -1
        factor = int(round(math.sqrt(packed / in_ch))) if packed > 0 else 0
        if w.ndim != 4 or w.shape[0] != dim or factor * factor * in_ch != packed:
            raise ConversionError(
                f"control_adapter.conv.weight {tuple(w.shape)}: expected [{dim}, {in_ch} * f * f, kh, kw] "
                f"(camera adapter on a {in_ch}-channel Plücker map, pixel-unshuffle factor f)"
            )
        blocks = _indices(sd, "control_adapter.residual_blocks")
        if blocks != [0]:
            raise ConversionError(
                f"control_adapter has residual blocks {blocks}; every Fun Control-Camera release has exactly one "
                "(control_adapter.residual_blocks.0.*)"
            )
        ext["control_adapter_in_channels"] = in_ch
        ext["control_adapter_downscale_factor"] = int(cfg.get("downscale_factor_control_adapter", factor))
    if "vace_patch_embedding.weight" in sd:
        w = sd["vace_patch_embedding.weight"]
        n = _indices(sd, "vace_blocks")
        if not n or n != list(range(len(n))):
            raise ConversionError(f"VACE blocks are not contiguous (found vace_blocks indices {n})")
        if "vace_blocks.0.before_proj.weight" not in sd:
            raise ConversionError("missing key vace_blocks.0.before_proj.weight (the first VACE block's input projection)")
        missing = [f"vace_blocks.{i}.after_proj.weight" for i in n if f"vace_blocks.{i}.after_proj.weight" not in sd]
        if missing:
            raise ConversionError(f"missing VACE hint projection(s): {_format_keys(missing)}")
        if "vace_layers" in cfg:
            layers = [int(i) for i in cfg["vace_layers"]]
        else:  # releases: every 2nd (1.3B, 15 of 30) or every 5th block (14B, 8 of 40), starting at 0
            step = math.ceil(num_layers / len(n))
            layers = list(range(0, num_layers, step))
        if len(layers) != len(n) or layers[0] != 0 or max(layers) >= num_layers:
            raise ConversionError(
                f"{len(n)} VACE blocks (vace_blocks.*) but vace_layers {layers} for {num_layers} DiT blocks: give "
                "vace_layers in config.json (the DiT block indices after which each VACE hint is added, starting at 0)"
            )
        ext["vace_layers"] = layers
        ext["vace_in_channels"] = int(w.shape[1])
    if any(k.startswith(S2V_KEY_PREFIXES) for k in sd):
        ext.update(_s2v_config(sd, cfg, dim, num_layers))
    return ext


# Key families of the Wan2.2-S2V DiT.
S2V_KEY_PREFIXES = ("casual_audio_encoder.", "audio_injector.", "frame_packer.", "cond_encoder.", "trainable_cond_mask.")
# S2V options of the release config.json and the values of the release (used when config.json lacks them).
S2V_RELEASE_OPTIONS = dict(
    motion_frames=73, zero_timestep=True, add_last_motion=True, framepack_drop_mode="padd",
)


def _s2v_config(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], dim: int, num_layers: int) -> dict[str, Any]:
    """Config entries of a Wan2.2-S2V DiT (``WanModel_S2V``), from the shapes and the release ``config.json``."""
    from ..models.transformer_wan_s2v import RELEASE_AUDIO_INJECT_LAYERS, audio_injector_layout

    required = ("casual_audio_encoder.weights", "casual_audio_encoder.encoder.conv1_local.conv.weight",
                "frame_packer.proj.weight", "trainable_cond_mask.weight", "audio_injector.injector.0.q.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ConversionError(
            f"incomplete Wan2.2-S2V DiT: missing key(s) {_format_keys(missing)} (only the released S2V layout with "
            "FramePack motion frames is supported)"
        )
    unsupported = [f"{k}={cfg[k]!r}" for k, ok in (("enable_motioner", False), ("enable_framepack", True),
                                                   ("adain_mode", "attn_norm"), ("enable_tsm", False))
                   if k in cfg and cfg[k] != ok]
    if unsupported:
        raise ConversionError(
            f"config.json has {', '.join(unsupported)}: only the released S2V configuration (FramePack motion frames, "
            "AdaLN 'attn_norm' audio injection, no motioner transformer) is supported"
        )
    layers_w = sd["casual_audio_encoder.weights"]
    conv1 = sd["casual_audio_encoder.encoder.conv1_local.conv.weight"]
    quarter = dim // 4
    if layers_w.ndim != 4 or conv1.ndim != 3 or conv1.shape[0] % quarter:
        raise ConversionError(
            f"casual_audio_encoder: weights {tuple(layers_w.shape)} / encoder.conv1_local.conv.weight "
            f"{tuple(conv1.shape)} do not fit a {dim}-wide S2V DiT (expected [1, layers, 1, 1] and "
            f"[{quarter} * tokens, audio_dim, 3])"
        )
    enable_adain = "casual_audio_encoder.encoder.conv1_global.conv.weight" in sd
    has_adain_layers = "audio_injector.injector_adain_layers.0.linear.weight" in sd
    if has_adain_layers != enable_adain or ("enable_adain" in cfg and bool(cfg["enable_adain"]) != enable_adain):
        raise ConversionError(
            f"inconsistent AdaLN audio injection: casual_audio_encoder.encoder.conv1_global "
            f"{'present' if enable_adain else 'absent'}, audio_injector.injector_adain_layers "
            f"{'present' if has_adain_layers else 'absent'}, config enable_adain={cfg.get('enable_adain', '(unset)')}"
        )
    injectors = _indices(sd, "audio_injector.injector")
    if injectors != list(range(len(injectors))):
        raise ConversionError(f"audio injectors are not contiguous (found audio_injector.injector indices {injectors})")
    if "audio_inject_layers" in cfg:
        layers = [int(i) for i in cfg["audio_inject_layers"]]
    else:
        layers = list(RELEASE_AUDIO_INJECT_LAYERS)
    count, _ = audio_injector_layout(num_layers, layers)
    if count != len(injectors):
        raise ConversionError(
            f"{len(injectors)} audio injectors (audio_injector.injector.*) but audio_inject_layers {layers} with "
            f"{num_layers} DiT blocks give {count}: give audio_inject_layers in config.json (the release lists "
            f"{list(RELEASE_AUDIO_INJECT_LAYERS)} for 40 blocks)"
        )
    options = {k: cfg.get(k, v) for k, v in S2V_RELEASE_OPTIONS.items()}
    return dict(
        audio_dim=int(conv1.shape[1]),
        audio_num_layers=int(layers_w.shape[1]),
        num_audio_tokens=int(conv1.shape[0]) // quarter,
        audio_inject_layers=layers,
        enable_adain=enable_adain,
        pose_dim=int(sd["cond_encoder.weight"].shape[1]) if "cond_encoder.weight" in sd else 0,
        motion_frames=int(options["motion_frames"]),
        zero_timestep=bool(options["zero_timestep"]),
        add_last_motion=bool(options["add_last_motion"]),
        framepack_drop_mode=str(options["framepack_drop_mode"]),
    )


def check_shapes(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Compare a converted state dict with a model's parameters; raise naming missing/unexpected/mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    raise_for_key_problems(type(model).__name__, missing, unexpected, wrong)


def cast_state_dict(
    sd: dict[str, torch.Tensor], torch_dtype: torch.dtype | None, keep_in_fp32: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``torch_dtype``; modules named in ``keep_in_fp32`` stay float32 for fp16/bf16."""
    if torch_dtype is None:
        return sd
    keep = set(keep_in_fp32 or ()) if torch_dtype in (torch.float16, torch.bfloat16) else set()
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = v
        elif keep and keep.intersection(k.split(".")):
            out[k] = v.to(torch.float32)
        else:
            out[k] = v.to(torch_dtype)
    return out


def build_transformer(info: DitInfo):
    """Instantiate the Diffusers transformer class for ``info`` (stock where stock covers it), parameters on meta."""
    from accelerate import init_empty_weights

    import diffusers

    import diffusers_wan_ext

    cls = getattr(diffusers_wan_ext, info.model_class, None) or getattr(diffusers, info.model_class)
    kwargs = dict(info.config)
    if "text_len" in inspect.signature(cls.__init__).parameters:
        kwargs["text_len"] = info.text_len
    with init_empty_weights():  # parameters on meta, buffers (RoPE tables) real
        model = cls(**kwargs)
    return model


def load_dit_from_original(
    sd_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
    original_config: Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """Build a Diffusers Wan transformer from original-layout weights (a state dict, a file or a release folder).

    The class is stock ``WanTransformer3DModel`` whenever stock covers the weights; a DiT with a CLIP branch and a
    ``text_len`` other than 512 (tiny test models) uses :class:`WanExtTransformer3DModel`, whose image/text split
    follows ``text_len``.  ``torch_dtype`` casts floating weights (``None`` keeps the file's dtype); modules in
    ``_keep_in_fp32_modules`` stay float32 as Diffusers does.

    Example:
        >>> transformer = load_dit_from_original("Wan2.1-T2V-1.3B", torch_dtype=torch.bfloat16)  # doctest: +SKIP
    """
    sd, original_config = read_original_dit(sd_or_path, original_config)
    info = dit_config_from_state_dict(sd, original_config)
    converted = convert_dit_state_dict(sd)
    return load_converted_state_dict(build_transformer(info), converted, torch_dtype)


def load_converted_state_dict(model: torch.nn.Module, converted: dict[str, torch.Tensor], torch_dtype: torch.dtype | None):
    """Check shapes (errors name the keys), cast (``_keep_in_fp32_modules`` stay float32) and assign a converted
    state dict to a model built on the meta device; returns the model in eval mode."""
    check_shapes(model, converted)
    converted = cast_state_dict(converted, torch_dtype, getattr(model, "_keep_in_fp32_modules", None))
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


DIT_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors")


def find_dit_files(folder: str | os.PathLike) -> Path | None:
    """The DiT weights of an original release folder: the shard index, the single file, or ``None``."""
    folder = Path(folder)
    for name in DIT_WEIGHT_NAMES:
        if (folder / name).exists():
            return folder / name
    shards = sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    if shards:
        raise ConversionError(
            f"{folder}: found {len(shards)} DiT shard(s) but no diffusion_pytorch_model.safetensors.index.json"
        )
    return None


def locate_dit(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The DiT weights (file or shard index) of a folder or file, and the release ``config.json`` beside them."""
    path = Path(path)
    if path.is_dir():
        weights = find_dit_files(path)
        if weights is None:
            raise ConversionError(f"{path}: no DiT weights (diffusion_pytorch_model*.safetensors) in this folder")
    else:
        weights = path
    cfg_path = weights.parent / "config.json"
    cfg: dict[str, Any] = {}
    if cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_path}: invalid JSON ({e})") from e
    return weights, cfg


def read_original_dit(
    sd_or_path: Mapping[str, torch.Tensor] | str | os.PathLike, original_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], Mapping[str, Any] | None]:
    """An original-layout DiT state dict (wrapper prefixes stripped) and its config: ``original_config`` if given,
    else the ``config.json`` beside the weights when ``sd_or_path`` is a folder / file."""
    if isinstance(sd_or_path, (str, os.PathLike)):
        sd, cfg = read_dit_folder_or_file(sd_or_path)
        original_config = original_config or cfg
    else:
        sd = dict(sd_or_path)
    return strip_known_prefixes(sd, "blocks."), original_config


def read_dit_folder_or_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load DiT weights and the release ``config.json`` (if any) from a folder, a file or a shard index."""
    weights, cfg = locate_dit(path)
    return load_state_dict(weights), cfg
