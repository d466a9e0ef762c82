"""LongCat-Video DiT: original release layout (``dit/`` of meituan-longcat/LongCat-Video, also what DiffSynth-Studio
loads) <-> :class:`~diffusers_wan_ext.LongCatVideoTransformer3DModel`.

The key map is data: :data:`TOP_LEVEL_KEY_MAP` and :data:`BLOCK_KEY_MAP` rename module paths (longest matching
prefix, ``.weight`` / ``.bias`` kept), :data:`BLOCK_SPLITS` names the fused original projections that become
Diffusers' separate ``to_q`` / ``to_k`` / ``to_v`` (equal chunks along the output dimension, in the original's
``view(..., 3, heads, head_dim)`` order).  :func:`export_longcat_state_dict` is the exact inverse.

The config comes from the weights (widths, depth, head dim from the per-head ``q_norm``) and the release
``config.json`` (original field names ``hidden_size``, ``depth``, ``num_heads``, ``caption_channels``,
``adaln_tembed_dim``, ``frequency_embedding_size``, ``mlp_ratio``, ``text_tokens_zero_pad``), which must agree.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import torch
from accelerate import init_empty_weights

from ..models.transformer_longcat import LongCatVideoTransformer3DModel, longcat_ffn_dim
from ..utils.io import ConversionError, format_keys, strip_known_prefixes
from .dit import check_block_layout, load_converted_state_dict, read_original_dit, rename_by_table

__all__ = [
    "BLOCK_KEY_MAP",
    "BLOCK_SPLITS",
    "TOP_LEVEL_KEY_MAP",
    "convert_longcat_lora_state_dict",
    "convert_longcat_state_dict",
    "export_longcat_state_dict",
    "is_longcat_lora_state_dict",
    "is_longcat_state_dict",
    "load_longcat_transformer_from_original",
    "longcat_target_modules",
    "longcat_config_from_state_dict",
]

# (original module path, Diffusers module path)
TOP_LEVEL_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj", "patch_embedding"),
    ("t_embedder.mlp.0", "time_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_embedder.linear_2"),
    ("y_embedder.y_proj.0", "text_embedder.linear_1"),
    ("y_embedder.y_proj.2", "text_embedder.linear_2"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ("final_layer.linear", "proj_out"),
)

# Inside ``blocks.N.``.
BLOCK_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("adaLN_modulation.1", "norm1.linear"),
    ("attn.q_norm", "attn1.norm_q"),
    ("attn.k_norm", "attn1.norm_k"),
    ("attn.proj", "attn1.to_out.0"),
    ("pre_crs_attn_norm", "norm2"),
    ("cross_attn.q_linear", "attn2.to_q"),
    ("cross_attn.q_norm", "attn2.norm_q"),
    ("cross_attn.k_norm", "attn2.norm_k"),
    ("cross_attn.proj", "attn2.to_out.0"),
    ("ffn.w1", "ffn.w1"),
    ("ffn.w2", "ffn.w2"),
    ("ffn.w3", "ffn.w3"),
)

# Fused original projections (inside ``blocks.N.``) -> the Diffusers projections they hold, in output order.
BLOCK_SPLITS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attn.qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    ("cross_attn.kv_linear", ("attn2.to_k", "attn2.to_v")),
)

REQUIRED_KEYS = (
    "x_embedder.proj.weight",
    "t_embedder.mlp.0.weight",
    "y_embedder.y_proj.0.weight",
    "final_layer.linear.weight",
    "blocks.0.attn.qkv.weight",
    "blocks.0.attn.q_norm.weight",
    "blocks.0.ffn.w1.weight",
)

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def is_longcat_state_dict(sd: Mapping[str, Any]) -> bool:
    """True for an original-layout LongCat-Video DiT (``x_embedder`` + ``blocks.N.attn.qkv``), any wrapper prefix."""
    keys = strip_known_prefixes(dict.fromkeys(sd), "blocks.")
    return "x_embedder.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys


def longcat_target_modules(module: str) -> tuple[str, ...] | None:
    """The Diffusers module(s) holding an original module (``blocks.3.attn.qkv`` -> its ``to_q``, ``to_k``,
    ``to_v``), or ``None`` for a module the LongCat-Video DiT does not have."""
    m = _BLOCK_RE.match(module)
    if m is None:
        new = rename_by_table(module, TOP_LEVEL_KEY_MAP)
        return None if new is None else (new,)
    prefix, local = f"blocks.{m.group(1)}.", m.group(2)
    for src, parts in BLOCK_SPLITS:
        if local == src:
            return tuple(prefix + part for part in parts)
    new = rename_by_table(local, BLOCK_KEY_MAP)
    return None if new is None else (prefix + new,)


def convert_longcat_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original LongCat-Video DiT keys -> :class:`~diffusers_wan_ext.LongCatVideoTransformer3DModel` keys.

    Wrapper prefixes (``model.``, ``diffusion_model.`` ...) are stripped; unknown keys raise
    :class:`~diffusers_wan_ext.utils.ConversionError` naming them.

    Example:
        >>> sd = {"x_embedder.proj.weight": torch.zeros(8, 16, 1, 2, 2), "blocks.0.attn.qkv.bias": torch.arange(6.)}
        >>> sorted(convert_longcat_state_dict(sd))
        ['blocks.0.attn1.to_k.bias', 'blocks.0.attn1.to_q.bias', 'blocks.0.attn1.to_v.bias', 'patch_embedding.weight']
    """
    sd = strip_known_prefixes(dict(sd), "blocks.")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        targets = longcat_target_modules(module)
        if targets is None:
            unknown.append(key)
            continue
        if len(targets) > 1 and value.shape[0] % len(targets):
            raise ConversionError(f"{key}: {value.shape[0]} outputs cannot be split into {len(targets)} projections")
        for target, chunk in zip(targets, value.chunk(len(targets), dim=0) if len(targets) > 1 else [value]):
            out[f"{target}.{param}"] = chunk.contiguous() if len(targets) > 1 else chunk
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) do not belong to a LongCat-Video DiT in the original layout: {format_keys(unknown)}"
        )
    return out


