"""Wan's umT5-XXL text encoder file -> ``transformers.UMT5EncoderModel`` (and back).

The Wan releases ship the text encoder as ``models_t5_umt5-xxl-enc-bf16.pth``: the encoder half of umT5-XXL saved
with the module names of Wan's own ``wan/modules/t5.py`` (``T5Encoder``).  The network is exactly a transformers
``UMT5EncoderModel`` (RMS norms, un-scaled attention with a per-layer relative-position bias, gated-GELU(tanh) FFN), so
the conversion is a pure renaming, described by the table :data:`T5_KEY_RULES`.

Example:
    >>> from diffusers_wan_ext.conversion.text_encoder import load_t5_from_original
    >>> te = load_t5_from_original("Wan2.1-T2V-14B/models_t5_umt5-xxl-enc-bf16.pth", torch_dtype=torch.bfloat16)  # doctest: +SKIP

This module also holds the small table-driven renaming engine (:class:`KeyRule`, :func:`convert_with_rules`,
:func:`export_with_rules`) that :mod:`.image_encoder` uses too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from ..utils import ConversionError, load_state_dict, raise_for_key_problems, strip_known_prefixes
from ..utils.io import format_keys

__all__ = [
    "KeyRule",
    "T5_KEY_RULES",
    "convert_t5_state_dict",
    "convert_with_rules",
    "encode_prompt_context",
    "export_t5_state_dict",
    "export_with_rules",
    "load_t5_from_original",
    "prompt_lengths",
    "t5_config_from_state_dict",
    "t5_state_dict_to_original",
]


# ---------------------------------------------------------------------------------------------------------------------
# Table-driven key renaming
# ---------------------------------------------------------------------------------------------------------------------

# Tensor transforms a rule may name: kind -> (original tensor -> tuple of our tensors, tuple of ours -> original).
# Every pair is an exact inverse (pure views / reshapes / concatenations, no arithmetic), so round trips are bitwise.
TRANSFORMS: dict[str, tuple[Callable[[torch.Tensor], tuple], Callable[[tuple], torch.Tensor]]] = {
    # one tensor, same name change only
    "copy": (lambda t: (t,), lambda ts: ts[0]),
    # fused projection [n*D, ...] split into n equal chunks along dim 0 (in the order of ``ours``), and concatenated back
    "split": (None, lambda ts: torch.cat(ts, dim=0)),  # forward depends on len(ours): see _forward
    # [D_out, D_in] stored transposed (e.g. open-clip ``head`` [D, E] -> ``visual_projection.weight`` [E, D])
    "transpose": (lambda t: (t.t(),), lambda ts: ts[0].t()),
    # [1, 1, D] parameter -> [D] vector (open-clip ``cls_embedding`` -> ``class_embedding``)
    "flatten_1x1": (lambda t: (t.reshape(t.shape[-1]),), lambda ts: ts[0].reshape(1, 1, -1)),
    # [1, N, D] parameter -> [N, D] embedding table (open-clip ``pos_embedding`` -> ``position_embedding.weight``)
    "drop_batch_dim": (lambda t: (t.reshape(t.shape[1:]),), lambda ts: ts[0].reshape(1, *ts[0].shape)),
    # [1, C, 1, 1] per-channel bias -> [C] (Wan2.2-Animate motion encoder: FusedLeakyReLU biases)
    "squeeze_1c11": (lambda t: (t.reshape(-1),), lambda ts: ts[0].reshape(1, -1, 1, 1)),
}


@dataclass(frozen=True)
class KeyRule:
    """One line of a key-mapping table.

    ``original`` and the names in ``ours`` are patterns in which ``{i}`` stands for a block index.  ``kind`` names a
    :data:`TRANSFORMS` entry.  ``tied`` are further names of ours that receive the *same* tensor (tied weights, e.g.
    ``encoder.embed_tokens.weight`` = ``shared.weight``); on export they are optional and, when present, must equal
    the first name of ``ours``.
    """

    original: str
    ours: tuple[str, ...]
    kind: str = "copy"
    tied: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in TRANSFORMS:
            raise ValueError(f"unknown transform kind {self.kind!r}")
        if self.kind != "split" and len(self.ours) != 1:
            raise ValueError(f"rule {self.original!r}: kind {self.kind!r} maps to exactly one key")


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def _fill(pattern: str, groups: Mapping[str, str]) -> str:
    return pattern.replace("{i}", groups["i"]) if "{i}" in pattern else pattern


def _forward(rule: KeyRule, key: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if rule.kind == "split":
        n = len(rule.ours)
        if t.shape[0] % n:
            raise ConversionError(f"{key}: shape {tuple(t.shape)} cannot be split into {n} equal parts along dim 0")
        return tuple(t.chunk(n, dim=0))
    return TRANSFORMS[rule.kind][0](t)


def _is_dropped(key: str, dropped: Iterable[str]) -> bool:
    return any(key == d or (d.endswith(".") and key.startswith(d)) for d in dropped)


def convert_with_rules(
    sd: Mapping[str, torch.Tensor],
    rules: Iterable[KeyRule],
    *,
    dropped: Iterable[str] = (),
    what: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Rename an original state dict with a rule table.

    ``dropped`` lists exact keys or prefixes (ending in ``.``) that are known and deliberately discarded.  Any other
    key that no rule matches raises :class:`ConversionError` naming the keys.
    """
    rules = list(rules)
    dropped = tuple(dropped)
    compiled = [(_pattern_regex(r.original), r) for r in rules]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in sd.items():
        for rx, rule in compiled:
            m = rx.match(key)
            if m:
                groups = m.groupdict()
                for name, v in zip(rule.ours, _forward(rule, key, t)):
                    out[_fill(name, groups)] = v
                for name in rule.tied:
                    out[_fill(name, groups)] = t if rule.kind == "copy" else _forward(rule, key, t)[0]
                break
        else:
            if not _is_dropped(key, dropped):
                unknown.append(key)
    if unknown:
        raise ConversionError(f"{what}: unexpected key(s) that no conversion rule knows: {format_keys(unknown)}")
    return out


