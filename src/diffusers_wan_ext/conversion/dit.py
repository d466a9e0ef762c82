"""Wan DiT checkpoints: original (Wan-AI / DiffSynth) key layout <-> Diffusers ``WanTransformer3DModel`` layout.

The key map is a table of module-path pairs (:data:`TOP_LEVEL_KEY_MAP`, :data:`BLOCK_KEY_MAP`): a key is renamed
by its longest matching table prefix, the parameter suffix (``.weight`` / ``.bias``) is kept, and no tensor is
reshaped, so ``export_dit_state_dict(convert_dit_state_dict(sd)) == sd`` exactly.

This module is the engine for the Wan DiT file layout; it names no model family.  A family whose DiT adds modules
(Fun's ``ref_conv``, VACE's ``vace_blocks``, S2V's audio modules, Animate's adapter ...) declares them in its
declaration module (:mod:`diffusers_wan_ext.families`) as a :class:`DitExtension` -- its key tables, how its config
is read from the shapes, how its weights are recognised and which model class holds them -- and registers it with
:func:`register_dit_extension`.  Importing ``diffusers_wan_ext`` registers every family.

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
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from accelerate import init_empty_weights

from ..utils.io import (ConversionError, format_keys, load_state_dict, naming, raise_for_key_problems,
                        strip_known_prefixes)

__all__ = [
    "TOP_LEVEL_KEY_MAP",
    "BLOCK_KEY_MAP",
    "DitExtension",
    "DitInfo",
    "DitShape",
    "block_indices",
    "convert_dit_state_dict",
    "dit_extensions",
    "dit_key_tables",
    "export_dit_state_dict",
    "register_dit_extension",
    "rename_by_table",
    "rename_dit_key",
    "restore_unit_dims",
    "unit_dim_shape",
    "dit_config_from_state_dict",
    "load_dit_from_original",
    "find_dit_files",
]

KeyTable = tuple[tuple[str, str], ...]

# (original module path, diffusers module path); matched on whole path components.
TOP_LEVEL_KEY_MAP: KeyTable = (
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
)

# Inside ``blocks.N.``.  The original ``norm3`` (affine, before cross-attention) is Diffusers' ``norm2``; the
# original ``norm1`` / ``norm2`` and Diffusers' ``norm1`` / ``norm3`` have no parameters.
BLOCK_KEY_MAP: KeyTable = (
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
#: original-layout tensors of the core DiT whose leading dims are 1 (a key regex, the rank); families add theirs
#: (``DitExtension.unit_dim_keys``).  llama.cpp's ``llama-quantize`` (city96's GGUF workflow) writes a tensor with its
#: trailing GGML dims of size 1 dropped -- the leading PyTorch dims -- and its Wan patch restores only
#: ``.modulation`` and ``img_emb.emb_pos``: e.g. S2V's ``casual_audio_encoder.weights`` ``[1, layers, 1, 1]`` comes
#: back ``(layers, 1, 1)``.
UNIT_DIM_RANKS: tuple[tuple[str, int], ...] = (
    (r"(^|\.)modulation$", 3),
    (r"^img_emb\.emb_pos$", 3),
)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


# ------------------------------------------------------------------------------------------ extensions


@dataclass
class DitShape:
    """What the base Wan DiT keys say (before any family looks at its own modules)."""

    sd: Mapping[str, torch.Tensor]  # original layout, wrapper prefixes stripped
    cfg: Mapping[str, Any]  # the release config.json (may be empty)
    dim: int
    in_dim: int
    out_dim: int
    patch_size: tuple[int, ...]
    num_layers: int
    text_dim: int
    freq_dim: int
    ffn_dim: int
    has_img: bool
    clip_dim: int | None
    pos_len: int | None
    num_heads: int
    text_len: int
    eps: float

    @property
    def extra_channels(self) -> int:
        """Conditioning channels concatenated to the latents (``in_dim - out_dim``)."""
        return self.in_dim - self.out_dim


@dataclass(frozen=True)
class DitExtension:
    """What one model family adds to the Wan DiT file layout (declared in its family module).

    Attributes:
        name: the family.
        arches: the architectures (``DitInfo.arch``) it can detect, e.g. ``("vace",)``.
        layouts: a short description of the layouts, for the "unknown layout" message.
        top_level_keys: extra ``(original, diffusers)`` module pairs outside the blocks.
        block_tables: repeated module groups ``{"vace_blocks": table}`` (``<group>.N.<local>``), renamed by ``table``.
        foreign_keys: ``(fragment, what)`` of keys a separate converter handles (named in errors).
        unit_dim_keys: ``(key regex, rank)`` of its original-layout tensors whose leading dims are 1 (a GGUF writer
            may drop them; :func:`unit_dim_shape` puts them back).
        adapter_keys / convert_adapter / export_adapter: modules converted by rules rather than tables (Animate).
        head_dim: head dim the family's own keys state (used when ``config.json`` gives no ``num_heads``).
        config: ``(shape) -> config entries`` of its modules ({} when the weights lack them).
        detect: ``(shape, config) -> arch | None``; raises :class:`ConversionError` for an inconsistent layout.
        model_class: ``(info) -> class`` for the arches it detects.
        drop_config_keys: base config entries its model class does not take.
        priority: detection order (lower first).
    """

    name: str
    arches: tuple[str, ...] = ()
    layouts: str = ""
    top_level_keys: KeyTable = ()
    block_tables: Mapping[str, KeyTable] = field(default_factory=dict)
    foreign_keys: KeyTable = ()
    unit_dim_keys: tuple[tuple[str, int], ...] = ()
    adapter_keys: Callable[[str], bool] | None = None
    convert_adapter: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    export_adapter: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    head_dim: Callable[[Mapping[str, torch.Tensor]], int | None] | None = None
    config: Callable[[DitShape], dict[str, Any]] | None = None
    detect: Callable[[DitShape, dict[str, Any]], str | None] | None = None
    model_class: Callable[["DitInfo"], type] | None = None
    drop_config_keys: tuple[str, ...] = ()
    priority: int = 50


_EXTENSIONS: dict[str, DitExtension] = {}
_TABLE_CACHE: dict[bool, tuple[KeyTable, dict[str, KeyTable], re.Pattern]] = {}
_UNIT_DIM_CACHE: list[tuple[re.Pattern, int]] = []


def register_dit_extension(extension: DitExtension) -> None:
    """Add (or replace, by name) a family's DiT modules; called by the family declaration modules."""
    _EXTENSIONS[extension.name] = extension
    _TABLE_CACHE.clear()
    _UNIT_DIM_CACHE.clear()


