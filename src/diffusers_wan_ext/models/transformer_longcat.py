# Copyright 2025 The diffusers_wan_ext authors. Licensed under the Apache License, Version 2.0.
"""``LongCatVideoTransformer3DModel``: the DiT of meituan-longcat/LongCat-Video, in Diffusers form.

LongCat-Video is not a Wan DiT: single-stream blocks with a *per-frame* adaLN modulation (a ``Linear`` on the
timestep embedding, computed in float32), self-attention with a fused QKV projection, per-head RMSNorm on queries and
keys and a 3D RoPE, cross-attention to the (zero-padded) umT5 caption, and a SwiGLU feed-forward.  It reuses the
Wan2.1 VAE and umT5.  Latent frames given as *conditioning* (video continuation, image-to-video) take timestep 0,
attend only among themselves and skip the cross-attention; the other frames attend to everything.

Diffusers conventions: attention goes through :func:`~diffusers.models.attention_dispatch.dispatch_attention_fn`
(``set_attention_backend`` applies), the attention modules are :class:`AttentionModuleMixin` (``to_q`` / ``to_k`` /
``to_v`` / ``to_out.0``, fusable), PEFT LoRA via :class:`PeftAdapterMixin`, gradient checkpointing, step caches via
:class:`CacheMixin` and a context-parallel plan (the sequence is split within each frame, like the original
``cp_split_hw``, so per-frame modulation and the conditioning split stay local).  The original release layout
converts with :mod:`diffusers_wan_ext.conversion.longcat` (a key table; the fused ``qkv`` / ``kv_linear`` are split).

Hidden states between the blocks are ``[B, T, S, C]`` (latent frames ``T``, tokens per frame ``S``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm, RMSNorm
from diffusers.utils import apply_lora_scale
from diffusers.utils.torch_utils import maybe_allow_in_graph

from ..utils.shims import ShimSaveMixin

__all__ = [
    "LongCatKVCache",
    "LongCatVideoAttention",
    "LongCatVideoAttnProcessor",
    "LongCatVideoTransformer3DModel",
    "LongCatVideoTransformerBlock",
    "longcat_ffn_dim",
]


def longcat_ffn_dim(hidden_size: int, mlp_ratio: float = 4, multiple_of: int = 256) -> int:
    """The SwiGLU hidden width of the original code: ``2/3 * hidden * mlp_ratio`` rounded up to ``multiple_of``.

    Example:
        >>> longcat_ffn_dim(4096)
        11008
    """
    hidden = int(2 * int(hidden_size * mlp_ratio) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ------------------------------------------------------------------------------------------------------ KV cache


@dataclass
class LongCatKVCache:
    """Keys / values of the clean conditioning frames, computed once and reused at every denoising step.

    The conditioning tokens never see the noisy ones (they attend only among themselves, skip the cross-attention
    and have timestep 0), so their per-block keys and values are the same at every step.  Build the cache with
    :meth:`LongCatVideoTransformer3DModel.build_kv_cache` and pass it as ``kv_cache`` with the *noisy* frames only:
    the result equals the forward over ``[conditioning, noisy]`` frames with ``num_cond_latents`` (the original
    ``use_kv_cache``).  Keys are stored after RoPE.
    """

    num_latents: int
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    recording: bool = True

    def layer(self, index: int) -> "_LayerKVCache":
        while len(self.keys) <= index:
            self.keys.append(None)
            self.values.append(None)
        return _LayerKVCache(self, index)


class _LayerKVCache:
    """One block's view of a :class:`LongCatKVCache` (what the attention processor stores into / reads from)."""

    def __init__(self, cache: LongCatKVCache, index: int):
        self.cache, self.index = cache, index

    @property
    def recording(self) -> bool:
        return self.cache.recording

    def store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.cache.keys[self.index], self.cache.values[self.index] = key.detach(), value.detach()

    def extend(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[cached; current]`` keys and values; a cache of batch 1 (or ``B / k``) is repeated to the batch."""
        ck, cv = self.cache.keys[self.index], self.cache.values[self.index]
        if ck is None:
            raise ValueError(f"the KV cache has no entry for block {self.index}: build it with build_kv_cache()")
        b = key.shape[0]
        if ck.shape[0] != b:
            if b % ck.shape[0]:
                raise ValueError(f"KV cache of batch {ck.shape[0]} cannot serve a batch of {b}")
            ck, cv = ck.repeat(b // ck.shape[0], 1, 1, 1), cv.repeat(b // cv.shape[0], 1, 1, 1)
        return torch.cat([ck.to(key.dtype), key], dim=1), torch.cat([cv.to(value.dtype), value], dim=1)


# ------------------------------------------------------------------------------------------------------ attention


def _apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE in float32 (``x * cos + rotate_half(x) * sin``, pairs ``(x0, x1) -> (-x1, x0)``)."""
    xf = x.float()
    x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).type_as(x)