def export_with_rules(
    sd: Mapping[str, torch.Tensor],
    rules: Iterable[KeyRule],
    *,
    ignored: Iterable[str] = (),
    what: str = "state dict",
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_with_rules`: our names -> original names (exact inverse tensor transforms).

    ``ignored`` lists our keys (or prefixes ending in ``.``) that have no original counterpart and are skipped.
    Unknown keys and incomplete groups (e.g. only ``q_proj`` of a fused ``to_qkv``) raise :class:`ConversionError`.
    """
    rules = list(rules)
    ignored = tuple(ignored)
    # our name pattern -> (rule, position in rule.ours, or -1 for a tied alias)
    compiled = []
    for rule in rules:
        for pos, name in enumerate(rule.ours):
            compiled.append((_pattern_regex(name), rule, pos))
        for name in rule.tied:
            compiled.append((_pattern_regex(name), rule, -1))
    groups: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    rule_ids = {id(r): r for r in rules}
    aliases: list[tuple[KeyRule, dict, str, torch.Tensor]] = []
    unknown = []
    for key, t in sd.items():
        for rx, rule, pos in compiled:
            m = rx.match(key)
            if m:
                gd = m.groupdict()
                if pos < 0:
                    aliases.append((rule, gd, key, t))
                else:
                    groups.setdefault((id(rule), gd.get("i", "")), {})[pos] = t
                break
        else:
            if not _is_dropped(key, ignored):
                unknown.append(key)
    if unknown:
        raise ConversionError(f"{what}: unexpected key(s) with no original counterpart: {format_keys(unknown)}")
    out: dict[str, torch.Tensor] = {}
    incomplete = []
    for (rid, idx), parts in groups.items():
        rule = rule_ids[rid]
        gd = {"i": idx}
        if len(parts) != len(rule.ours):
            incomplete += [_fill(n, gd) for p, n in enumerate(rule.ours) if p not in parts]
            continue
        out[_fill(rule.original, gd)] = TRANSFORMS[rule.kind][1](tuple(parts[p] for p in range(len(rule.ours))))
    if incomplete:
        raise ConversionError(f"{what}: missing key(s) needed to rebuild fused original tensors: {format_keys(incomplete)}")
    for rule, gd, key, t in aliases:
        primary = _fill(rule.ours[0], gd)
        if primary in sd:
            if sd[primary].shape != t.shape or not torch.equal(sd[primary], t):
                raise ConversionError(f"{what}: tied weights {key} and {primary} differ")
        else:  # only the alias was saved: it stands for the primary name
            out[_fill(rule.original, gd)] = TRANSFORMS[rule.kind][1]((t,))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# umT5 encoder
# ---------------------------------------------------------------------------------------------------------------------

#: original ``T5Encoder`` key (Wan ``wan/modules/t5.py``) -> ``transformers.UMT5EncoderModel`` key.
T5_KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("token_embedding.weight", ("shared.weight",), tied=("encoder.embed_tokens.weight",)),
    KeyRule("blocks.{i}.norm1.weight", ("encoder.block.{i}.layer.0.layer_norm.weight",)),
    KeyRule("blocks.{i}.attn.q.weight", ("encoder.block.{i}.layer.0.SelfAttention.q.weight",)),
    KeyRule("blocks.{i}.attn.k.weight", ("encoder.block.{i}.layer.0.SelfAttention.k.weight",)),
    KeyRule("blocks.{i}.attn.v.weight", ("encoder.block.{i}.layer.0.SelfAttention.v.weight",)),
    KeyRule("blocks.{i}.attn.o.weight", ("encoder.block.{i}.layer.0.SelfAttention.o.weight",)),
    KeyRule(
        "blocks.{i}.pos_embedding.embedding.weight",
        ("encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",),
    ),
    KeyRule("blocks.{i}.norm2.weight", ("encoder.block.{i}.layer.1.layer_norm.weight",)),
    # gated-GELU FFN: original fc2(fc1(x) * gelu_tanh(gate.0(x))); transformers wo(gelu_new(wi_0(x)) * wi_1(x))
    KeyRule("blocks.{i}.ffn.gate.0.weight", ("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",)),
    KeyRule("blocks.{i}.ffn.fc1.weight", ("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",)),
    KeyRule("blocks.{i}.ffn.fc2.weight", ("encoder.block.{i}.layer.1.DenseReluDense.wo.weight",)),
    KeyRule("norm.weight", ("encoder.final_layer_norm.weight",)),
)

#: Wan ``shared_pos=True`` variants (a single ``pos_embedding`` at the top) do not exist in any release; such a file
#: fails with an "unexpected key" error instead of being converted wrongly.
_T5_ANCHOR = "blocks."


def as_state_dict(sd_or_path, anchor: str) -> dict[str, torch.Tensor]:
    if isinstance(sd_or_path, (str, os.PathLike)):
        sd = load_state_dict(sd_or_path)
    elif isinstance(sd_or_path, Mapping):
        sd = dict(sd_or_path)
    else:
        raise TypeError(f"expected a state dict or a file path, got {type(sd_or_path).__name__}")
    return strip_known_prefixes(sd, anchor)


def block_indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    rx = re.compile("^" + re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def require(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ConversionError(f"{what}: required key {key} is missing (is this the right file?)")
    return sd[key]


def t5_config_from_state_dict(sd: Mapping[str, torch.Tensor], num_heads: int | None = None):
    """Build the ``transformers.UMT5Config`` of an original Wan umT5 encoder state dict from its tensor shapes.

    Every width comes from the shapes; the head count from ``blocks.0.pos_embedding.embedding.weight``
    (``[num_buckets, num_heads]``).  ``num_heads``, when given, is checked against it.  The fixed fields are those of
    ``google/umt5-xxl`` (gated-GELU(tanh), eps 1e-6, max distance 128, untied LM head, pad 0 / eos 1).

    Example (release file): vocab 256384, d_model 4096, d_kv 64, d_ff 10240, 24 layers, 64 heads, 32 buckets.
    """
    from transformers import UMT5Config

    sd = strip_known_prefixes(dict(sd), _T5_ANCHOR)
    what = "umT5 encoder state dict"
    emb = require(sd, "token_embedding.weight", what)
    layers = block_indices(sd, "blocks.")
    if not layers:
        raise ConversionError(f"{what}: no 'blocks.<i>.*' keys found")
    if layers != list(range(len(layers))):
        raise ConversionError(f"{what}: block indices are not contiguous from 0: {layers}")
    q = require(sd, "blocks.0.attn.q.weight", what)
    fc1 = require(sd, "blocks.0.ffn.fc1.weight", what)
    pos = require(sd, "blocks.0.pos_embedding.embedding.weight", what)
    vocab, d_model = emb.shape
    dim_attn = q.shape[0]
    num_buckets, heads = pos.shape
    if num_heads is not None and int(num_heads) != heads:
        raise ConversionError(
            f"{what}: num_heads={num_heads} was given but blocks.0.pos_embedding.embedding.weight has {heads} heads"
        )
    if dim_attn % heads:
        raise ConversionError(f"{what}: attention width {dim_attn} is not divisible by {heads} heads")
    return UMT5Config(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(dim_attn // heads),
        d_ff=int(fc1.shape[0]),
        num_layers=len(layers),
        num_decoder_layers=len(layers),
        num_heads=int(heads),
        relative_attention_num_buckets=int(num_buckets),
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        initializer_factor=1.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=True,
        use_cache=True,
        tie_word_embeddings=False,  # as google/umt5-xxl states it (transformers 5 forces True for the T5 family)
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tokenizer_class="T5Tokenizer",
        architectures=["UMT5EncoderModel"],
    )


def convert_t5_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ``models_t5_umt5-xxl-enc-bf16.pth`` keys -> ``UMT5EncoderModel`` keys (tensors are not copied).

    ``token_embedding.weight`` becomes ``shared.weight`` and its tied alias ``encoder.embed_tokens.weight``.  A key no
    rule of :data:`T5_KEY_RULES` knows raises :class:`ConversionError` naming it.
    """
    sd = strip_known_prefixes(dict(sd), _T5_ANCHOR)
    return convert_with_rules(sd, T5_KEY_RULES, what="umT5 encoder (models_t5_umt5-xxl-enc-bf16.pth layout)")


def export_t5_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact inverse of :func:`convert_t5_state_dict`: ``UMT5EncoderModel`` keys -> original Wan keys.

    ``encoder.embed_tokens.weight`` is optional (a tied copy of ``shared.weight``; if both are given they must be equal).
    """
    return export_with_rules(sd, T5_KEY_RULES, what="UMT5EncoderModel state dict")


def empty_model(model_cls, config, torch_dtype: torch.dtype):
    """Instantiate without allocating / initialising parameters (meta params, real buffers) when accelerate exists."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a declared dependency
        model = model_cls(config)
        return model.to(torch_dtype), False
    with init_empty_weights(include_buffers=False):
        model = model_cls(config)
    return model, True


def load_strict(model, sd: dict[str, torch.Tensor], torch_dtype: torch.dtype, assign: bool, what: str):
    expected = set(model.state_dict())
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    raise_for_key_problems(what, missing, unexpected)
    ref = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} != model {tuple(ref[k].shape)}" for k, v in sd.items() if v.shape != ref[k].shape]
    raise_for_key_problems(what, wrong_shapes=bad)
    cast = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(cast, strict=True, assign=assign)
    model.to(torch_dtype)
    return model.eval()


#: llama.cpp / GGUF umT5 names -> transformers names (the renaming city96's ComfyUI-GGUF ``loader.py`` T5_SD_MAP does)
GGUF_T5_NAMES = (
    ("enc.", "encoder."), (".blk.", ".block."), ("token_embd", "shared"), ("output_norm", "final_layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q"), ("attn_k", "layer.0.SelfAttention.k"), ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"), ("attn_norm", "layer.0.layer_norm"),
    ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"), ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"), ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
    ("ffn_norm", "layer.1.layer_norm"),
)


def t5_state_dict_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's ``umt5_xxl_*.safetensors`` (transformers ``UMT5EncoderModel`` names, ``comfy/text_encoders/t5.py``)
    or a llama.cpp-named umT5 GGUF -> the original ``models_t5_umt5-xxl-enc-bf16.pth`` names; an original-layout
    state dict is returned unchanged.  Comfy's extra ``spiece_model`` tokenizer blob is dropped."""
    sd = {k: v for k, v in sd.items() if k != "spiece_model"}
    if any(k.startswith("enc.blk.") for k in sd):
        renamed = {}
        for k, v in sd.items():
            for old, new in GGUF_T5_NAMES:
                k = k.replace(old, new)
            renamed[k] = v
        sd = renamed
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in sd:
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
        return export_t5_state_dict(sd)
    return sd


def load_t5_from_original(sd_or_path, torch_dtype: torch.dtype = torch.float32, num_heads: int | None = None):
    """Load an original Wan umT5 encoder (state dict or ``.pth`` / ``.safetensors`` path) as ``UMT5EncoderModel``.

    ComfyUI's ``umt5_xxl_{fp16,fp8_e4m3fn_scaled}.safetensors`` and umT5 GGUF files are accepted too
    (:func:`t5_state_dict_to_original`; fp8 / GGUF weights are dequantized by the file reader).

    Strict: a missing or unexpected key raises :class:`ConversionError` naming it.  The model is returned in eval
    mode, in ``torch_dtype`` (Wan runs it in bf16; the release file is bf16).
    """
    from transformers import UMT5EncoderModel

    sd = as_state_dict(sd_or_path, _T5_ANCHOR)
    sd = t5_state_dict_to_original(sd)
    config = t5_config_from_state_dict(sd, num_heads=num_heads)
    ours = convert_t5_state_dict(sd)
    model, assign = empty_model(UMT5EncoderModel, config, torch_dtype)
    model = load_strict(model, ours, torch_dtype, assign, "umT5 encoder")
    # keep the input embedding tied to `shared` (assign=True replaces parameters one by one)
    model.encoder.embed_tokens = model.shared
    return model


def prompt_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Real prompt length per batch element, ``mask.gt(0).sum(1)`` (what Wan calls ``seq_lens``)."""
    return attention_mask.gt(0).sum(dim=1).long()


@torch.no_grad()
def encode_prompt_context(text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The text context Wan feeds the DiT: umT5 hidden states with every row at/after the prompt's length zeroed.

    Per batch element ``b``, rows ``>= attention_mask[b].gt(0).sum()`` are set to 0.  This equals the original Wan
    (cut each prompt to its length, the DiT pads back with zeros), stock Diffusers' ``_get_t5_prompt_embeds`` and
    DiffSynth's ``encode_prompt`` for batch 1 (DiffSynth applies *every* prompt's length to the whole batch, which is
    only correct for batch 1; we apply it per element).  Output dtype is the encoder's.
    """
    device = next(text_encoder.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)
    hidden = text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    lengths = prompt_lengths(attention_mask)
    keep = torch.arange(hidden.shape[1], device=device)[None, :] < lengths[:, None]
    return hidden.masked_fill(~keep[..., None], 0.0)