def dit_extensions() -> list[DitExtension]:
    """The registered extensions in detection order."""
    return sorted(_EXTENSIONS.values(), key=lambda e: (e.priority, e.name))


def _tables(reverse: bool) -> tuple[KeyTable, dict[str, KeyTable], re.Pattern]:
    if reverse not in _TABLE_CACHE:
        top = TOP_LEVEL_KEY_MAP + tuple(p for e in dit_extensions() for p in e.top_level_keys)
        groups: dict[str, KeyTable] = {"blocks": BLOCK_KEY_MAP}
        for e in dit_extensions():
            groups.update(e.block_tables)
        if reverse:
            top = flip_table(top)
            groups = {name: flip_table(table) for name, table in groups.items()}
        pattern = re.compile(rf"^({'|'.join(re.escape(k) for k in groups)})\.(\d+)\.(.+)$")
        _TABLE_CACHE[reverse] = (top, groups, pattern)
    return _TABLE_CACHE[reverse]


def dit_key_tables() -> tuple[KeyTable, dict[str, KeyTable]]:
    """The whole original -> Diffusers DiT key map: top-level pairs and the block groups, every family included."""
    top, groups, _ = _tables(False)
    return top, dict(groups)


# ---------------------------------------------------------------------------------------------- renaming


def rename_by_table(key: str, table: KeyTable) -> str | None:
    """Rename a key or module path by the longest matching ``(source, target)`` prefix of ``table``; ``None`` if none."""
    best = None
    for src, dst in table:
        if (key == src or key.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
            best = (src, dst)
    if best is None:
        return None
    return best[1] + key[len(best[0]):]


def flip_table(table: KeyTable) -> KeyTable:
    """The reverse direction of a key table."""
    return tuple((b, a) for a, b in table)


def rename_dit_key(key: str, reverse: bool = False) -> str | None:
    """One DiT key or module path, original -> Diffusers (``reverse``: Diffusers -> original); ``None`` if unknown.

    Example:
        >>> rename_dit_key("blocks.3.self_attn.q.weight")
        'blocks.3.attn1.to_q.weight'
        >>> rename_dit_key("vace_blocks.0.proj_out", reverse=True)
        'vace_blocks.0.after_proj'
    """
    top, groups, pattern = _tables(reverse)
    m = pattern.match(key)
    if m:
        local = rename_by_table(m.group(3), groups[m.group(1)])
        return None if local is None else f"{m.group(1)}.{m.group(2)}.{local}"
    return rename_by_table(key, top)


def unit_dim_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with the leading 1s a GGUF writer dropped put back, for the keys of :data:`UNIT_DIM_RANKS` and the
    registered families' ``unit_dim_keys``."""
    if not _UNIT_DIM_CACHE:
        pairs = UNIT_DIM_RANKS + tuple(p for e in dit_extensions() for p in e.unit_dim_keys)
        _UNIT_DIM_CACHE.extend((re.compile(pattern), rank) for pattern, rank in pairs)
    rank = next((r for pattern, r in _UNIT_DIM_CACHE if pattern.search(key)), 0)
    return (1,) * (rank - len(shape)) + tuple(shape) if len(shape) < rank else tuple(shape)


def restore_unit_dims(sd: Mapping[str, Any]) -> dict[str, Any]:
    """An original-layout state dict with the leading unit dims of :data:`UNIT_DIM_RANKS` restored (tensors are
    viewed at the full shape; other values, e.g. stored quantized tensors, get ``shape`` replaced)."""
    out = {}
    for key, value in sd.items():
        shape = unit_dim_shape(key, tuple(value.shape))
        if shape == tuple(value.shape):
            out[key] = value
        elif isinstance(value, torch.Tensor):
            out[key] = value.reshape(shape)
        else:
            out[key] = replace(value, shape=shape)
    return out


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
    known = [pair for e in dit_extensions() for pair in e.foreign_keys]
    families = sorted({what for k in keys for frag, what in known if frag in k})
    msg = f"{len(keys)} key(s) do not belong to a Wan DiT in the {layout} layout: {format_keys(keys)}"
    if families:
        msg += f". They look like: {'; '.join(families)} - not handled by the base Wan DiT converter."
    return msg


def _split_adapters(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[tuple[DitExtension, dict]]]:
    """(table-renamed keys, [(extension, its adapter keys)]) of a state dict in either layout."""
    rest = dict(sd)
    parts = []
    for e in dit_extensions():
        if e.adapter_keys is None:
            continue
        mine = {k: v for k, v in rest.items() if e.adapter_keys(k)}
        if mine:
            parts.append((e, mine))
            rest = {k: v for k, v in rest.items() if k not in mine}
    return rest, parts


def convert_dit_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-layout Wan DiT state dict to Diffusers' ``WanTransformer3DModel`` names.

    Wrapper prefixes (``model.`` as in krea's file, ``model.diffusion_model.`` / ``diffusion_model.`` as in ComfyUI
    files) are stripped first.  Unknown keys raise :class:`ConversionError` naming them.

    Example:
        >>> from safetensors.torch import load_file  # doctest: +SKIP
        >>> diffusers_sd = convert_dit_state_dict(load_file("diffusion_pytorch_model.safetensors"))  # doctest: +SKIP
    """
    base, adapters = _split_adapters(restore_unit_dims(strip_known_prefixes(dict(sd), "blocks.")))
    out = _convert(base, reverse=False)
    for extension, keys in adapters:
        out.update(extension.convert_adapter(keys))
    return out


def export_dit_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`convert_dit_state_dict`: Diffusers names back to the original Wan release layout.

    This is the layout ComfyUI and the original Wan code load (add ``model.diffusion_model.`` for ComfyUI
    single-file checkpoints if wanted).
    """
    base, adapters = _split_adapters(dict(sd))
    out = _convert(base, reverse=True)
    for extension, keys in adapters:
        out.update(extension.export_adapter(keys))
    return out


# ---------------------------------------------------------------------------------------- config reading


@dataclass
class DitInfo:
    """What the weights say about a DiT: its architecture and the Diffusers config to build it."""

    arch: str  # what the DiT weights say (an arch some family's DitExtension detects)
    config: dict[str, Any]  # config of :attr:`model_cls`
    text_len: int
    model_type: str | None = None  # as stated by the release config.json, if any
    model_cls: type | None = None  # the Diffusers class that holds these weights (stock wherever stock can)
    family: str | None = None  # the family whose extension detected the architecture

    @property
    def needs_text_len_processor(self) -> bool:
        # stock WanAttnProcessor splits image tokens at a hard-coded 512 text tokens
        return self.config.get("added_kv_proj_dim") is not None and self.text_len != 512

    @property
    def model_class(self) -> str:
        """The name of :attr:`model_cls`."""
        return self.model_cls.__name__ if self.model_cls is not None else "WanTransformer3DModel"


def block_indices(sd: Mapping[str, Any], prefix: str = "blocks") -> list[int]:
    """The sorted indices ``N`` of the ``<prefix>.N.*`` keys of a state dict."""
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def check_block_layout(sd: Mapping[str, torch.Tensor], required: tuple[str, ...] = (), what: str = "a DiT") -> list[int]:
    """The indices of the ``blocks.N.*`` of an original-layout DiT; raises :class:`ConversionError` unless every
    ``required`` key is present, the blocks are ``0 .. n-1`` and every block has block 0's keys (the error names the
    keys)."""
    missing = [k for k in required if k not in sd]
    if missing:
        raise ConversionError(
            f"not {what} in the original layout: missing key(s) {format_keys(missing)}"
            + (f" (found e.g. {format_keys(list(sd)[:5], 5)})" if sd else " (the state dict is empty)")
        )
    blocks = block_indices(sd)
    if blocks != list(range(len(blocks))):
        gaps = sorted(set(range(max(blocks) + 1)) - set(blocks))
        raise ConversionError(f"DiT blocks are not contiguous: blocks.{gaps[0]}.* missing (have {len(blocks)} blocks)")
    local0 = {k.split(".", 2)[2] for k in sd if k.startswith("blocks.0.")}
    for i in blocks[1:]:
        local = {k.split(".", 2)[2] for k in sd if k.startswith(f"blocks.{i}.")}
        if local != local0:
            diff = sorted((local0 - local) | (local - local0))
            raise ConversionError(
                f"blocks.{i} differs from blocks.0: inconsistent key(s) {format_keys(f'blocks.{i}.{d}' for d in diff)}"
            )
    return blocks


def _image_branch(sd: Mapping[str, torch.Tensor]) -> tuple[bool, int | None, int | None]:
    has_img = "img_emb.proj.0.weight" in sd
    has_img_kv = "blocks.0.cross_attn.k_img.weight" in sd
    if has_img != has_img_kv:
        present, absent = ("img_emb.proj.*", "blocks.N.cross_attn.k_img/v_img") if has_img else (
            "blocks.N.cross_attn.k_img/v_img", "img_emb.proj.*")
        raise ConversionError(f"inconsistent image branch: {present} present but {absent} missing")
    clip_dim = int(sd["img_emb.proj.0.weight"].shape[0]) if has_img else None
    pos_len = int(sd["img_emb.emb_pos"].shape[1]) if "img_emb.emb_pos" in sd else None
    return has_img, clip_dim, pos_len


def _num_heads(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], dim: int) -> int:
    """``num_heads`` of the config, else the head dim a family's keys state, else the release head dim 128."""
    head_dim = next((h for e in dit_extensions() if e.head_dim is not None and (h := e.head_dim(sd))), None)
    default_heads = dim // head_dim if head_dim else dim // RELEASE_HEAD_DIM
    num_heads = int(cfg.get("num_heads") or max(1, default_heads))
    if dim % num_heads:
        raise ConversionError(f"dim {dim} is not divisible by num_heads {num_heads}")
    return num_heads


