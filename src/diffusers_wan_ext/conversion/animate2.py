"""Wan2.2-Animate-2-14B DiT: release layout (``wan_animate_2/wan_animate_2_bf16.safetensors``) <-> Diffusers'
``WanAnimate2Transformer3DModel``.

The release file is DiffSynth-Studio's ``WanAnimate2Transformer`` state dict: every block wraps a Wan block as
``blocks.N.block.*`` (``self_attn.{q,k,v,o,norm_q,norm_k}``, ``cross_attn.{...,k_img,v_img,norm_k_img}``, ``norm3``,
``ffn.{0,2}``, ``modulation``); the top level is the Wan I2V one (``patch_embedding``, ``text_embedding``,
``time_embedding``, ``time_projection``, ``head``, ``img_emb.proj``).  Stock Diffusers keeps the top-level names and
renames the block modules (:data:`BLOCK_KEY_MAP`); no tensor is reshaped, so the map is exactly reversible.

Widths come from the shapes (``dim``, ``in_dim``, ``out_dim``, ``ffn_dim``, ``freq_dim``, ``text_dim``, patch size,
layers, CLIP width); ``num_heads`` / ``text_len`` / ``eps`` / the ``refer_*`` RoPE offsets from the release
``config.json`` when one is given (defaults: head dim 128, 512, 1e-6, the release offsets).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
from accelerate import init_empty_weights

from ..models.transformer_wan_animate2 import RELEASE_CLIP_DIM, WanAnimate2ExtTransformer3DModel
from ..utils.io import ConversionError, format_keys, raise_for_key_problems, strip_known_prefixes

__all__ = [
    "ANIMATE2_BLOCK_PREFIX",
    "ANIMATE2_RELEASE_FILE",
    "BLOCK_KEY_MAP",
    "animate2_config_from_state_dict",
    "convert_animate2_lora_state_dict",
    "convert_animate2_state_dict",
    "export_animate2_state_dict",
    "is_animate2_lora_state_dict",
    "is_animate2_state_dict",
    "load_animate2_transformer_from_original",
]

#: The DiT file of the Wan-AI/Wan2.2-Animate-2-14B release, relative to the release folder.
ANIMATE2_RELEASE_FILE = "wan_animate_2/wan_animate_2_bf16.safetensors"
#: What marks the release layout: every block wraps a Wan block.
ANIMATE2_BLOCK_PREFIX = "blocks.0.block."
#: Block module pairs ``(release, Diffusers)``, after ``blocks.N.block.`` / ``blocks.N.``.
BLOCK_KEY_MAP = (
    ("self_attn.q", "self_attn.to_q"), ("self_attn.k", "self_attn.to_k"), ("self_attn.v", "self_attn.to_v"),
    ("self_attn.o", "self_attn.to_out.0"), ("self_attn.norm_q", "self_attn.norm_q"),
    ("self_attn.norm_k", "self_attn.norm_k"),
    ("cross_attn.q", "cross_attn.to_q"), ("cross_attn.k", "cross_attn.to_k"), ("cross_attn.v", "cross_attn.to_v"),
    ("cross_attn.o", "cross_attn.to_out.0"), ("cross_attn.norm_q", "cross_attn.norm_q"),
    ("cross_attn.norm_k", "cross_attn.norm_k"), ("cross_attn.k_img", "cross_attn.add_k_proj"),
    ("cross_attn.v_img", "cross_attn.add_v_proj"), ("cross_attn.norm_k_img", "cross_attn.norm_added_k"),
    ("norm3", "norm3"), ("ffn.0", "ffn.0"), ("ffn.2", "ffn.2"), ("modulation", "modulation"),
)
#: Top-level modules (same names in both layouts).
TOP_LEVEL_MODULES = (
    "patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
    "time_projection.1", "head.head", "head.modulation", "img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3",
    "img_emb.proj.4",
)
REQUIRED_KEYS = (
    "patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "time_projection.1.weight",
    "head.head.weight", "head.modulation", "blocks.0.block.self_attn.q.weight", "blocks.0.block.ffn.0.weight",
)
_RELEASE_BLOCK = re.compile(r"^blocks\.(\d+)\.block\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def is_animate2_state_dict(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict (or its key names) is in the Animate-2 release layout (``blocks.N.block.*``)."""
    return any(k.startswith(ANIMATE2_BLOCK_PREFIX) for k in strip_known_prefixes(dict.fromkeys(sd), "blocks."))