class LongCatVideoAttnProcessor:
    """Attention of LongCat-Video blocks through Diffusers' attention dispatch.

    Self-attention (``encoder_hidden_states is None``): per-head RMSNorm, 3D RoPE, and with ``num_cond_tokens > 0``
    the first ``num_cond_tokens`` queries attend only to the first ``num_cond_tokens`` keys while the rest attend to
    all.  With a :class:`LongCatKVCache` layer the keys / values are recorded, or the cached conditioning ones are
    prepended.  Cross-attention: per-head RMSNorm, no RoPE, optional key mask ``[B, L]``.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "LongCatVideoAttention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_cond_tokens: int = 0,
        kv_cache: _LayerKVCache | None = None,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        if attn.fused_projections:
            if is_cross:
                query = attn.to_q(hidden_states)
                key, value = attn.to_kv(context).chunk(2, dim=-1)
            else:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)

        query = attn.norm_q(query.unflatten(2, (attn.heads, -1)))
        key = attn.norm_k(key.unflatten(2, (attn.heads, -1)))
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:
            cos, sin = rotary_emb
            n = query.shape[1]  # the current tokens are the last n positions (a KV cache precedes them)
            cos, sin = cos[:, -n:], sin[:, -n:]
            query = _apply_rotary_emb(query, cos, sin)
            key = _apply_rotary_emb(key, cos, sin)

        if kv_cache is not None:
            if kv_cache.recording:
                kv_cache.store(key, value)
            else:
                key, value = kv_cache.extend(key, value)

        parallel = None if is_cross else self._parallel_config
        mask = None
        if attention_mask is not None:
            if not is_cross:
                raise ValueError(
                    "LongCat-Video self-attention takes no key mask: under context parallelism the tokens of one "
                    "latent frame ((height / 16) * (width / 16)) must divide by the degree (480x832 and 720x1280 do "
                    "for degrees 2-6 and 8), so that no padding is needed"
                )
            mask = attention_mask.to(torch.bool)[:, None, None, :]  # caption padding: [B, 1, 1, L] over the keys

        def attend(q, k, v, m=None):
            return dispatch_attention_fn(
                q, k, v, attn_mask=m, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                parallel_config=parallel,
            )

        if num_cond_tokens > 0 and not is_cross:
            nc = num_cond_tokens
            out = torch.cat([attend(query[:, :nc], key[:, :nc], value[:, :nc]), attend(query[:, nc:], key, value)], 1)
        else:
            out = attend(query, key, value, mask)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class LongCatVideoAttention(nn.Module, AttentionModuleMixin):
    """Self- or cross-attention of a LongCat-Video block: ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (all with bias)
    and per-head ``norm_q`` / ``norm_k`` (RMSNorm over the head dim)."""

    _default_processor_cls = LongCatVideoAttnProcessor
    _available_processors = [LongCatVideoAttnProcessor]

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        eps: float = 1e-6,
        is_cross_attention: bool = False,
        processor: LongCatVideoAttnProcessor | None = None,
    ):
        super().__init__()
        self.heads = heads
        self.inner_dim = heads * dim_head
        self.is_cross_attention = is_cross_attention
        self.use_bias = True
        self.to_q = nn.Linear(dim, self.inner_dim, bias=True)
        self.to_k = nn.Linear(dim, self.inner_dim, bias=True)
        self.to_v = nn.Linear(dim, self.inner_dim, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, dim, bias=True), nn.Dropout(0.0)])
        self.norm_q = RMSNorm(dim_head, eps=eps, elementwise_affine=True)
        self.norm_k = RMSNorm(dim_head, eps=eps, elementwise_affine=True)
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)


# ------------------------------------------------------------------------------------------------------ embeddings


class LongCatVideoRotaryPosEmbed(nn.Module):
    """3D RoPE of LongCat-Video: head dim split ``t = d - 4*(d//6)``, ``h = w = 2*(d//6)`` (needs ``d % 8 == 0``),
    base 10000, positions ``0..n-1`` per axis, interleaved pairs; computed in float32 as the original does.

    Returns ``(cos, sin)``, each ``[1, T, H*W, d]`` (frames outermost, so a context-parallel split along the tokens
    of a frame keeps every frame's positions)."""

    def __init__(self, attention_head_dim: int, theta: float = 10000.0):
        super().__init__()
        if attention_head_dim % 8:
            raise ValueError(f"LongCat's 3D RoPE needs a head dim divisible by 8; got {attention_head_dim}")
        self.attention_head_dim = attention_head_dim
        self.theta = theta
        d = attention_head_dim
        self.dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    def _axis(self, n: int, dim: int, device: torch.device) -> torch.Tensor:
        freqs = 1.0 / (self.theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))
        angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * freqs[None]
        return angles.repeat_interleave(2, dim=-1)  # [n, dim], each frequency twice (interleaved pairs)

    def forward(self, num_frames: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        dt, dh, dw = self.dims
        t = self._axis(num_frames, dt, device)[:, None, None].expand(num_frames, height, width, dt)
        h = self._axis(height, dh, device)[None, :, None].expand(num_frames, height, width, dh)
        w = self._axis(width, dw, device)[None, None, :].expand(num_frames, height, width, dw)
        angles = torch.cat([t, h, w], dim=-1).reshape(1, num_frames, height * width, -1)
        return angles.cos(), angles.sin()


class LongCatVideoAdaLayerNormZero(nn.Module):
    """Per-frame adaLN: ``SiLU -> Linear`` on the timestep embedding ``[B, T, D_t]``, in float32, giving
    ``num_chunks`` tensors ``[B, T, 1, C]``; ``norm`` is the parameter-free float32 LayerNorm they modulate."""

    def __init__(self, embedding_dim: int, dim: int, num_chunks: int, eps: float = 1e-6):
        super().__init__()
        self.num_chunks = num_chunks
        self.linear = nn.Linear(embedding_dim, num_chunks * dim, bias=True)
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = F.silu(temb.float()).to(self.linear.weight.dtype)
        return self.linear(x).float().unsqueeze(2).chunk(self.num_chunks, dim=-1)


class LongCatVideoFeedForward(nn.Module):
    """SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)`` (no biases), as the original (and Diffusers' HiDream) names it."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inner_dim, bias=False)
        self.w2 = nn.Linear(inner_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inner_dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(hidden_states)) * self.w3(hidden_states))


def _modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` in float32, back to ``x``'s dtype (the original ``modulate_fp32``)."""
    return (norm(x.float()) * (scale + 1) + shift).to(x.dtype)


# ------------------------------------------------------------------------------------------------------ block


@maybe_allow_in_graph
class LongCatVideoTransformerBlock(nn.Module):
    """One LongCat-Video block on ``[B, T, S, C]`` hidden states (original ``LongCatSingleStreamBlock``)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, time_embed_dim: int, eps: float = 1e-6):
        super().__init__()
        head_dim = dim // num_heads
        self.norm1 = LongCatVideoAdaLayerNormZero(time_embed_dim, dim, 6, eps)
        self.attn1 = LongCatVideoAttention(dim, num_heads, head_dim, eps=1e-6)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.attn2 = LongCatVideoAttention(dim, num_heads, head_dim, eps=1e-6, is_cross_attention=True)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = LongCatVideoFeedForward(dim, ffn_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        encoder_attention_mask: torch.Tensor | None = None,
        num_cond_latents: int = 0,
        kv_cache: _LayerKVCache | None = None,
    ) -> torch.Tensor:
        b, t, s, c = hidden_states.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)  # [B, T, 1, C] fp32

        # 1. self-attention (conditioning frames attend only among themselves)
        x = _modulate(self.norm1.norm, hidden_states, shift_msa, scale_msa).flatten(1, 2)
        cos, sin = rotary_emb
        rope = (cos.flatten(1, 2).unsqueeze(2), sin.flatten(1, 2).unsqueeze(2))  # [1, T_all * S, 1, d]
        cond_tokens = num_cond_latents * s if kv_cache is None else 0
        attn = self.attn1(x, None, None, rope, num_cond_tokens=cond_tokens, kv_cache=kv_cache)
        hidden_states = (hidden_states + gate_msa * attn.view(b, t, s, c)).to(hidden_states.dtype)

        # 2. cross-attention (skipped by conditioning frames; skipped entirely while recording a KV cache)
        if encoder_hidden_states is not None and not (kv_cache is not None and kv_cache.recording):
            k = num_cond_latents if kv_cache is None else 0
            noisy = hidden_states[:, k:]
            x = self.norm2(noisy.float()).to(noisy.dtype).flatten(1, 2)
            out = self.attn2(x, encoder_hidden_states, encoder_attention_mask).view(b, t - k, s, c)
            hidden_states = torch.cat([hidden_states[:, :k], noisy + out], dim=1) if k else noisy + out

        # 3. feed-forward
        x = _modulate(self.norm3, hidden_states, shift_mlp, scale_mlp)
        hidden_states = (hidden_states + gate_mlp * self.ffn(x)).to(hidden_states.dtype)
        return hidden_states


# ------------------------------------------------------------------------------------------------------ model


class LongCatVideoTransformer3DModel(
    ShimSaveMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin
):
    r"""
    The LongCat-Video DiT (meituan-longcat/LongCat-Video, 13.6B) with Diffusers conventions.

    Args:
        patch_size (`tuple[int, int, int]`, defaults to `(1, 2, 2)`): 3D patch (the temporal patch must be 1).
        num_attention_heads (`int`, defaults to `32`): attention heads.
        attention_head_dim (`int`, defaults to `128`): channels per head (a multiple of 8 for the 3D RoPE).
        in_channels (`int`, defaults to `16`): latent channels in (Wan2.1 VAE).
        out_channels (`int`, defaults to `16`): latent channels out.
        num_layers (`int`, defaults to `48`): transformer blocks.
        text_dim (`int`, defaults to `4096`): caption (umT5) width (original ``caption_channels``).
        freq_dim (`int`, defaults to `256`): sinusoidal timestep width (original ``frequency_embedding_size``).
        time_embed_dim (`int`, defaults to `512`): timestep-embedding width feeding every adaLN (original
            ``adaln_tembed_dim``).
        ffn_dim (`int`, defaults to `11008`): SwiGLU hidden width (:func:`longcat_ffn_dim` of hidden and
            ``mlp_ratio``).
        eps (`float`, defaults to `1e-6`): LayerNorm epsilon.
        text_tokens_zero_pad (`bool`, defaults to `True`): with an ``encoder_attention_mask``, zero the embedded
            padding tokens and let every token take part in the cross-attention (the release setting); ``False``
            masks the padding keys out instead.
        rope_theta (`float`, defaults to `10000.0`): RoPE base.

    The forward returns the model output as the original computes it; LongCat's sampler uses its **negation** as
    the flow-matching velocity (``LongCatVideoPipeline`` and DiffSynth-Studio do this).

    Example:
        >>> import torch
        >>> from diffusers_wan_ext import LongCatVideoTransformer3DModel
        >>> model = LongCatVideoTransformer3DModel(num_attention_heads=2, attention_head_dim=24, num_layers=1,
        ...     text_dim=32, freq_dim=32, time_embed_dim=32, ffn_dim=256)
        >>> latents = torch.randn(1, 16, 3, 8, 8)
        >>> out = model(latents, torch.tensor([500.0]), torch.randn(1, 7, 32), num_cond_latents=1).sample
        >>> tuple(out.shape)
        (1, 16, 3, 8, 8)
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embedding", "time_embedder", "norm", "proj_out"]
    _no_split_modules = ["LongCatVideoTransformerBlock"]
    _keep_in_fp32_modules = ["time_embedder", "norm1", "norm2", "norm_out", "proj_out"]
    _repeated_blocks = ["LongCatVideoTransformerBlock"]
    # Split the tokens *within* each frame (dim 2 of [B, T, S, C]), as the original's cp_split_hw does: per-frame
    # modulation and the conditioning-frame split then stay local to every rank.
    _cp_plan = {
        "rope": {
            0: ContextParallelInput(split_dim=2, expected_dims=4, split_output=True),
            1: ContextParallelInput(split_dim=2, expected_dims=4, split_output=True),
        },
        "blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=2, expected_dims=4, split_output=False),
        },
        "proj_out": ContextParallelOutput(gather_dim=2, expected_dims=4),
    }
    # its own _cp_plan splits the tokens within each frame; a padded frame is refused by its processor
    _cp_self_attention_modules: tuple[str, ...] = ("blocks.*.attn1",)
    _sliding_window_unsupported_reason = (
        "its first num_cond_latents latent frames are clean conditioning frames of every forward; long videos come "
        "from LongCat's video continuation (video=, num_cond_frames=)"
    )

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_attention_heads: int = 32,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        num_layers: int = 48,
        text_dim: int = 4096,
        freq_dim: int = 256,
        time_embed_dim: int = 512,
        ffn_dim: int = 11008,
        eps: float = 1e-6,
        text_tokens_zero_pad: bool = True,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        if patch_size[0] != 1:
            raise ValueError(f"LongCat-Video patches single frames: patch_size[0] must be 1, got {patch_size}")
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels

        self.rope = LongCatVideoRotaryPosEmbed(attention_head_dim, theta=rope_theta)
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.time_proj = Timesteps(num_channels=freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(in_channels=freq_dim, time_embed_dim=time_embed_dim)
        self.text_embedder = PixArtAlphaTextProjection(text_dim, inner_dim, act_fn="gelu_tanh")

        self.blocks = nn.ModuleList(
            [
                LongCatVideoTransformerBlock(inner_dim, num_attention_heads, ffn_dim, time_embed_dim, eps)
                for _ in range(num_layers)
            ]
        )

        self.norm_out = LongCatVideoAdaLayerNormZero(time_embed_dim, inner_dim, 2, eps)
        self.proj_out = nn.Linear(inner_dim, out_channels * patch_size[0] * patch_size[1] * patch_size[2])
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------------------------------------ helpers
    def _embed_timestep(self, timestep: torch.Tensor, batch_size: int, num_frames: int, num_cond: int) -> torch.Tensor:
        if timestep.ndim == 0:
            timestep = timestep.expand(batch_size)
        if timestep.ndim == 1:
            if timestep.shape[0] not in (1, batch_size):
                raise ValueError(f"timestep has {timestep.shape[0]} entries for a batch of {batch_size}")
            timestep = timestep.expand(batch_size)[:, None].expand(batch_size, num_frames)
        elif timestep.shape != (batch_size, num_frames):
            raise ValueError(
                f"timestep must be [B] or [B, T] = [{batch_size}, {num_frames}] (one per latent frame); got "
                f"{tuple(timestep.shape)}"
            )
        timestep = timestep.float()
        if num_cond:
            timestep = torch.cat([torch.zeros_like(timestep[:, :num_cond]), timestep[:, num_cond:]], dim=1)
        freq = self.time_proj(timestep.flatten())
        dtype = self.time_embedder.linear_1.weight.dtype
        if dtype != torch.int8 and freq.dtype != dtype:
            freq = freq.to(dtype)
        return self.time_embedder(freq).float().unflatten(0, (batch_size, num_frames))  # [B, T, D_t]

    def _embed_text(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None):
        if encoder_hidden_states.ndim == 4:  # the original's [B, 1, L, C]
            encoder_hidden_states = encoder_hidden_states.squeeze(1)
        context = self.text_embedder(encoder_hidden_states)
        if encoder_attention_mask is None:
            return context, None
        if encoder_attention_mask.shape != context.shape[:2]:
            raise ValueError(
                f"encoder_attention_mask must be [B, L] = {tuple(context.shape[:2])}; got "
                f"{tuple(encoder_attention_mask.shape)}"
            )
        if self.config.text_tokens_zero_pad:  # padding tokens become zeros but still take part in the attention
            return context * encoder_attention_mask[:, :, None].to(context.dtype), None
        return context, encoder_attention_mask

    # ------------------------------------------------------------------------------------------------ forward
    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None = None,
        num_cond_latents: int = 0,
        kv_cache: LongCatKVCache | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """
        Args:
            hidden_states (`torch.Tensor` `[B, C, T, H, W]`): latents; with ``num_cond_latents = K`` the first ``K``
                latent frames are the clean conditioning frames.
            timestep (`torch.Tensor` `[B]` or `[B, T]`): diffusion timestep (0..1000), per sample or per latent
                frame; the conditioning frames always get 0.
            encoder_hidden_states (`torch.Tensor` `[B, L, text_dim]`): umT5 caption embeddings (``None`` only
                while recording a KV cache).
            encoder_attention_mask (`torch.Tensor` `[B, L]`, *optional*): 1 for real caption tokens, 0 for
                padding (see ``text_tokens_zero_pad``).  ``None``: every token is used as given.
            num_cond_latents (`int`): number of leading conditioning latent frames.
            kv_cache (`LongCatKVCache`, *optional*): cached conditioning frames (see :meth:`build_kv_cache`);
                ``hidden_states`` then holds only the noisy frames that follow them.
            attention_kwargs (`dict`, *optional*): ``{"scale": lora_scale}``.
            return_dict (`bool`): return a ``Transformer2DModelOutput``.

        Returns:
            the model output ``[B, out_channels, T, H, W]`` in float32 (the *negated* flow velocity).
        """
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be [B, C, T, H, W]; got {tuple(hidden_states.shape)}")
        b, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        if height % p_h or width % p_w:
            raise ValueError(
                f"latent height {height} and width {width} must be multiples of the patch size ({p_h}, {p_w}): "
                f"the video size must be a multiple of {8 * p_h} pixels with the Wan2.1 VAE"
            )
        num_cond_latents = int(num_cond_latents or 0)
        cached = 0
        if kv_cache is not None:
            cached = 0 if kv_cache.recording else kv_cache.num_latents
            if num_cond_latents and num_cond_latents != kv_cache.num_latents:
                raise ValueError(
                    f"num_cond_latents={num_cond_latents} but the KV cache holds {kv_cache.num_latents} frames; with a "
                    "KV cache, pass only the noisy frames (num_cond_latents is taken from the cache)"
                )
            num_cond_latents = 0
        if not 0 <= num_cond_latents <= num_frames:
            raise ValueError(f"num_cond_latents={num_cond_latents} must be between 0 and the {num_frames} latent frames")
        if encoder_hidden_states is None and not (kv_cache is not None and kv_cache.recording):
            raise ValueError("encoder_hidden_states (the umT5 caption embeddings) is required")

        nt, nh, nw = num_frames // p_t, height // p_h, width // p_w
        rotary_emb = self.rope(cached + nt, nh, nw, hidden_states.device)

        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(hidden_states.to(dtype))  # [B, C, T, H', W']
        x = x.flatten(3).permute(0, 2, 3, 1).contiguous()  # [B, T, S, C]

        temb = self._embed_timestep(timestep, b, nt, num_cond_latents if kv_cache is None else 0)
        context, context_mask = None, None
        if encoder_hidden_states is not None:
            context, context_mask = self._embed_text(encoder_hidden_states.to(dtype), encoder_attention_mask)

        for i, block in enumerate(self.blocks):
            layer_cache = kv_cache.layer(i) if kv_cache is not None else None
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(
                    block, x, context, temb, rotary_emb, context_mask, num_cond_latents, layer_cache
                )
            else:
                x = block(x, context, temb, rotary_emb, context_mask, num_cond_latents, layer_cache)

        shift, scale = self.norm_out(temb)
        x = _modulate(self.norm_out.norm, x, shift, scale)
        x = self.proj_out(x.to(self.proj_out.weight.dtype))  # [B, T, S, p*C]

        x = x.reshape(b, nt, nh, nw, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        output = x.flatten(6, 7).flatten(4, 5).flatten(2, 3).float()
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    @torch.no_grad()
    def build_kv_cache(self, cond_latents: torch.Tensor, attention_kwargs: dict[str, Any] | None = None) -> LongCatKVCache:
        """Run the clean conditioning latents ``[B, C, K, H, W]`` once (timestep 0, no cross-attention) and return
        their per-block keys / values; pass the result as ``kv_cache`` together with the noisy frames only.

        Example:
            >>> cache = model.build_kv_cache(latents[:, :, :2])  # doctest: +SKIP
            >>> out = model(latents[:, :, 2:], t, context, kv_cache=cache).sample  # doctest: +SKIP
        """
        cache = LongCatKVCache(num_latents=cond_latents.shape[2])
        zeros = torch.zeros(cond_latents.shape[0], device=cond_latents.device)
        self.forward(cond_latents, zeros, None, kv_cache=cache, attention_kwargs=attention_kwargs)
        cache.recording = False
        return cache