def read_dit_shape(sd: Mapping[str, torch.Tensor], original_config: Mapping[str, Any] | None = None) -> DitShape:
    """The base Wan DiT widths of an ORIGINAL-layout state dict, checked against the release ``config.json``."""
    cfg = dict(original_config or {})
    sd = restore_unit_dims(strip_known_prefixes(dict(sd), "blocks."))
    num_layers = len(check_block_layout(sd, REQUIRED_KEYS, "a Wan DiT"))
    pe = sd["patch_embedding.weight"]
    if pe.ndim != 5:
        raise ConversionError(f"patch_embedding.weight must be a Conv3d weight [dim, in, pt, ph, pw], got {tuple(pe.shape)}")
    dim, in_dim = int(pe.shape[0]), int(pe.shape[1])
    patch_size = tuple(int(s) for s in pe.shape[2:])
    head_out = sd["head.head.weight"].shape[0]
    if head_out % math.prod(patch_size):
        raise ConversionError(f"head.head.weight has {head_out} outputs, not a multiple of the patch volume {patch_size}")
    out_dim = int(head_out // math.prod(patch_size))
    if "blocks.0.ffn.0.weight" not in sd:
        raise ConversionError("missing key blocks.0.ffn.0.weight")
    widths = dict(dim=dim, in_dim=in_dim, out_dim=out_dim, ffn_dim=int(sd["blocks.0.ffn.0.weight"].shape[0]),
                  freq_dim=int(sd["time_embedding.0.weight"].shape[1]), num_layers=num_layers,
                  text_dim=int(sd["text_embedding.0.weight"].shape[1]))
    for k, v in widths.items():
        if k in cfg and int(cfg[k]) != int(v):
            raise ConversionError(
                f"config.json says {k}={cfg[k]} but the weights have {k}={v} "
                f"(from {'patch_embedding.weight' if k in ('dim', 'in_dim') else 'the weight shapes'})"
            )
    has_img, clip_dim, pos_len = _image_branch(sd)
    return DitShape(
        sd=sd, cfg=cfg, patch_size=patch_size, has_img=has_img, clip_dim=clip_dim, pos_len=pos_len,
        num_heads=_num_heads(sd, cfg, dim), text_len=int(cfg.get("text_len", 512)), eps=float(cfg.get("eps", 1e-6)),
        **widths,
    )


def _base_config(shape: DitShape) -> dict[str, Any]:
    sd = shape.sd
    return dict(
        patch_size=list(shape.patch_size),
        num_attention_heads=shape.num_heads,
        attention_head_dim=shape.dim // shape.num_heads,
        in_channels=shape.in_dim,
        out_channels=shape.out_dim,
        text_dim=shape.text_dim,
        freq_dim=shape.freq_dim,
        ffn_dim=shape.ffn_dim,
        num_layers=shape.num_layers,
        cross_attn_norm="blocks.0.norm3.weight" in sd,
        qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in sd else None,
        eps=shape.eps,
        image_dim=shape.clip_dim if shape.has_img else None,
        added_kv_proj_dim=shape.dim if shape.has_img else None,
        rope_max_seq_len=1024,
        pos_embed_seq_len=shape.pos_len,
    )


def dit_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], original_config: Mapping[str, Any] | None = None
) -> DitInfo:
    """Read the architecture and Diffusers config from an ORIGINAL-layout DiT state dict.

    ``original_config`` is the release ``config.json`` (``dim``, ``num_heads``, ``in_dim``, ``text_len`` ...); its
    values must agree with the shapes.  ``num_heads`` defaults to ``dim // 128`` (every Wan release uses head dim
    128) when the config does not give it (a family whose keys state the head dim says so).  Each registered family
    (:func:`dit_extensions`) adds the config entries of its modules and, in order, may claim the architecture.
    """
    shape = read_dit_shape(sd, original_config)
    ext: dict[str, Any] = {}
    for extension in dit_extensions():
        if extension.config is not None:
            ext.update(extension.config(shape))
    owner, arch = None, None
    for extension in dit_extensions():
        arch = extension.detect(shape, ext) if extension.detect is not None else None
        if arch is not None:
            owner = extension
            break
    if owner is None:
        layouts = "; ".join(e.layouts for e in dit_extensions() if e.layouts)
        raise ConversionError(
            f"unknown DiT layout: in_dim {shape.in_dim} (patch_embedding.weight) with out_dim {shape.out_dim} "
            f"(head.head.weight) and {'a' if shape.has_img else 'no'} CLIP branch (img_emb.*) matches no Wan release "
            f"({layouts})"
        )
    config = _base_config(shape)
    for key in owner.drop_config_keys:
        config.pop(key, None)
    config.update(ext)
    info = DitInfo(arch=arch, config=config, text_len=shape.text_len, model_type=shape.cfg.get("model_type"),
                   family=owner.name)
    info.model_cls = owner.model_class(info)
    return info


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
    kwargs = dict(info.config)
    if "text_len" in inspect.signature(info.model_cls.__init__).parameters:
        kwargs["text_len"] = info.text_len
    with init_empty_weights():  # parameters on meta, buffers (RoPE tables) real
        model = info.model_cls(**kwargs)
    return model