def _rename(local: str, table) -> str | None:
    best = None
    for src, dst in table:
        if (local == src or local.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst)
    return None if best is None else best[1] + local[len(best[0]):]


def _top_level(key: str) -> bool:
    return any(key == m or key.startswith(m + ".") for m in TOP_LEVEL_MODULES)


def _convert(sd: Mapping[str, torch.Tensor], reverse: bool) -> dict[str, torch.Tensor]:
    table = tuple((b, a) for a, b in BLOCK_KEY_MAP) if reverse else BLOCK_KEY_MAP
    pattern = _DIFFUSERS_BLOCK if reverse else _RELEASE_BLOCK
    out, unknown = {}, []
    for key, value in sd.items():
        m = pattern.match(key)
        local = _rename(m.group(2), table) if m else None
        if m and local is not None:
            out[f"blocks.{m.group(1)}.{'block.' if reverse else ''}{local}"] = value
        elif not m and _top_level(key):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        layout = "Diffusers WanAnimate2Transformer3DModel" if reverse else "Wan2.2-Animate-2 release"
        raise ConversionError(f"{len(unknown)} key(s) do not belong to the {layout} layout: {format_keys(unknown)}")
    return out


def convert_animate2_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a release-layout Animate-2 DiT state dict (``blocks.N.block.*``) to stock Diffusers names; unknown keys
    raise :class:`ConversionError` naming them."""
    return _convert(strip_known_prefixes(dict(sd), "blocks."), reverse=False)


def export_animate2_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`convert_animate2_state_dict`: Diffusers names back to the release layout."""
    return _convert(dict(sd), reverse=True)


_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<role>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
_LORA_PREFIXES = ("pipe.dit.", "dit.", "diffusion_model.", "model.")


def is_animate2_lora_state_dict(sd: Mapping[str, Any]) -> bool:
    """Whether a LoRA state dict (or its key names) is on the release layout's module names
    (``blocks.N.block.self_attn.q.lora_A[.default].weight``: DiffSynth-Studio's Animate-2 LoRAs)."""
    return any(".lora_" in k and _RELEASE_BLOCK.match(_strip_lora_prefix(k)) for k in sd)


