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

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..utils.io import ConversionError, _format_keys, atomic_output_dir, load_state_dict, strip_known_prefixes
from .dit import _rename, cast_state_dict, check_shapes, locate_dit

__all__ = [
    "BLOCK_KEY_MAP",
    "BLOCK_SPLITS",
    "TOP_LEVEL_KEY_MAP",
    "convert_longcat_release",
    "convert_longcat_state_dict",
    "export_longcat_state_dict",
    "find_longcat_dit",
    "is_longcat_state_dict",
    "load_longcat_transformer_from_original",
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


def _split_of(local: str) -> tuple[str, tuple[str, ...], str] | None:
    for src, parts in BLOCK_SPLITS:
        if local.startswith(src + "."):
            return src, parts, local[len(src):]
    return None


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
        m = _BLOCK_RE.match(key)
        if m is None:
            new = _rename(key, TOP_LEVEL_KEY_MAP)
            if new is None:
                unknown.append(key)
            else:
                out[new] = value
            continue
        prefix, local = f"blocks.{m.group(1)}.", m.group(2)
        split = _split_of(local)
        if split is not None:
            _, parts, suffix = split
            if value.shape[0] % len(parts):
                raise ConversionError(f"{key}: {value.shape[0]} outputs cannot be split into {len(parts)} projections")
            for part, chunk in zip(parts, value.chunk(len(parts), dim=0)):
                out[prefix + part + suffix] = chunk.contiguous()
            continue
        new = _rename(local, BLOCK_KEY_MAP)
        if new is None:
            unknown.append(key)
        else:
            out[prefix + new] = value
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) do not belong to a LongCat-Video DiT in the original layout: {_format_keys(unknown)}"
        )
    return out


