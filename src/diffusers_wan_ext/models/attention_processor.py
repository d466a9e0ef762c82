"""Attention processors for Wan transformers.

Stock Diffusers' ``WanAttnProcessor`` separates CLIP image tokens from text tokens in cross-attention at a
hard-coded 512 text tokens (``image_context_length = S - 512``).  That is right for every release (umT5 context of
512) but not for models built with another ``text_len`` (tiny test models, fine-tunes with shorter contexts).
:class:`WanTextLenAttnProcessor` splits at ``S - text_len`` -- upstream Wan2.1's rule
(``WanI2VCrossAttention``: ``image_context_length = context.shape[1] - T5_CONTEXT_TOKEN_NUMBER``).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    _get_added_kv_projections,
    _get_qkv_projections,
)
from torch import nn

from ..ops import uses_triton
from ..ops.qk_norm_rope import qk_norm_rope

__all__ = [
    "WanFusedQKRopeAttnProcessor",
    "WanTextLenAttnProcessor",
    "apply_wan_rotary_emb",
    "image_text_cross_attention",
    "wan_attention_output",
    "wan_self_attention_qkv",
]


class WanTextLenAttnProcessor(WanAttnProcessor):
    """Cross-attention processor whose image/text split follows ``text_len`` (image tokens first, then text).

    Args:
        text_len: number of text-context tokens at the end of ``encoder_hidden_states``.

    Example:
        >>> for block in transformer.blocks:  # doctest: +SKIP
        ...     block.attn2.set_processor(WanTextLenAttnProcessor(text_len=256))
    """

    def __init__(self, text_len: int = 512):
        super().__init__()
        self.text_len = int(text_len)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.add_k_proj is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        image_len = encoder_hidden_states.shape[1] - self.text_len
        if image_len < 0:
            raise ValueError(
                f"cross-attention context has {encoder_hidden_states.shape[1]} tokens, fewer than text_len="
                f"{self.text_len}: pad the text context to text_len tokens"
            )
        encoder_hidden_states_img = encoder_hidden_states[:, :image_len]
        encoder_hidden_states = encoder_hidden_states[:, image_len:]

        return image_text_cross_attention(attn, hidden_states, encoder_hidden_states_img, encoder_hidden_states,
                                          attention_mask, self._attention_backend)


def image_text_cross_attention(attn, hidden_states: torch.Tensor, image: torch.Tensor, text: torch.Tensor,
                               attention_mask: torch.Tensor | None, backend) -> torch.Tensor:
    """Wan I2V cross-attention on an already split context: text through ``to_k`` / ``to_v``, image tokens through
    the added K/V (``add_k_proj`` / ``add_v_proj``), the two attention outputs summed before ``to_out``."""
    query, key, value = _get_qkv_projections(attn, hidden_states, text)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))

    key_img, value_img = _get_added_kv_projections(attn, image)
    key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
    value_img = value_img.unflatten(2, (attn.heads, -1))

    out_img = dispatch_attention_fn(
        query, key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False, backend=backend
    ).flatten(2, 3).type_as(query)
    out = dispatch_attention_fn(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=backend,
    ).flatten(2, 3).type_as(query)
    hidden_states = attn.to_out[0](out + out_img)
    return attn.to_out[1](hidden_states)


def apply_wan_rotary_emb(hidden_states, freqs_cos, freqs_sin):
    """Wan's RoPE on ``[B, S, heads, head_dim]`` (interleaved pairs), the same math as stock ``WanAttnProcessor``.

    ``freqs_cos`` / ``freqs_sin`` are ``[1, S, 1, head_dim]`` as :class:`diffusers.models.transformers.
    transformer_wan.WanRotaryPosEmbed` returns them (each angle repeated for its pair).
    """
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = hidden_states.new_empty(hidden_states.shape)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def wan_self_attention_qkv(attn, hidden_states, rotary_emb=None):
    """Query, key and value ``[B, S, heads, head_dim]`` of a Wan self-attention (``attn1``): projections (fused or
    not), RMS q/k norms and RoPE, exactly as stock ``WanAttnProcessor`` prepares them before the attention kernel."""
    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        query = apply_wan_rotary_emb(query, *rotary_emb)
        key = apply_wan_rotary_emb(key, *rotary_emb)
    return query, key, value


def wan_attention_output(attn, hidden_states, like):
    """``attn.to_out`` on the attention kernel's ``[B, S, heads, head_dim]`` output (cast like ``like``)."""
    hidden_states = hidden_states.flatten(2, 3).type_as(like)
    hidden_states = attn.to_out[0](hidden_states)
    return attn.to_out[1](hidden_states)


def _fused_qk_rope_ready(attn, hidden_states, rotary_emb) -> bool:
    """Whether :func:`~diffusers_wan_ext.ops.qk_norm_rope.qk_norm_rope` can replace the stock q/k norm + RoPE."""
    norm_q, norm_k = attn.norm_q, attn.norm_k
    return (
        uses_triton(hidden_states)
        and not torch.is_grad_enabled()  # the kernel has no backward: training takes the stock path
        and getattr(attn, "fused_projections", False)
        and getattr(attn, "to_qkv", None) is not None
        and isinstance(norm_q, nn.RMSNorm) and isinstance(norm_k, nn.RMSNorm)
        and norm_q.weight is not None and norm_k.weight is not None and norm_q.eps == norm_k.eps
        and isinstance(rotary_emb, (tuple, list)) and len(rotary_emb) == 2
        and all(torch.is_tensor(r) and r.is_floating_point() and r.ndim == 4 for r in rotary_emb)
        and rotary_emb[0].shape == rotary_emb[1].shape
        and rotary_emb[0].shape[1] in (1, hidden_states.shape[1])
        and rotary_emb[0].shape[-1] * attn.heads == norm_q.weight.numel()
    )


class WanFusedQKRopeAttnProcessor(WanAttnProcessor):
    """Self-attention processor that runs the q/k RMSNorm and RoPE as one Triton kernel.

    Same inputs, outputs and attention dispatch (backend, context-parallel config) as stock ``WanAttnProcessor``; on
    a self-attention with fused QKV projections (``attn.fuse_projections()``) on CUDA, the q/k normalisation and
    rotation run in :func:`~diffusers_wan_ext.ops.qk_norm_rope.qk_norm_rope`. Anything else (cross-attention,
    unfused projections, CPU, no Triton, LayerNorm q/k norms, gradient mode) takes the stock path.
    :func:`~diffusers_wan_ext.runtime.optimize_transformer` installs it on ``attn1`` layers (``fused_qk_rope=True``).

    Example:
        >>> for block in transformer.blocks:  # doctest: +SKIP
        ...     block.attn1.fuse_projections()
        ...     block.attn1.set_processor(WanFusedQKRopeAttnProcessor())
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or not _fused_qk_rope_ready(attn, hidden_states, rotary_emb):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        qkv = attn.to_qkv(hidden_states)
        eps = attn.norm_q.eps if attn.norm_q.eps is not None else torch.finfo(qkv.dtype).eps
        backend = getattr(self._attention_backend, "value", self._attention_backend)
        # SDPA kernels read (B, heads, N, D) memory; flash-attn style kernels read (B, N, heads, D)
        heads_first = backend is None or str(backend).startswith(("native", "_native"))
        query, key, value = qk_norm_rope(qkv, attn.norm_q.weight, attn.norm_k.weight, *rotary_emb, eps, attn.heads,
                                         heads_first=heads_first)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        return wan_attention_output(attn, out, query)
