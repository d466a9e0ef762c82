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
from safetensors.torch import save_file

from ..utils.io import ConversionError, _format_keys, atomic_output_dir, load_state_dict, strip_known_prefixes
from .dit import _rename, check_block_layout, load_converted_state_dict, read_original_dit

__all__ = [
    "BLOCK_KEY_MAP",
    "BLOCK_SPLITS",
    "TOP_LEVEL_KEY_MAP",
    "convert_longcat_lora_state_dict",
    "convert_longcat_release",
    "convert_longcat_state_dict",
    "export_longcat_state_dict",
    "find_longcat_dit",
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
        new = _rename(module, TOP_LEVEL_KEY_MAP)
        return None if new is None else (new,)
    prefix, local = f"blocks.{m.group(1)}.", m.group(2)
    for src, parts in BLOCK_SPLITS:
        if local == src:
            return tuple(prefix + part for part in parts)
    new = _rename(local, BLOCK_KEY_MAP)
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
    pending: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        m = _BLOCK_RE.match(key)
        if m is None:
            new = _rename(key, top)
        else:
            prefix, local = f"blocks.{m.group(1)}.", m.group(2)
            module, _, param = local.rpartition(".")
            if module in part_of:
                src, i, n = part_of[module]
                pending.setdefault((f"{prefix}{src}.{param}", n), {})[i] = value
                continue
            new = _rename(local, block)
            new = None if new is None else prefix + new
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) are not LongCatVideoTransformer3DModel parameters: {_format_keys(unknown)}"
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
    from ..models.transformer_longcat import longcat_ffn_dim

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
    from accelerate import init_empty_weights

    from ..models.transformer_longcat import LongCatVideoTransformer3DModel

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
        raise ConversionError(f"not an original LongCat-Video LoRA: unexpected key(s) {_format_keys(bad)}")
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
            ``text_encoder/`` (``UMT5EncoderModel``), ``tokenizer/`` and ``scheduler/`` (kept as they are), and
            ``lora/*.safetensors`` (original LoRA format, written to ``dst/lora/`` in the Diffusers format).  The
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
            for lora in sorted((root / "lora").glob("*.safetensors")) if (root / "lora").is_dir() else []:
                sd = _wrap(lora, lambda: load_state_dict(lora))
                if is_longcat_lora_state_dict(sd):
                    sd = _wrap(lora, lambda: convert_longcat_lora_state_dict(sd))
                (tmp / "lora").mkdir(exist_ok=True)
                save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "lora" / lora.name))
            var = get_variant("longcat-video")
            write_model_card(tmp, var, "LongCatVideoPipeline", str(src))
            (tmp / "wan_variant.json").write_text(json.dumps(_variant_record(var), indent=2) + "\n")
        bar.close()
    return Path(dst)