def export_longcat_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_longcat_state_dict`: Diffusers keys back to the original release layout
    (the ``to_q`` / ``to_k`` / ``to_v`` of each block are concatenated into ``attn.qkv`` again)."""
    top = tuple((b, a) for a, b in TOP_LEVEL_KEY_MAP)
    block = tuple((b, a) for a, b in BLOCK_KEY_MAP)
    part_of = {part: (src, i, len(parts)) for src, parts in BLOCK_SPLITS for i, part in enumerate(parts)}
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        m = _BLOCK_RE.match(key)
        if m is None:
            new = rename_by_table(key, top)
        else:
            prefix, local = f"blocks.{m.group(1)}.", m.group(2)
            module, _, param = local.rpartition(".")
            if module in part_of:
                src, i, n = part_of[module]
                pending.setdefault((f"{prefix}{src}.{param}", n), {})[i] = value
                continue
            new = rename_by_table(local, block)
            new = None if new is None else prefix + new
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) are not LongCatVideoTransformer3DModel parameters: {format_keys(unknown)}"
        )
    for (name, n), chunks in pending.items():
        if sorted(chunks) != list(range(n)):
            raise ConversionError(f"{name}: only {len(chunks)} of its {n} projections are in the state dict")
        out[name] = torch.cat([chunks[i] for i in range(n)], dim=0)
    return out


def longcat_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], original_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The :class:`~diffusers_wan_ext.LongCatVideoTransformer3DModel` config of an ORIGINAL-layout state dict.

    ``original_config`` is the release ``dit/config.json`` (or DiffSynth's constructor arguments); every width it
    states must match the weights.  ``text_tokens_zero_pad`` defaults to ``True`` (the release value).
    """
    cfg = dict(original_config or {})
    sd = strip_known_prefixes(dict(sd), "blocks.")
    blocks = check_block_layout(sd, REQUIRED_KEYS, "a LongCat-Video DiT")

    pe = sd["x_embedder.proj.weight"]
    if pe.ndim != 5:
        raise ConversionError(f"x_embedder.proj.weight must be a Conv3d weight [hidden, in, pt, ph, pw]; got {tuple(pe.shape)}")
    hidden, in_channels, patch = int(pe.shape[0]), int(pe.shape[1]), [int(s) for s in pe.shape[2:]]
    head_out = int(sd["final_layer.linear.weight"].shape[0])
    if head_out % math.prod(patch):
        raise ConversionError(f"final_layer.linear.weight has {head_out} outputs, not a multiple of the patch {patch}")
    head_dim = int(sd["blocks.0.attn.q_norm.weight"].shape[0])
    if hidden % head_dim:
        raise ConversionError(f"hidden size {hidden} is not a multiple of the head dim {head_dim} (attn.q_norm.weight)")
    found = dict(
        hidden_size=hidden,
        depth=len(blocks),
        num_heads=hidden // head_dim,
        in_channels=in_channels,
        out_channels=head_out // math.prod(patch),
        caption_channels=int(sd["y_embedder.y_proj.0.weight"].shape[1]),
        adaln_tembed_dim=int(sd["t_embedder.mlp.0.weight"].shape[0]),
        frequency_embedding_size=int(sd["t_embedder.mlp.0.weight"].shape[1]),
    )
    for k, v in found.items():
        if cfg.get(k) is not None and int(cfg[k]) != v:
            raise ConversionError(f"config.json says {k}={cfg[k]} but the weights have {k}={v}")
    if cfg.get("patch_size") is not None and [int(p) for p in cfg["patch_size"]] != patch:
        raise ConversionError(f"config.json says patch_size={cfg['patch_size']} but x_embedder.proj.weight has {patch}")
    ffn_dim = int(sd["blocks.0.ffn.w1.weight"].shape[0])
    if cfg.get("mlp_ratio") is not None and longcat_ffn_dim(hidden, cfg["mlp_ratio"]) != ffn_dim:
        raise ConversionError(
            f"config.json says mlp_ratio={cfg['mlp_ratio']} (SwiGLU width {longcat_ffn_dim(hidden, cfg['mlp_ratio'])}) "
            f"but blocks.0.ffn.w1.weight has {ffn_dim} outputs"
        )
    if head_dim % 8:
        raise ConversionError(f"head dim {head_dim} is not a multiple of 8 (LongCat's 3D RoPE needs it)")
    return dict(
        patch_size=patch,
        num_attention_heads=found["num_heads"],
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=found["out_channels"],
        num_layers=found["depth"],
        text_dim=found["caption_channels"],
        freq_dim=found["frequency_embedding_size"],
        time_embed_dim=found["adaln_tembed_dim"],
        ffn_dim=ffn_dim,
        text_tokens_zero_pad=bool(cfg.get("text_tokens_zero_pad", True)),
    )


def load_longcat_transformer_from_original(
    sd_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
    original_config: Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """Build :class:`~diffusers_wan_ext.LongCatVideoTransformer3DModel` from original-layout weights: a state dict,
    a file / shard index, or the release's ``dit/`` folder (its ``config.json`` is read).

    ``torch_dtype`` casts floating weights (``None`` keeps the file's dtype); the float32 modules of the model
    (``_keep_in_fp32_modules``: timestep embedder, adaLN, output projection) stay float32 for fp16 / bf16.

    Example:
        >>> transformer = load_longcat_transformer_from_original("LongCat-Video/dit", torch_dtype=torch.bfloat16)  # doctest: +SKIP
    """
    sd, original_config = read_original_dit(sd_or_path, original_config)
    config = longcat_config_from_state_dict(sd, original_config)
    with init_empty_weights():
        model = LongCatVideoTransformer3DModel(**config)
    return load_converted_state_dict(model, convert_longcat_state_dict(sd), torch_dtype)



# ------------------------------------------------------------------------------------------------ LoRA

#: The original LoRA network's module-name encoding (``lora_utils.LoRANetwork``): ``lora___lorahyphen___`` +
#: the module path with ``.`` written as ``___lorahyphen___``.
LORA_PREFIX, LORA_HYPHEN = "lora___lorahyphen___", "___lorahyphen___"
#: alpha / rank of the original ``load_lora`` defaults (network dim 128, alpha 64), used when a file has no
#: ``alpha_scale`` buffer.
DEFAULT_LORA_ALPHA = 64.0


def is_longcat_lora_state_dict(sd: Mapping[str, Any]) -> bool:
    """True for a LoRA in the original LongCat-Video format (``lora/cfg_step_lora.safetensors`` of the release)."""
    return any(k.startswith(LORA_PREFIX) for k in sd)


def convert_longcat_lora_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """An original-format LongCat-Video LoRA -> Diffusers / PEFT keys (``transformer.<module>.lora_A/B.weight``).

    Original modules are ``lora_down`` ``[n * r, in]`` and ``lora_up`` ``[out, r]`` (or ``n`` blocks ``[out / n,
    r]`` acting on the ``n`` chunks of the down projection, for the fused ``qkv`` / ``kv_linear``) with a scale
    ``alpha_scale``.  A fused target becomes one LoRA per Diffusers projection (``to_q`` / ``to_k`` / ``to_v``);
    ``alpha_scale`` is folded into ``lora_B`` so the result loads with ``lora_alpha == rank``.

    Example:
        >>> sd = {"lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___ffn___lorahyphen___w1.lora_down.weight":
        ...       torch.ones(4, 8), "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___ffn___lorahyphen___w1"
        ...       ".lora_up.weight": torch.ones(16, 4)}
        >>> sorted(convert_longcat_lora_state_dict(sd))
        ['transformer.blocks.0.ffn.w1.lora_A.weight', 'transformer.blocks.0.ffn.w1.lora_B.weight']
    """
    names = sorted({k.split(".", 1)[0] for k in sd})
    bad = [n for n in names if not n.startswith(LORA_PREFIX)]
    if bad:
        raise ConversionError(f"not an original LongCat-Video LoRA: unexpected key(s) {format_keys(bad)}")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        module = name[len(LORA_PREFIX):].replace(LORA_HYPHEN, ".")
        targets = longcat_target_modules(module)
        if targets is None:
            raise ConversionError(f"{name}: LoRA on {module!r}, which the LongCat-Video DiT does not have")
        down = sd.get(f"{name}.lora_down.weight")
        if down is None:
            raise ConversionError(f"{name}: missing {name}.lora_down.weight")
        blocks = sorted(int(k.split(".")[3]) for k in sd if k.startswith(f"{name}.lora_up.blocks."))
        ups = [sd[f"{name}.lora_up.blocks.{i}.weight"] for i in blocks] if blocks else [sd.get(f"{name}.lora_up.weight")]
        if ups[0] is None:
            raise ConversionError(f"{name}: missing {name}.lora_up.weight (or lora_up.blocks.N.weight)")
        rank = down.shape[0] // len(ups)
        scale = sd.get(f"{name}.alpha_scale")
        scale = float(scale) if scale is not None else DEFAULT_LORA_ALPHA / rank
        if len(ups) == len(targets):  # one up block per projection, each on its own rank-r chunk of the down output
            pairs = [(down[i * rank:(i + 1) * rank], up) for i, up in enumerate(ups)]
        elif len(ups) == 1:  # one up projection for the fused output: split its rows
            pairs = [(down, up) for up in ups[0].chunk(len(targets), dim=0)]
        else:
            raise ConversionError(f"{name}: {len(ups)} up blocks for {len(targets)} projections of {module!r}")
        for target, (a, b) in zip(targets, pairs):
            out[f"{prefix}{target}.lora_A.weight"] = a.contiguous()
            out[f"{prefix}{target}.lora_B.weight"] = (b.float() * scale).to(b.dtype).contiguous()
    return out