def export_longcat_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_longcat_state_dict`: Diffusers keys back to the original release layout
    (the ``to_q`` / ``to_k`` / ``to_v`` of each block are concatenated into ``attn.qkv`` again)."""
    top = tuple((b, a) for a, b in TOP_LEVEL_KEY_MAP)
    block = tuple((b, a) for a, b in BLOCK_KEY_MAP)
    part_of = {part: (src, i, len(parts)) for src, parts in BLOCK_SPLITS for i, part in enumerate(parts)}
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        m = _BLOCK_RE.match(key)
        if m is None:
            new = _rename(key, top)
            if new is None:
                unknown.append(key)
            else:
                out[new] = value
            continue
        prefix, local = f"blocks.{m.group(1)}.", m.group(2)
        module, _, suffix = local.rpartition(".")
        if module in part_of:
            src, i, n = part_of[module]
            pending.setdefault(f"{prefix}{src}.{suffix}|{n}", {})[i] = value
            continue
        new = _rename(local, block)
        if new is None:
            unknown.append(key)
        else:
            out[prefix + new] = value
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) are not LongCatVideoTransformer3DModel parameters: {_format_keys(unknown)}"
        )
    for tag, chunks in pending.items():
        name, n = tag.split("|")
        if sorted(chunks) != list(range(int(n))):
            raise ConversionError(f"{name}: only {len(chunks)} of its {n} projections are in the state dict")
        out[name] = torch.cat([chunks[i] for i in range(int(n))], dim=0)
    return out


def _block_indices(sd: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))})


def longcat_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], original_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The :class:`~diffusers_wan_ext.LongCatVideoTransformer3DModel` config of an ORIGINAL-layout state dict.

    ``original_config`` is the release ``dit/config.json`` (or DiffSynth's constructor arguments); every width it
    states must match the weights.  ``text_tokens_zero_pad`` defaults to ``True`` (the release value).
    """
    from ..models.transformer_longcat import longcat_ffn_dim

    cfg = dict(original_config or {})
    sd = strip_known_prefixes(dict(sd), "blocks.")
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        raise ConversionError(
            f"not a LongCat-Video DiT in the original layout: missing key(s) {_format_keys(missing)}"
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
    from accelerate import init_empty_weights

    from ..models.transformer_longcat import LongCatVideoTransformer3DModel

    if isinstance(sd_or_path, (str, os.PathLike)):
        weights, cfg = locate_dit(sd_or_path)
        sd = load_state_dict(weights)
        original_config = original_config or cfg
    else:
        sd = dict(sd_or_path)
    sd = strip_known_prefixes(sd, "blocks.")
    config = longcat_config_from_state_dict(sd, original_config)
    converted = convert_longcat_state_dict(sd)
    with init_empty_weights():
        model = LongCatVideoTransformer3DModel(**config)
    check_shapes(model, converted)
    converted = cast_state_dict(converted, torch_dtype, model._keep_in_fp32_modules)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------ release folders

#: The release's sampling scheduler (``scheduler/scheduler_config.json`` of meituan-longcat/LongCat-Video).
RELEASE_SCHEDULER_SHIFT = 12.0
#: Original file names of the Wan2.1 components DiffSynth-Studio pairs with LongCat's ``dit/``.
WAN_T5_FILE, WAN_VAE_FILE, WAN_TOKENIZER_DIR = "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl"


def _peek_keys(path: Path) -> list[str]:
    """Key names of a safetensors file or shard index, without reading tensors ([] for anything else)."""
    from safetensors import safe_open

    try:
        if path.name.endswith(".index.json"):
            return list(json.loads(path.read_text()).get("weight_map", {}))
        if path.name.endswith(".safetensors"):
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
    except Exception:  # noqa: BLE001 - unreadable files are reported by the real loader
        return []
    return []


def find_longcat_dit(src: str | os.PathLike, transformer: str | os.PathLike | None = None) -> Path | None:
    """The LongCat-Video DiT of a release (``dit/`` folder, a DiT folder or file, or ``transformer``), else ``None``."""
    from .dit import find_dit_files

    for cand in [transformer] if transformer is not None else [src, Path(src) / "dit"]:
        p = Path(cand)
        try:
            weights = find_dit_files(p) if p.is_dir() else (p if p.is_file() else None)
        except ConversionError:
            weights = None
        if weights is not None and is_longcat_state_dict(dict.fromkeys(_peek_keys(weights))):
            return p
    return None


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p is not None and p.exists()), None)


def _load_text_encoder(path: Path, torch_dtype: torch.dtype):
    """umT5 encoder from a Transformers folder (the LongCat release's ``text_encoder/``) or the Wan ``.pth``."""
    if path.is_dir() and (path / "config.json").is_file():
        from transformers import UMT5EncoderModel

        try:
            return UMT5EncoderModel.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True).eval()
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{path}: cannot load a UMT5EncoderModel ({type(e).__name__}: {e})") from e
    from .text_encoder import load_t5_from_original

    return load_t5_from_original(path / WAN_T5_FILE if path.is_dir() else path, torch_dtype=torch_dtype)


def _load_vae(path: Path):
    """Wan2.1 VAE from a Diffusers folder (the LongCat release's ``vae/``) or ``Wan2.1_VAE.pth``, in float32."""
    if path.is_dir() and (path / "config.json").is_file():
        from diffusers import AutoencoderKLWan

        try:
            return AutoencoderKLWan.from_pretrained(str(path), dtype=torch.float32).eval()
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{path}: cannot load an AutoencoderKLWan ({type(e).__name__}: {e})") from e
    from .vae import detect_vae_version, load_vae_from_original

    sd = load_state_dict(path / WAN_VAE_FILE if path.is_dir() else path)
    if detect_vae_version(sd) != "wan2.1":
        raise ConversionError(f"{path}: a {detect_vae_version(sd)} VAE, but LongCat-Video uses the Wan2.1 VAE ({WAN_VAE_FILE})")
    return load_vae_from_original(sd, torch_dtype=torch.float32)


def _load_scheduler(root: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = root / "scheduler" / "scheduler_config.json"
    if cfg.is_file():
        try:
            return FlowMatchEulerDiscreteScheduler.from_pretrained(str(cfg.parent))
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{cfg}: not a FlowMatchEulerDiscreteScheduler config ({type(e).__name__}: {e})") from e
    return FlowMatchEulerDiscreteScheduler(shift=RELEASE_SCHEDULER_SHIFT)


def convert_longcat_release(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str = "bf16",
    transformer: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    transformer_only: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: str = "5GB",
) -> Path:
    """Convert meituan-longcat/LongCat-Video into a :class:`~diffusers_wan_ext.LongCatVideoPipeline` folder.

    Args:
        src: the release folder: ``dit/`` (original DiT layout, converted), ``vae/`` (Diffusers ``AutoencoderKLWan``),
            ``text_encoder/`` (``UMT5EncoderModel``), ``tokenizer/`` and ``scheduler/`` (kept as they are).  The
            Wan2.1 files DiffSynth-Studio pairs with ``dit/`` work as well (``models_t5_umt5-xxl-enc-bf16.pth``,
            ``Wan2.1_VAE.pth``, ``google/umt5-xxl/``), next to it or passed explicitly.
        dst: output folder, written atomically (must not exist unless ``overwrite``).
        dtype: storage dtype of the transformer and text encoder (``bf16``, ``fp16``, ``fp32``); the VAE stays
            float32, and so do the transformer's float32 modules (timestep embedder, adaLN, output projection).
        transformer, text_encoder, tokenizer, vae: explicit component paths (override what ``src`` holds).
        transformer_only: write only the transformer model folder.

    Example:
        >>> convert_longcat_release("LongCat-Video", "LongCat-Video-diffusers")  # doctest: +SKIP
    """
    from .pipeline import DTYPES, _progress, _variant_record, _wrap, write_model_card
    from .tokenizer import load_umt5_tokenizer
    from .variants import get_variant

    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    root = src if src.is_dir() else src.parent
    dit = find_longcat_dit(src, transformer)
    if dit is None:
        raise ConversionError(
            f"{transformer or src}: no LongCat-Video DiT found (expected dit/diffusion_pytorch_model*.safetensors with "
            "x_embedder.* and blocks.N.attn.qkv.* keys, or pass --transformer)"
        )
    paths = {
        "text_encoder": Path(text_encoder) if text_encoder else _first(root / "text_encoder", root / WAN_T5_FILE),
        "tokenizer": Path(tokenizer) if tokenizer else _first(root / "tokenizer", root / WAN_TOKENIZER_DIR),
        "vae": Path(vae) if vae else _first(root / "vae", root / WAN_VAE_FILE),
    }
    missing = [] if transformer_only else [k for k, v in paths.items() if v is None]
    if missing:
        flags = ", ".join(f"--{k.replace('_', '-')} PATH" for k in missing)
        raise ConversionError(
            f"{src}: missing component(s) for LongCat-Video: {', '.join(missing)}. Keep the release's text_encoder/, "
            f"tokenizer/, vae/ folders next to dit/ (or the Wan2.1 {WAN_T5_FILE}, {WAN_TOKENIZER_DIR}/, "
            f"{WAN_VAE_FILE}), or pass {flags} (or --transformer-only)."
        )

    bar = _progress(1 if transformer_only else 5, progress)
    bar.set_postfix_str("transformer")
    model = _wrap(dit, lambda: load_longcat_transformer_from_original(dit, torch_dtype=torch_dtype))
    bar.update()
    components: dict[str, Any] = {"transformer": model}
    if not transformer_only:
        bar.set_postfix_str("text encoder")
        te = _wrap(paths["text_encoder"], lambda: _load_text_encoder(paths["text_encoder"], torch_dtype))
        if te.config.d_model != model.config.text_dim:
            raise ConversionError(
                f"{paths['text_encoder']}: text encoder width {te.config.d_model} does not match the DiT's caption "
                f"width {model.config.text_dim} (y_embedder.y_proj.0.weight)"
            )
        bar.update()
        bar.set_postfix_str("tokenizer")
        components["tokenizer"] = _wrap(paths["tokenizer"], lambda: load_umt5_tokenizer(paths["tokenizer"]))
        bar.update()
        bar.set_postfix_str("vae")
        vae_model = _wrap(paths["vae"], lambda: _load_vae(paths["vae"]))
        if vae_model.config.z_dim != model.config.in_channels or vae_model.config.z_dim != model.config.out_channels:
            raise ConversionError(
                f"{paths['vae']}: VAE latent channels {vae_model.config.z_dim} do not match the DiT's "
                f"{model.config.in_channels} in / {model.config.out_channels} out channels"
            )
        bar.update()
        components.update(text_encoder=te, vae=vae_model, scheduler=_load_scheduler(root))
        bar.update()

    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        if transformer_only:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        else:
            from ..pipelines.pipeline_longcat_video import LongCatVideoPipeline

            LongCatVideoPipeline(**components).save_pretrained(tmp, max_shard_size=max_shard_size)
            var = get_variant("longcat-video")
            write_model_card(tmp, var, "LongCatVideoPipeline", str(src))
            (tmp / "wan_variant.json").write_text(json.dumps(_variant_record(var), indent=2) + "\n")
        bar.close()
    return Path(dst)
