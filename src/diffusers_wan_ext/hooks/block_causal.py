"""Block-causal self-attention with a KV cache for autoregressive (streaming) Wan generation.

Self-Forcing-distilled Wan models (krea/krea-realtime-video, CausVid) generate a video *block by block* (a block is
a few latent frames, 3 for krea): each block is denoised in a few steps while attending to itself and to the clean
keys / values of every earlier block, never to later ones -- the *block-causal* mask of their training::

    token in block b attends to  { tokens of blocks 0 .. b }   (optionally only the last ``max_context_frames``
                                                                 latent frames before block b, plus block b)

Running this with a growing cache instead of the full mask:

* :class:`WanKVCache` holds, per transformer layer, the self-attention keys (RoPE applied at their absolute frame
  positions) and values of the blocks *committed* so far, and the cross-attention keys / values of the text
  context, computed once per stream (the prompt does not change between blocks);
* :class:`WanBlockCausalAttnProcessor` (``attn1``) attends from the current block to ``[cache, current block]``;
  inside ``with cache.committing():`` it also appends the current block's keys / values to the cache (the
  reference re-runs each finished block at the clean timestep for this, see
  :class:`~diffusers_wan_ext.WanStreamingPipeline`);
* :class:`WanCachedCrossAttnProcessor` (``attn2``) projects the text context to keys / values once;
* a Diffusers hook on the transformer's ``rope`` shifts the RoPE frame positions of the current block to where it
  sits in the video (``cache.num_frames``, the number of latent frames committed so far).

Everything is installed on a stock :class:`diffusers.WanTransformer3DModel` (or any Wan transformer with stock
blocks) by :func:`enable_block_causal_cache` and removed by :func:`disable_block_causal_cache`; the weights and the
attention backend (``set_attention_backend``) are untouched.  :func:`block_causal_mask` is the equivalent explicit
mask for one forward over all frames (the tests check that both agree).

Example:
    >>> cache = enable_block_causal_cache(transformer)  # doctest: +SKIP
    >>> v = transformer(block_latents, t, prompt_embeds).sample   # attends to the cache + this block  # doctest: +SKIP
    >>> with cache.committing():                                   # append this block's clean K/V
    ...     transformer(clean_block, torch.zeros_like(t), prompt_embeds)  # doctest: +SKIP
    >>> disable_block_causal_cache(transformer)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from ..models.attention_processor import wan_attention_output, wan_self_attention_qkv

__all__ = [
    "WanBlockCausalAttnProcessor",
    "WanCachedCrossAttnProcessor",
    "WanKVCache",
    "block_causal_mask",
    "disable_block_causal_cache",
    "enable_block_causal_cache",
]

ROPE_HOOK = "wan_block_causal_rope"


@dataclass
class WanKVCache:
    """Keys / values of the committed blocks, per layer, and where the next block sits.

    Per layer the keys and values live in one preallocated buffer ``[B, capacity, heads, head_dim]``: the committed
    tokens first, then the current block's, written in place (no concatenation per forward; the buffer grows by
    doubling, or is compacted to the window when it is full).  A forward attends to ``buffer[:, start:end]``.

    Attributes:
        num_layers: transformer blocks.
        max_context_frames: attend to at most this many committed latent frames (a sliding window); ``None``: all
            (global block-causal attention, the reference's default).
        num_frames: latent frames committed so far; the next forward's first frame has this RoPE position.
        frame_seqlen: tokens per latent frame (set by the RoPE hook from the latest forward).
        reserve_tokens: capacity to allocate on first use (e.g. the whole stream's tokens), to avoid regrowth.
    """

    num_layers: int
    max_context_frames: int | None = None
    num_frames: int = 0
    frame_seqlen: int = 0
    reserve_tokens: int = 0
    cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    storing: bool = False
    _forward_frames: int = 0

    def __post_init__(self) -> None:
        if self.max_context_frames is not None and int(self.max_context_frames) < 1:
            raise ValueError(f"max_context_frames must be >= 1 or None (all frames), got {self.max_context_frames}")
        self.reset()

    def reset(self) -> None:
        """Forget every committed block and the text keys / values (a new video)."""
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.num_layers
        self._lengths = [0] * self.num_layers
        self.cross_kv = [None] * self.num_layers
        self.num_frames = 0
        self.storing = False

    @property
    def window_tokens(self) -> int | None:
        return None if self.max_context_frames is None else self.max_context_frames * self.frame_seqlen

    @property
    def cached_frames(self) -> int:
        """Committed latent frames the next block attends to (``<= max_context_frames``)."""
        if not self.frame_seqlen:
            return 0
        keep = self.window_tokens
        length = self._lengths[0] if keep is None else min(self._lengths[0], keep)
        return length // self.frame_seqlen

    @contextlib.contextmanager
    def committing(self) -> Iterator["WanKVCache"]:
        """Within this block, forwards append their self-attention keys / values to the cache; on exit the frame
        position advances by the frames of the (last) forward."""
        self.storing = True
        try:
            yield self
        finally:
            self.storing = False
        self.num_frames += self._forward_frames

    def attend(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the current block's keys / values after the committed ones (committing them when
        :attr:`storing`) and return the keys / values it attends to: the (windowed) committed ones and its own."""
        n, length, keep = key.shape[1], self._lengths[layer], self.window_tokens
        buf = self._buffers[layer]
        if buf is not None and (buf[0].shape[0] != key.shape[0] or buf[0].dtype != key.dtype
                                or buf[0].device != key.device or buf[0].shape[2:] != key.shape[2:]):
            raise ValueError(
                f"the block-causal cache holds batch {buf[0].shape[0]} {buf[0].dtype} keys on {buf[0].device}; this "
                f"forward has batch {key.shape[0]} {key.dtype} on {key.device}: reset the cache for a new stream"
            )
        if buf is not None and length + n > buf[0].shape[1] and keep is not None and length > keep:
            # full: keep only the window's tokens, moved to the front
            buf[0][:, :keep] = buf[0][:, length - keep:length].clone()
            buf[1][:, :keep] = buf[1][:, length - keep:length].clone()
            length = self._lengths[layer] = keep
        if buf is None or length + n > buf[0].shape[1]:
            capacity = max(length + n, self.reserve_tokens, 2 * buf[0].shape[1] if buf is not None else 0)
            if keep is not None:
                capacity = min(capacity, max(length + n, 2 * (keep + n)))
            new = tuple(key.new_empty((key.shape[0], capacity, *key.shape[2:])) for _ in range(2))
            if buf is not None and length:
                new[0][:, :length], new[1][:, :length] = buf[0][:, :length], buf[1][:, :length]
            buf = self._buffers[layer] = new
        buf[0][:, length:length + n] = key
        buf[1][:, length:length + n] = value
        start = 0 if keep is None else max(0, length - keep)
        if self.storing:
            self._lengths[layer] = length + n
        return buf[0][:, start:length + n], buf[1][:, start:length + n]


def block_causal_mask(num_frames: int, frame_seqlen: int, frames_per_block: int, max_context_frames: int | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``[S, S]`` mask (True = attend) of block-causal attention over ``num_frames`` latent frames.

    A token of block ``b`` (frames ``[b * n, (b + 1) * n)``, ``n = frames_per_block``) attends to every token of
    blocks ``0 .. b``, or, with ``max_context_frames``, to the frames ``[b * n - max_context_frames, (b + 1) * n)``
    (the reference's ``local_attn_size = max_context_frames + frames_per_block``).

    Example:
        >>> block_causal_mask(4, 1, 2).int().tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    """
    frame = torch.arange(num_frames, device=device).repeat_interleave(frame_seqlen)
    block = frame // frames_per_block
    q_block, k_frame = block[:, None], frame[None, :]
    mask = k_frame < (q_block + 1) * frames_per_block
    if max_context_frames is not None:
        mask &= k_frame >= q_block * frames_per_block - max_context_frames
    return mask


class WanBlockCausalAttnProcessor(WanAttnProcessor):
    """Self-attention of the current block over ``[committed blocks, current block]`` (see :class:`WanKVCache`).

    Args:
        cache: the shared :class:`WanKVCache`.
        layer: index of the transformer block this processor belongs to.
    """

    def __init__(self, cache: WanKVCache, layer: int):
        super().__init__()
        self.cache = cache
        self.layer = int(layer)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:
            raise ValueError("WanBlockCausalAttnProcessor is a self-attention processor (attn1)")
        query, key, value = wan_self_attention_qkv(attn, hidden_states, rotary_emb)
        keys, values = self.cache.attend(self.layer, key, value)
        out = dispatch_attention_fn(query, keys, values, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        return wan_attention_output(attn, out, query)


class WanCachedCrossAttnProcessor(WanAttnProcessor):
    """Text cross-attention whose keys / values are projected once per stream (:attr:`WanKVCache.cross_kv`).

    Text-to-video transformers only (no CLIP image branch).  The cached keys / values stay valid until
    :meth:`WanKVCache.reset`: the streaming pipeline resets the cache whenever the prompt changes.
    """

    def __init__(self, cache: WanKVCache, layer: int):
        super().__init__()
        self.cache = cache
        self.layer = int(layer)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.add_k_proj is not None:
            raise ValueError("WanCachedCrossAttnProcessor supports text-only cross-attention (text-to-video models)")
        kv = self.cache.cross_kv[self.layer]
        if kv is None or kv[0].shape[0] != hidden_states.shape[0]:
            query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
            kv = (attn.norm_k(key).unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1)))
            self.cache.cross_kv[self.layer] = kv
        else:
            query = attn.to_q(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(query, kv[0], kv[1], attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend)
        return wan_attention_output(attn, out, query)


class _RopeFrameOffsetHook(ModelHook):
    """``rope`` of the current block at its place in the video: frames ``num_frames .. num_frames + F - 1``."""

    def __init__(self, cache: WanKVCache):
        super().__init__()
        self.cache = cache

    def new_forward(self, module, hidden_states: torch.Tensor):
        _, _, f, h, w = hidden_states.shape
        p_t, p_h, p_w = module.patch_size
        frames, per_frame = f // p_t, (h // p_h) * (w // p_w)
        start = self.cache.num_frames
        if start + frames > module.max_seq_len:
            raise ValueError(
                f"the stream reached latent frame {start + frames}, past the transformer's RoPE table of "
                f"{module.max_seq_len} frames (rope_max_seq_len): start a new stream"
            )
        self.cache.frame_seqlen, self.cache._forward_frames = per_frame, frames
        whole = torch.empty((1, 1, (start + frames) * p_t, h, w), device="meta")
        cos, sin = self.fn_ref.original_forward(whole)
        return cos[:, start * per_frame:], sin[:, start * per_frame:]


def enable_block_causal_cache(transformer, max_context_frames: int | None = None, reserve_tokens: int = 0
                              ) -> WanKVCache:
    """Install the block-causal KV cache on a Wan transformer and return the (empty) cache.

    Every block's ``attn1`` gets :class:`WanBlockCausalAttnProcessor`, ``attn2`` :class:`WanCachedCrossAttnProcessor`
    (keeping the attention backend chosen before), and ``rope`` a frame-offset hook.  ``reserve_tokens``: key / value
    buffer capacity per layer to allocate up front (the stream's total tokens).  Undo with
    :func:`disable_block_causal_cache`.
    """
    if getattr(transformer, "_wan_block_causal", None) is not None:
        raise ValueError("the block-causal cache is already enabled on this transformer")
    blocks = getattr(transformer, "blocks", None)
    if blocks is None or getattr(transformer, "rope", None) is None:
        raise ValueError(f"{type(transformer).__name__} is not a Wan transformer (needs .blocks and .rope)")
    if getattr(transformer.config, "image_dim", None) is not None or any(b.attn2.add_k_proj is not None for b in blocks):
        raise ValueError(
            "block-causal streaming supports text-to-video Wan transformers (no CLIP image branch); this one has "
            "image cross-attention (image_dim / add_k_proj)"
        )
    if transformer.config.patch_size[0] != 1:
        raise ValueError(f"block-causal streaming needs a temporal patch size of 1, got {transformer.config.patch_size}")
    cache = WanKVCache(num_layers=len(blocks), max_context_frames=max_context_frames, reserve_tokens=reserve_tokens)
    saved = []
    for i, block in enumerate(blocks):
        for attn, cls in ((block.attn1, WanBlockCausalAttnProcessor), (block.attn2, WanCachedCrossAttnProcessor)):
            old = attn.processor
            new = cls(cache, i)
            new._attention_backend = getattr(old, "_attention_backend", None)
            saved.append((attn, old))
            attn.set_processor(new)
    HookRegistry.check_if_exists_or_initialize(transformer.rope).register_hook(_RopeFrameOffsetHook(cache), ROPE_HOOK)
    transformer._wan_block_causal = (cache, saved)
    return cache


def disable_block_causal_cache(transformer) -> None:
    """Remove what :func:`enable_block_causal_cache` installed (processors back as they were, no RoPE offset)."""
    state = getattr(transformer, "_wan_block_causal", None)
    if state is None:
        return
    cache, saved = state
    for attn, processor in saved:
        attn.set_processor(processor)
    HookRegistry.check_if_exists_or_initialize(transformer.rope).remove_hook(ROPE_HOOK, recurse=False)
    cache.reset()
    transformer._wan_block_causal = None
