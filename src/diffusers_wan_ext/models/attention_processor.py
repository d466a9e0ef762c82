"""Attention processors for Wan transformers.

Stock Diffusers' ``WanAttnProcessor`` separates CLIP image tokens from text tokens in cross-attention at a
hard-coded 512 text tokens (``image_context_length = S - 512``).  That is right for every release (umT5 context of
512) but not for models built with another ``text_len`` (tiny test models, fine-tunes with shorter contexts).
:class:`WanTextLenAttnProcessor` splits at ``S - text_len`` -- upstream Wan2.1's rule
(``WanI2VCrossAttention``: ``image_context_length = context.shape[1] - T5_CONTEXT_TOKEN_NUMBER``).
"""

from __future__ import annotations

from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    _get_added_kv_projections,
    _get_qkv_projections,
)

__all__ = ["WanTextLenAttnProcessor", "apply_wan_rotary_emb", "wan_attention_output", "wan_self_attention_qkv"]


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

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
        key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
        value_img = value_img.unflatten(2, (attn.heads, -1))

        out_img = dispatch_attention_fn(
            query, key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend
        ).flatten(2, 3).type_as(query)
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend,
        ).flatten(2, 3).type_as(query)
        hidden_states = out + out_img
        hidden_states = attn.to_out[0](hidden_states)
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