def load_dit_from_original(
    sd_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
    original_config: Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """Build a Diffusers Wan transformer from original-layout weights (a state dict, a file or a release folder).

    A file may be a ComfyUI / Kijai single file (any key prefix, fp16 / bf16 / fp8 / scaled fp8) or a GGUF file: it
    is read dequantized (:mod:`diffusers_wan_ext.utils.single_file`) and the family comes from its keys.  To keep its
    GGUF / fp8 Linear weights quantized in memory, use
    :func:`~diffusers_wan_ext.conversion.quantized_dit.load_quantized_dit`.

    The class is stock ``WanTransformer3DModel`` whenever stock covers the weights; a DiT with a CLIP branch and a
    ``text_len`` other than 512 (tiny test models) uses :class:`WanExtTransformer3DModel`, whose image/text split
    follows ``text_len``.  ``torch_dtype`` casts floating weights (``None`` keeps the file's dtype); modules in
    ``_keep_in_fp32_modules`` stay float32 as Diffusers does.

    Example:
        >>> transformer = load_dit_from_original("Wan2.1-T2V-1.3B", torch_dtype=torch.bfloat16)  # doctest: +SKIP
    """
    is_path = isinstance(sd_or_path, (str, os.PathLike))
    with naming(Path(sd_or_path)) if is_path else nullcontext():  # a key / shape error names the file
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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # non-UTF-8 too: name the file
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