def _strip_lora_prefix(key: str) -> str:
    for prefix in _LORA_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def convert_animate2_lora_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A release-layout Animate-2 LoRA (DiffSynth-Studio: ``blocks.N.block.self_attn.q.lora_A.default.weight``, also
    ``lora_down`` / ``lora_up`` with ``.alpha``, prefixes ``pipe.dit.`` / ``dit.`` / ``diffusion_model.``) as a
    Diffusers LoRA of the transformer (``transformer.blocks.N.self_attn.to_q.lora_A.weight``); an ``alpha`` is folded
    into ``lora_B`` (``alpha / rank``).  Keys on no module of the layout raise :class:`ConversionError` naming them."""
    stripped = {_strip_lora_prefix(k): v for k, v in sd.items()}
    alphas = {k[: -len(".alpha")]: float(v) for k, v in stripped.items() if k.endswith(".alpha")}
    out, unknown = {}, []
    for key, value in stripped.items():
        if key.endswith(".alpha"):
            continue
        m = _LORA_KEY.match(key)
        block = _RELEASE_BLOCK.match(m.group("module")) if m else None
        local = _rename(block.group(2), BLOCK_KEY_MAP) if block else None
        module = f"blocks.{block.group(1)}.{local}" if local else (m.group("module") if m and _top_level(
            m.group("module")) else None)
        if module is None:
            unknown.append(key)
            continue
        role = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(m.group("role"), m.group("role"))
        if role == "lora_B" and m.group("module") in alphas:
            value = value * (alphas[m.group("module")] / value.shape[1])
        out[f"transformer.{module}.{role}.weight"] = value
    if unknown:
        raise ConversionError(f"{len(unknown)} LoRA key(s) are on no module of the Wan2.2-Animate-2 DiT: "
                              f"{format_keys(unknown)}")
    return out


def _block_count(sd: Mapping[str, torch.Tensor]) -> int:
    blocks = sorted({int(m.group(1)) for k in sd if (m := _RELEASE_BLOCK.match(k))})
    if blocks != list(range(len(blocks))):
        gap = sorted(set(range(max(blocks) + 1)) - set(blocks))[0]
        raise ConversionError(f"Animate-2 DiT blocks are not contiguous: blocks.{gap}.block.* missing")
    return len(blocks)


def animate2_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], original_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``WanAnimate2ExtTransformer3DModel`` config of a release-layout state dict (widths from the shapes; heads,
    ``text_len``, ``eps`` and the reference RoPE offsets from ``original_config``, which must agree with the
    shapes)."""
    cfg = dict(original_config or {})
    sd = strip_known_prefixes(dict(sd), "blocks.")
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        raise ConversionError(f"not a Wan2.2-Animate-2 DiT in the release layout: missing key(s) {format_keys(missing)}")
    pe = sd["patch_embedding.weight"]
    if pe.ndim != 5:
        raise ConversionError(f"patch_embedding.weight must be a Conv3d weight [dim, in, pt, ph, pw], got {tuple(pe.shape)}")
    dim, patch = int(pe.shape[0]), tuple(int(s) for s in pe.shape[2:])
    head_out = int(sd["head.head.weight"].shape[0])
    if head_out % math.prod(patch):
        raise ConversionError(f"head.head.weight has {head_out} outputs, not a multiple of the patch volume {patch}")
    widths = dict(
        dim=dim, in_dim=int(pe.shape[1]), out_dim=head_out // math.prod(patch), num_layers=_block_count(sd),
        ffn_dim=int(sd["blocks.0.block.ffn.0.weight"].shape[0]), freq_dim=int(sd["time_embedding.0.weight"].shape[1]),
        text_dim=int(sd["text_embedding.0.weight"].shape[1]),
    )
    for k, v in widths.items():
        if k in cfg and int(cfg[k]) != v:
            raise ConversionError(f"config.json says {k}={cfg[k]} but the weights have {k}={v}")
    num_heads = int(cfg.get("num_heads") or max(1, dim // 128))
    if dim % num_heads or (dim // num_heads) % 2:
        raise ConversionError(f"dim {dim} does not split into an even head size across num_heads {num_heads}")
    use_img_emb = "img_emb.proj.0.weight" in sd
    if use_img_emb != ("blocks.0.block.cross_attn.k_img.weight" in sd):
        raise ConversionError("inconsistent image branch: img_emb.proj.* and blocks.N.block.cross_attn.k_img must "
                              "be both present or both absent")
    config = dict(
        patch_size=list(patch), text_len=int(cfg.get("text_len", 512)), **widths, num_heads=num_heads,
        cross_attn_norm="blocks.0.block.norm3.weight" in sd, eps=float(cfg.get("eps", 1e-6)), use_img_emb=use_img_emb,
        clip_dim=int(sd["img_emb.proj.0.weight"].shape[0]) if use_img_emb else RELEASE_CLIP_DIM,
    )
    for k, default in (("refer_offset_t", 1), ("refer_offset_h", 0), ("refer_offset_w", -1), ("refer_stride", 1)):
        config[k] = int(cfg.get(k, default))
    return config


def load_animate2_transformer_from_original(
    sd: Mapping[str, torch.Tensor],
    original_config: Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
) -> WanAnimate2ExtTransformer3DModel:
    """A :class:`~diffusers_wan_ext.models.WanAnimate2ExtTransformer3DModel` holding release-layout weights (shapes
    checked, errors naming the keys); ``torch_dtype`` casts floating weights (``_keep_in_fp32_modules`` stay
    float32 for fp16 / bf16)."""
    config = animate2_config_from_state_dict(sd, original_config)
    converted = convert_animate2_state_dict(sd)
    with init_empty_weights():
        model = WanAnimate2ExtTransformer3DModel(**config)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(converted[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in converted and tuple(converted[k].shape) != tuple(v.shape)]
    raise_for_key_problems(type(model).__name__, sorted(set(expected) - set(converted)),
                           sorted(set(converted) - set(expected)), wrong)
    keep = set(model._keep_in_fp32_modules) if torch_dtype in (torch.float16, torch.bfloat16) else set()
    if torch_dtype is not None:
        converted = {k: (v.to(torch.float32) if keep.intersection(k.split(".")) else v.to(torch_dtype))
                     if v.is_floating_point() else v for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()
