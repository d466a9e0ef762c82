"""``WanS2VTransformer3DModel``: the Wan2.2-S2V-14B speech-to-video transformer, built from stock Diffusers Wan parts.

Wan2.2-S2V is a Wan2.1-style DiT (no CLIP branch, 16 latent channels) with four additions, all reproduced here with
the semantics of the original ``WanModel_S2V`` (``wan/modules/s2v/model_s2v.py``) and DiffSynth-Studio's
``WanS2VModel`` / ``model_fn_wans2v`` (the two agree):

* **Reference-frame tokens.**  The VAE latent of the reference image is patch-embedded by the same
  ``patch_embedding`` and appended after the video tokens at RoPE frame position 30.  They, and the motion tokens,
  are modulated with the embedding of timestep 0 (``zero_timestep``) while the video tokens use ``t``
  (:class:`WanS2VTransformerBlock`: two modulation segments).
* **Pose conditioning.**  Pose-video latents go through ``condition_embedder.pose_embedder`` (a patch-sized
  ``Conv3d``) and are added to the video patch embeddings; without a pose video the original adds the embedding of
  zeros (the convolution's bias), as here.
* **Audio.**  Wav2Vec2 hidden states of all layers (``[B, 25, 1024, 4F]``: four audio frames per latent frame) go
  through ``condition_embedder.causal_audio_encoder``: a learned softmax-free layer average (``silu(w) / sum``),
  then a causal 1-D conv stack (two stride-2 convolutions) that yields per latent frame ``num_audio_tokens`` local
  tokens plus a learned padding token, and one global token.  ``motion_frames`` (73) copies of the first audio frame
  are prepended and the first ``(motion_frames + 3) // 4`` (19) outputs dropped.  After the blocks listed in
  ``audio_inject_layers`` the video tokens of each latent frame are normalised by an ``AdaLayerNorm`` driven by that
  frame's global audio token and cross-attend to that frame's audio tokens (``audio_injector``); the result is
  added to the video tokens.
* **Motion memory (FramePack).**  The latents of the last 73 generated frames (19 latent frames) are packed into
  three groups -- the newest latent frame at full resolution, the 2 before at 2x and the 16 before at 4x
  compression (``frame_packer.proj``, ``proj_2x``, ``proj_4x``) -- and appended as tokens with negative RoPE frame
  positions.  The first clip of a video has no history and drops them (``drop_motion_frames``).

Tokens carry a learned type embedding (``trainable_condition_mask``: 0 video, 1 reference, 2 motion).  The head sees
only the video tokens.

Everything else is stock: ``condition_embedder`` subclasses :class:`~diffusers.models.transformers.transformer_wan.
WanTimeTextImageEmbedding`, the blocks subclass :class:`~diffusers.models.transformers.transformer_wan.
WanTransformerBlock`, the audio cross-attention is a stock ``WanAttention``, the AdaLN is Diffusers'
``AdaLayerNorm`` and the rotary tables are stock ``WanRotaryPosEmbed``'s, indexed at the S2V positions.  Weight
names follow Diffusers (and the open Diffusers S2V port: ``condition_embedder.causal_audio_encoder``,
``condition_embedder.pose_embedder``, ``trainable_condition_mask``, ``audio_injector.injector.N.to_q``); the
original layout converts with :mod:`diffusers_wan_ext.conversion.dit`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import AdaLayerNorm, FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanRotaryPosEmbed,
    WanTimeTextImageEmbedding,
    WanTransformerBlock,
)
from diffusers.utils.peft_utils import apply_lora_scale

from ..utils.shims import ShimSaveMixin

__all__ = [
    "FRAMEPACK_BUCKETS",
    "REFERENCE_ROPE_FRAME",
    "WanS2VCausalAudioEncoder",
    "WanS2VFramePacker",
    "WanS2VTransformer3DModel",
    "WanS2VTransformerBlock",
    "audio_injector_layout",
]

#: RoPE frame position of the reference-image tokens (original ``ref_grid_sizes``: frames 30..31).
REFERENCE_ROPE_FRAME = 30
#: FramePack groups, newest first: (latent frames, compression).  1 frame at 1x, 2 at 2x, 16 at 4x = 19 latent
#: frames of history (73 video frames), as ``FramePackMotioner(zip_frame_buckets=[1, 2, 16])``.
FRAMEPACK_BUCKETS: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (16, 4))
_FRAMEPACK_PROJ = ("proj", "proj_2x", "proj_4x")
#: Release values (``wan/configs/wan_s2v_14B.py``).
RELEASE_AUDIO_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)


def audio_injector_layout(num_layers: int, inject_layers: Sequence[int]) -> tuple[int, dict[int, int]]:
    """How many audio injectors the original model builds and which one runs after each block.

    The original (``AudioInjector_WAN``, in upstream Wan2.2 and DiffSynth alike) walks the blocks, named
    ``root.transformer_blocks.{j}``, and for every ``i`` in ``inject_layers`` whose ``transformer_blocks.{i}`` is a
    *substring* of that name creates one injector and maps ``i`` to it (a later match overwrites).  For the release
    (40 blocks, layers ``0, 4, ..., 39``) that is one injector per listed layer; with e.g. layer 1 and 12 blocks,
    blocks 1, 10 and 11 all match and layer 1 uses the last injector.  We rebuild exactly that so release-layout
    weights load one-to-one.

    Example:
        >>> audio_injector_layout(40, [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39])[0]
        12
        >>> audio_injector_layout(12, [0, 1])
        (4, {0: 0, 1: 3})
    """
    slots: dict[int, int] = {}
    count = 0
    for j in range(num_layers):
        name = f"root.transformer_blocks.{j}"
        for i in inject_layers:
            if f"transformer_blocks.{i}" in name:
                slots[int(i)] = count
                count += 1
    return count, slots


def _grid_positions(start: Sequence[int], end: Sequence[int], extent: Sequence[int]) -> torch.Tensor:
    """RoPE positions ``[n_f * n_h * n_w, 3]`` (frame, row, column) of one token grid, as the original
    ``rope_precompute``: ``n = end - start`` tokens per axis spread over ``extent`` positions from ``start``
    (``linspace`` truncated to integers); a negative ``start`` frame counts backwards (negative frame positions)."""
    axes = []
    for o, e, t in zip(start, end, extent):
        n = int(e) - int(o)
        if o >= 0:
            idx = np.linspace(o, t + o - 1, n).astype(int)
        else:
            idx = -np.linspace(-o, -t - o + 1, n).astype(int)
        axes.append(torch.from_numpy(idx.astype(np.int64)))
    grid = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


class WanS2VRotaryPosEmbed(WanRotaryPosEmbed):
    """Stock Wan rotary tables, looked up at explicit (frame, row, column) positions (frames may be negative).

    ``forward(positions)`` returns ``(cos, sin)`` of shape ``[1, L, 1, head_dim]`` for stock ``WanAttnProcessor``;
    a negative position ``-p`` uses the conjugate rotation of ``p`` (``sin`` negated), as the original's
    ``freqs.conj()``.
    """

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        split = [self.t_dim, self.h_dim, self.w_dim]
        positions = positions.to(self.freqs_cos.device)
        # a data-dependent check: eager only (a compiled graph indexes past the table as eager would have refused)
        if (not torch.compiler.is_compiling() and positions.numel()
                and int(positions.abs().max()) >= self.freqs_cos.shape[0]):
            raise ValueError(
                f"RoPE position {int(positions.abs().max())} exceeds rope_max_seq_len={self.freqs_cos.shape[0]}: the "
                "latent grid is too large for this transformer's rotary tables"
            )
        cos_parts, sin_parts = [], []
        for axis, (cos, sin) in enumerate(zip(self.freqs_cos.split(split, dim=1), self.freqs_sin.split(split, dim=1))):
            p = positions[:, axis]
            idx = p.abs()
            cos_parts.append(cos[idx])
            s = sin[idx]
            sin_parts.append(torch.where((p < 0).unsqueeze(1), -s, s))
        cos = torch.cat(cos_parts, dim=1)[None, :, None, :]
        sin = torch.cat(sin_parts, dim=1)[None, :, None, :]
        return cos, sin


class WanS2VCausalConv1d(nn.Module):
    """``Conv1d`` with causal (left, replicate) padding of ``kernel_size - 1`` frames; weights under ``conv``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))


def _norm_silu(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, T]``: LayerNorm over ``C`` (no affine, eps 1e-6) and SiLU; returns ``[N, C, T]``."""
    return F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)).transpose(1, 2)


class WanS2VAudioConvStack(nn.Module):
    """The original ``MotionEncoder_tc``: causal conv stack from layer-averaged audio features to audio tokens.

    Local branch: ``conv1_local`` makes ``num_tokens`` feature groups of ``dim // 4`` channels, each downsampled 4x
    in time by the shared ``conv2`` / ``conv3`` (LayerNorm + SiLU after each), plus a learned ``padding_tokens``
    -> ``[B, T/4, num_tokens + 1, dim]``.  Global branch (``need_global``): ``conv1_global`` -> the same
    ``conv2`` / ``conv3`` -> ``final_linear`` -> ``[B, T/4, 1, dim]``.
    """

    def __init__(self, in_dim: int, dim: int, num_tokens: int, need_global: bool = True) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = WanS2VCausalConv1d(in_dim, dim // 4 * num_tokens, 3)
        self.conv1_global = WanS2VCausalConv1d(in_dim, dim // 4, 3) if need_global else None
        self.conv2 = WanS2VCausalConv1d(dim // 4, dim // 2, 3, stride=2)
        self.conv3 = WanS2VCausalConv1d(dim // 2, dim, 3, stride=2)
        self.final_linear = nn.Linear(dim, dim) if need_global else None
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, dim/4, T]`` (after ``conv1_*``) -> ``[N, T', dim]``."""
        x = _norm_silu(x)
        x = _norm_silu(self.conv2(x))
        return _norm_silu(self.conv3(x)).transpose(1, 2)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``features [B, C_audio, T]`` -> ``(global [B, T', 1, dim] or None, local [B, T', num_tokens + 1, dim])``."""
        b, _, t = features.shape
        local = self.conv1_local(features)
        local = local.reshape(b * self.num_tokens, -1, t)  # 'b (n c) t -> (b n) c t'
        local = self._downsample(local)
        local = local.reshape(b, self.num_tokens, *local.shape[1:]).transpose(1, 2)  # '(b n) t c -> b t n c'
        pad = self.padding_tokens.to(local.dtype).expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, pad], dim=2)
        if self.conv1_global is None:
            return None, local
        glob = self.final_linear(self._downsample(self.conv1_global(features)))
        return glob.unsqueeze(2), local


class WanS2VCausalAudioEncoder(nn.Module):
    """The original ``CausalAudioEncoder``: weighted average of the Wav2Vec2 layers, then :class:`WanS2VAudioConvStack`.

    ``weights`` (``[1, num_layers, 1, 1]``) are mixed as ``silu(w) / sum(silu(w))``.
    """

    def __init__(
        self, audio_dim: int, dim: int, num_tokens: int, num_layers: int = 25, need_global: bool = True
    ) -> None:
        super().__init__()
        self.encoder = WanS2VAudioConvStack(audio_dim, dim, num_tokens, need_global)
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``features [B, num_layers, C_audio, T]`` -> ``(global, local)`` audio tokens (see the conv stack)."""
        w = F.silu(self.weights.to(device=features.device, dtype=features.dtype))
        mixed = ((features * w) / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, C_audio, T]
        return self.encoder(mixed)


class WanTimeTextAudioPoseEmbedding(WanTimeTextImageEmbedding):
    """Stock Wan time / text embedding plus the S2V audio encoder (``causal_audio_encoder``) and pose patch
    embedding (``pose_embedder``; ``None`` when ``pose_embed_dim`` is 0).  The stock ``forward`` is unchanged; the
    model calls the two additions directly."""

    def __init__(
        self,
        dim: int,
        time_freq_dim: int,
        time_proj_dim: int,
        text_embed_dim: int,
        audio_embed_dim: int,
        num_audio_tokens: int,
        audio_num_layers: int,
        pose_embed_dim: int,
        patch_size: Sequence[int],
        enable_adain: bool = True,
    ) -> None:
        super().__init__(dim, time_freq_dim, time_proj_dim, text_embed_dim)
        self.causal_audio_encoder = WanS2VCausalAudioEncoder(
            audio_embed_dim, dim, num_audio_tokens, num_layers=audio_num_layers, need_global=enable_adain
        )
        self.pose_embedder = None
        if pose_embed_dim:
            self.pose_embedder = nn.Conv3d(pose_embed_dim, dim, kernel_size=patch_size, stride=patch_size)


class WanS2VFramePacker(nn.Module):
    """FramePack motion memory (original ``FramePackMotioner``): the last 19 motion latent frames as tokens.

    The history is right-aligned into ``1 + 2 + 16`` latent frames (zero-padded in front when shorter); the newest
    frame is patch-embedded by ``proj`` (the DiT patch), the 2 before by ``proj_2x`` (2x the patch in every axis),
    the 16 before by ``proj_4x`` (4x).  Their RoPE frames are ``-1``, ``-3`` and ``-19, -14, -9, -4``; rows and
    columns are spread over the full-resolution grid.

    ``add_last_motion`` (2 = all groups) reproduces the original's option to leave out the newest groups: with
    ``drop_mode="padd"`` their latents are zeroed, with ``"drop"`` their tokens are removed.
    """

    def __init__(
        self, in_channels: int, inner_dim: int, patch_size: Sequence[int], drop_mode: str = "padd"
    ) -> None:
        super().__init__()
        if drop_mode not in ("padd", "drop"):
            raise ValueError(f"framepack_drop_mode must be 'padd' or 'drop', got {drop_mode!r}")
        self.drop_mode = drop_mode
        self.patch_size = tuple(int(p) for p in patch_size)
        for name, (_, c) in zip(_FRAMEPACK_PROJ, FRAMEPACK_BUCKETS):
            kernel = tuple(p * c for p in self.patch_size)
            setattr(self, name, nn.Conv3d(in_channels, inner_dim, kernel_size=kernel, stride=kernel))

    @property
    def history_frames(self) -> int:
        """Latent frames of history the packer reads (19)."""
        return sum(n for n, _ in FRAMEPACK_BUCKETS)

    def _dropped(self, group: int, add_last_motion: int) -> bool:
        return group < 2 - add_last_motion

    def forward(self, motion_latents: torch.Tensor, add_last_motion: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """``motion_latents [B, C, T_m, H, W]`` -> ``(tokens [B, L, D], RoPE positions [L, 3])``."""
        b, c, t, lat_h, lat_w = motion_latents.shape
        need_h, need_w = (p * FRAMEPACK_BUCKETS[-1][1] for p in self.patch_size[1:])  # the 4x group's kernel
        if lat_h < need_h or lat_w < need_w:
            raise ValueError(
                f"Wan2.2-S2V's motion-frame packer needs latents of at least {need_h}x{need_w} (height x width; "
                f"{need_h * 8}x{need_w * 8} pixels with the Wan2.1 VAE), got {lat_h}x{lat_w}: generate a larger video"
            )
        total = self.history_frames
        padded = motion_latents.new_zeros(b, c, total, lat_h, lat_w)
        n = min(total, t)
        if n > 0:
            padded[:, :, -n:] = motion_latents[:, :, -n:]
        if self.drop_mode == "padd":
            zeroed = sum(f for g, (f, _) in enumerate(FRAMEPACK_BUCKETS) if self._dropped(g, add_last_motion))
            if zeroed:
                padded[:, :, -zeroed:] = 0
        groups = padded.split([f for f, _ in FRAMEPACK_BUCKETS][::-1], dim=2)[::-1]  # newest group first
        pt, ph, pw = self.patch_size
        tokens, positions = [], []
        start = 0
        for g, ((frames, comp), name, latents) in enumerate(zip(FRAMEPACK_BUCKETS, _FRAMEPACK_PROJ, groups)):
            start -= frames
            if self.drop_mode == "drop" and self._dropped(g, add_last_motion):
                continue
            tokens.append(getattr(self, name)(latents).flatten(2).transpose(1, 2))
            positions.append(_grid_positions(
                (start, 0, 0),
                (start + frames // comp, lat_h // (ph * comp), lat_w // (pw * comp)),
                (frames, lat_h // ph, lat_w // pw),
            ))
        return torch.cat(tokens, dim=1), torch.cat(positions, dim=0)


class WanS2VAudioInjector(nn.Module):
    """Per-frame audio cross-attention after the blocks of ``inject_layers`` (original ``AudioInjector_WAN``).

    ``injector`` holds stock ``WanAttention`` cross-attentions (q/k RMS norm), ``injector_adain_layers`` Diffusers
    ``AdaLayerNorm`` (SiLU + Linear to shift / scale, LayerNorm eps 1e-5) when ``enable_adain``; without AdaLN the
    video tokens are layer-normalised (eps 1e-6) instead.  See :func:`audio_injector_layout` for the module count.
    """

    def __init__(
        self, dim: int, num_heads: int, num_layers: int, inject_layers: Sequence[int], enable_adain: bool, eps: float
    ) -> None:
        super().__init__()
        count, self.slots = audio_injector_layout(num_layers, inject_layers)
        head_dim = dim // num_heads
        self.injector = nn.ModuleList([
            WanAttention(dim=dim, heads=num_heads, dim_head=head_dim, eps=eps, cross_attention_dim_head=head_dim,
                         processor=WanAttnProcessor())
            for _ in range(count)
        ])
        self.injector_adain_layers = None
        if enable_adain:
            self.injector_adain_layers = nn.ModuleList(
                [AdaLayerNorm(dim, output_dim=2 * dim, chunk_dim=1) for _ in range(count)]
            )

    def forward(
        self,
        layer: int,
        hidden_states: torch.Tensor,
        num_video_tokens: int,
        audio_tokens: torch.Tensor,
        audio_global: torch.Tensor | None,
    ) -> torch.Tensor:
        """Add the audio cross-attention after block ``layer`` (identity for other blocks).

        ``audio_tokens [B, F, n, D]`` / ``audio_global [B, F, 1, D]``: per latent frame ``F``; the first
        ``num_video_tokens`` tokens of ``hidden_states`` are the ``F`` frames' video tokens in order.
        """
        slot = self.slots.get(layer)
        if slot is None:
            return hidden_states
        b, frames = audio_tokens.shape[:2]
        video = hidden_states[:, :num_video_tokens]
        x = video.reshape(b * frames, num_video_tokens // frames, video.shape[-1])
        if self.injector_adain_layers is not None:
            x = self.injector_adain_layers[slot](x, temb=audio_global.reshape(b * frames, -1).to(x.dtype))
        else:
            x = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
        context = audio_tokens.reshape(b * frames, audio_tokens.shape[2], -1).to(x.dtype)
        out = self.injector[slot](x, context).reshape(video.shape)
        return torch.cat([video + out, hidden_states[:, num_video_tokens:]], dim=1)


class WanS2VTransformerBlock(WanTransformerBlock):
    """Stock ``WanTransformerBlock`` with two modulation segments.

    With ``num_video_tokens`` and ``temb`` of shape ``[B, 2, 6, D]``, the first ``num_video_tokens`` tokens are
    modulated with ``temb[:, 0]`` (the diffusion timestep) and the rest -- reference and motion tokens -- with
    ``temb[:, 1]`` (timestep 0), as the original ``WanS2VAttentionBlock``.  Without ``num_video_tokens`` it is the
    stock block.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        num_video_tokens: int | None = None,
    ) -> torch.Tensor:
        if num_video_tokens is None:
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        mod = self.scale_shift_table.unsqueeze(1) + temb.float()  # [B, 2, 6, D]
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = mod.unbind(2)  # each [B, 2, D]
        seg = (num_video_tokens, hidden_states.shape[1] - num_video_tokens)

        def per_segment(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
            parts = []
            for i, part in enumerate(x.split(seg, dim=1)):
                part = part * scale[:, i : i + 1]
                parts.append(part if shift is None else part + shift[:, i : i + 1])
            return torch.cat(parts, dim=1)

        # 1. Self-attention
        norm_hidden_states = per_segment(self.norm1(hidden_states.float()), 1 + scale_msa, shift_msa)
        attn_output = self.attn1(norm_hidden_states.type_as(hidden_states), None, None, rotary_emb)
        hidden_states = (hidden_states.float() + per_segment(attn_output, gate_msa)).type_as(hidden_states)

        # 2. Cross-attention
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, None, None)
        hidden_states = hidden_states + attn_output

        # 3. Feed-forward
        norm_hidden_states = per_segment(self.norm3(hidden_states.float()), 1 + c_scale_msa, c_shift_msa)
        ff_output = self.ffn(norm_hidden_states.type_as(hidden_states))
        hidden_states = (hidden_states.float() + per_segment(ff_output.float(), c_gate_msa)).type_as(hidden_states)
        return hidden_states


def _match_batch(t: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    if t.shape[0] == batch_size:
        return t
    if t.shape[0] == 1:
        return t.expand(batch_size, *t.shape[1:])
    raise ValueError(f"{name} has batch {t.shape[0]}, expected 1 or the latent batch {batch_size}")


def _block_then_audio_injection(
    block: WanS2VTransformerBlock,
    injector: WanS2VAudioInjector,
    layer: int,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    rotary_emb: tuple[torch.Tensor, torch.Tensor],
    segments: int | None,
    num_video_tokens: int,
    audio_tokens: torch.Tensor,
    audio_global: torch.Tensor | None,
) -> torch.Tensor:
    """Block ``layer`` and the audio injection after it (identity for blocks without one): one checkpointed unit."""
    hidden_states = block(hidden_states, encoder_hidden_states, temb, rotary_emb, segments)
    return injector(layer, hidden_states, num_video_tokens, audio_tokens, audio_global)


class WanS2VTransformer3DModel(
    ShimSaveMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin
):
    r"""
    The Wan2.2-S2V-14B speech-to-video transformer (see the module docstring for what it adds to a Wan DiT).

    Args:
        patch_size, num_attention_heads, attention_head_dim, in_channels, out_channels, text_dim, freq_dim, ffn_dim,
        num_layers, cross_attn_norm, qk_norm, eps, rope_max_seq_len:
            as in :class:`diffusers.WanTransformer3DModel` (release: 40 heads of 128, 40 layers, 16 channels).
        audio_dim (`int`, defaults to 1024): width of the Wav2Vec2 hidden states (wav2vec2-large: 1024).
        audio_num_layers (`int`, defaults to 25): Wav2Vec2 hidden states averaged (embeddings + 24 layers).
        num_audio_tokens (`int`, defaults to 4): local audio tokens per latent frame (plus one padding token).
        audio_inject_layers (`list[int]`): blocks after which audio cross-attention runs (release: 0, 4, ..., 24,
            27, ..., 39); see :func:`audio_injector_layout`.
        enable_adain (`bool`, defaults to `True`): AdaLN on the global audio token before the audio attention.
        pose_dim (`int`, defaults to 16): channels of the pose latents (0: no pose embedding).
        motion_frames (`int`, defaults to 73): video frames of motion history (``(motion_frames + 3) // 4`` latent
            frames; 73 -> 19); also the number of leading copies of the first audio frame.
        zero_timestep (`bool`, defaults to `True`): reference and motion tokens are modulated with timestep 0.
        add_last_motion (`bool`, defaults to `True`): use the newest FramePack groups (the original's option).
        framepack_drop_mode (`str`, defaults to `"padd"`): how ``add_last_motion=False`` leaves groups out.

    Example:
        >>> import torch
        >>> from diffusers_wan_ext import WanS2VTransformer3DModel
        >>> model = WanS2VTransformer3DModel(num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32,
        ...     ffn_dim=96, num_layers=3, audio_dim=32, audio_inject_layers=[0, 2])
        >>> out = model(
        ...     torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0]), torch.randn(1, 16, 32),
        ...     audio_embeds=torch.randn(1, 25, 32, 12),  # 4 audio frames per latent frame
        ...     image_latents=torch.randn(1, 16, 1, 8, 8),  # reference image latent
        ...     motion_latents=torch.randn(1, 16, 19, 8, 8), return_dict=False,
        ... )[0]
        >>> tuple(out.shape)
        (1, 16, 3, 8, 8)
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm", "frame_packer"]
    _no_split_modules = ["WanS2VTransformerBlock"]
    _keep_in_fp32_modules = [
        "rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "causal_audio_encoder",
    ]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]
    _repeated_blocks = ["WanS2VTransformerBlock"]
    _cp_plan = None
    _cp_unsupported_reason = "its audio injection and FramePack motion tokens need the full token sequence"
    _sliding_window_unsupported_reason = (
        "its audio features and FramePack motion frames are tied to the whole clip; long videos come from the "
        "pipeline's clip chaining (num_clips)"
    )
    _cp_self_attention_modules: tuple[str, ...] = ("blocks.*.attn1",)

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_max_seq_len: int = 1024,
        audio_dim: int = 1024,
        audio_num_layers: int = 25,
        num_audio_tokens: int = 4,
        audio_inject_layers: Sequence[int] = RELEASE_AUDIO_INJECT_LAYERS,
        enable_adain: bool = True,
        pose_dim: int = 16,
        motion_frames: int = 73,
        zero_timestep: bool = True,
        add_last_motion: bool = True,
        framepack_drop_mode: str = "padd",
    ) -> None:
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels

        self.rope = WanS2VRotaryPosEmbed(attention_head_dim, patch_size, rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.condition_embedder = WanTimeTextAudioPoseEmbedding(
            dim=inner_dim,
            time_freq_dim=freq_dim,
            time_proj_dim=inner_dim * 6,
            text_embed_dim=text_dim,
            audio_embed_dim=audio_dim,
            num_audio_tokens=num_audio_tokens,
            audio_num_layers=audio_num_layers,
            pose_embed_dim=pose_dim,
            patch_size=patch_size,
            enable_adain=enable_adain,
        )
        self.trainable_condition_mask = nn.Embedding(3, inner_dim)
        self.frame_packer = WanS2VFramePacker(in_channels, inner_dim, patch_size, framepack_drop_mode)

        self.blocks = nn.ModuleList([
            WanS2VTransformerBlock(inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps)
            for _ in range(num_layers)
        ])
        self.audio_injector = WanS2VAudioInjector(
            inner_dim, num_attention_heads, num_layers, audio_inject_layers, enable_adain, eps
        )

        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * int(np.prod(patch_size)))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

        self.gradient_checkpointing = False

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        """Each block is checkpointed together with the audio injection after it: the forward passes the injection
        as ``audio_injection=(audio_injector, layer, num_video_tokens, audio_tokens, audio_global)`` and both run
        inside one checkpoint.  The injection's own activations are then recomputed in the backward instead of
        being kept (AdaLN input, fp32 LoRA inputs of ``to_q`` / ``to_out``, fp32 q norm, attention q / output:
        about 9x the video tokens x width in bf16 per injection, 33 GiB over the release's 12 at 480x832x81);
        results are bit-identical."""
        func = gradient_checkpointing_func or torch.utils.checkpoint.checkpoint

        def checkpoint_block(block: nn.Module, *args: Any, audio_injection: tuple | None = None) -> torch.Tensor:
            if audio_injection is None:
                return func(block, *args)
            injector, layer, *audio = audio_injection
            return func(functools.partial(_block_then_audio_injection, block, injector, layer), *args, *audio)

        super()._set_gradient_checkpointing(enable, checkpoint_block)

    # ------------------------------------------------------------------------------------------------ parts
    @property
    def motion_latent_frames(self) -> int:
        """Latent frames of the motion history (19 for the release's 73 motion frames)."""
        return (self.config.motion_frames + 3) // 4

    def encode_audio(self, audio_embeds: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Audio tokens per latent frame from Wav2Vec2 features ``[B, audio_num_layers, audio_dim, 4F]``.

        Returns ``(global [B, F, 1, D] or None, local [B, F, num_audio_tokens + 1, D])``: ``motion_frames`` copies
        of the first audio frame are prepended (the history's audio), and the outputs that cover them dropped.
        """
        cfg = self.config
        if audio_embeds.ndim != 4 or tuple(audio_embeds.shape[1:3]) != (cfg.audio_num_layers, cfg.audio_dim):
            raise ValueError(
                f"audio_embeds must be [B, {cfg.audio_num_layers}, {cfg.audio_dim}, T] (the Wav2Vec2 hidden states of "
                f"all layers, 4 audio frames per latent frame), got {tuple(audio_embeds.shape)}"
            )
        encoder = self.condition_embedder.causal_audio_encoder
        audio = audio_embeds.to(encoder.weights.dtype)
        audio = torch.cat([audio[..., :1].expand(*audio.shape[:-1], cfg.motion_frames), audio], dim=-1)
        audio_global, audio_local = encoder(audio)
        skip = self.motion_latent_frames
        return (None if audio_global is None else audio_global[:, skip:]), audio_local[:, skip:]

    def _positions(self, grid: tuple[int, int, int], ref_grid: tuple[int, int]) -> torch.Tensor:
        f, h, w = grid
        rh, rw = ref_grid
        video = _grid_positions((0, 0, 0), (f, h, w), (f, h, w))
        ref = _grid_positions((REFERENCE_ROPE_FRAME, 0, 0), (REFERENCE_ROPE_FRAME + 1, rh, rw), (1, rh, rw))
        return torch.cat([video, ref], dim=0)

    def _check_inputs(self, hidden_states, image_latents, pose_latents, motion_latents) -> None:
        cfg = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be the noisy video latents [B, {cfg.in_channels}, F, H, W] (without the "
                f"reference frame), got {tuple(hidden_states.shape)}"
            )
        _, c, f, h, w = hidden_states.shape
        if image_latents is None or image_latents.ndim != 5 or image_latents.shape[1:3] != (c, 1):
            shape = None if image_latents is None else tuple(image_latents.shape)
            raise ValueError(
                f"image_latents must be the reference image's VAE latent [B, {c}, 1, H, W], got {shape}"
            )
        if pose_latents is not None:
            if self.condition_embedder.pose_embedder is None:
                raise ValueError("pose_latents given, but this transformer has no pose embedding (pose_dim=0)")
            want = (cfg.pose_dim, f, h, w)
            if pose_latents.ndim != 5 or tuple(pose_latents.shape[1:]) != want:
                raise ValueError(
                    f"pose_latents must be [B, {want[0]}, {f}, {h}, {w}] (VAE latents of the pose video, one per "
                    f"video latent frame), got {tuple(pose_latents.shape)}"
                )
        if motion_latents is not None and (motion_latents.ndim != 5 or motion_latents.shape[1] != c
                                           or tuple(motion_latents.shape[3:]) != (h, w)):
            raise ValueError(
                f"motion_latents must be [B, {c}, T, {h}, {w}] (VAE latents of the previous {cfg.motion_frames} "
                f"frames: {self.motion_latent_frames} latent frames), got {tuple(motion_latents.shape)}"
            )

    # ---------------------------------------------------------------------------------------------- forward
    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        audio_embeds: torch.Tensor,
        image_latents: torch.Tensor,
        pose_latents: torch.Tensor | None = None,
        motion_latents: torch.Tensor | None = None,
        drop_motion_frames: bool = False,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, in_channels, F, H, W)`): noisy video latents.
            timestep (`torch.Tensor` of shape `(B,)` or `()`): diffusion timestep in [0, 1000].
            encoder_hidden_states (`torch.Tensor` of shape `(B, L, text_dim)`): umT5 context.
            audio_embeds (`torch.Tensor` of shape `(B, audio_num_layers, audio_dim, 4F)`):
                Wav2Vec2 hidden states of all layers at 4 audio frames per latent frame (see
                :func:`diffusers_wan_ext.pipelines.s2v_audio.audio_embeds_per_clip`); zeros for the negative pass.
            image_latents (`torch.Tensor` of shape `(B or 1, in_channels, 1, H, W)`): reference image latent.
            pose_latents (`torch.Tensor` of shape `(B or 1, pose_dim, F, H, W)`, *optional*): pose-video latents;
                ``None`` adds the embedding of zeros, as the original without a pose video.
            motion_latents (`torch.Tensor` of shape `(B or 1, in_channels, T, H, W)`, *optional*): latents of the
                motion history (the last 19 latent frames are used); ``None`` means no motion tokens.
            drop_motion_frames (`bool`, defaults to `False`): leave the motion tokens out (the first clip).
            return_dict, attention_kwargs: as in :meth:`diffusers.WanTransformer3DModel.forward`.

        Returns:
            The velocity of the video latents, shape `(B, out_channels, F, H, W)` (the reference frame is not part
            of the output).
        """
        self._check_inputs(hidden_states, image_latents, pose_latents, motion_latents)
        cfg = self.config
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = cfg.patch_size
        grid = (num_frames // p_t, height // p_h, width // p_w)

        # audio tokens, one group per latent frame
        audio_global, audio_tokens = self.encode_audio(audio_embeds)
        if audio_tokens.shape[1] != grid[0]:
            raise ValueError(
                f"audio_embeds has {audio_embeds.shape[-1]} audio frames -> {audio_tokens.shape[1]} latent frames, "
                f"but hidden_states has {grid[0]}: pass {4 * grid[0]} audio frames (4 per latent frame)"
            )
        audio_tokens = _match_batch(audio_tokens, batch_size, "audio_embeds")
        if audio_global is not None:
            audio_global = _match_batch(audio_global, batch_size, "audio_embeds")

        # video tokens (+ pose), reference tokens, motion tokens
        x = self.patch_embedding(hidden_states)
        pose_embedder = self.condition_embedder.pose_embedder
        if pose_latents is not None:
            x = x + pose_embedder(pose_latents.to(pose_embedder.weight.dtype)).to(x.dtype)
        elif pose_embedder is not None:  # the original embeds zero pose latents: the bias
            x = x + pose_embedder.bias.to(x.dtype).view(1, -1, 1, 1, 1)
        x = x.flatten(2).transpose(1, 2)
        num_video_tokens = x.shape[1]

        ref = self.patch_embedding(image_latents.to(x.dtype))
        ref_grid = tuple(ref.shape[3:])
        ref = _match_batch(ref.flatten(2).transpose(1, 2), batch_size, "image_latents")
        parts, positions = [x, ref], [self._positions(grid, ref_grid)]
        kinds = [0] * num_video_tokens + [1] * ref.shape[1]
        if motion_latents is not None and not drop_motion_frames:
            add_last_motion = 2 if cfg.add_last_motion else 0
            motion, motion_positions = self.frame_packer(motion_latents.to(x.dtype), add_last_motion)
            parts.append(_match_batch(motion, batch_size, "motion_latents"))
            positions.append(motion_positions)
            kinds += [2] * motion.shape[1]
        x = torch.cat(parts, dim=1)
        kinds = torch.tensor(kinds, device=x.device)
        x = (x + self.trainable_condition_mask(kinds).to(x.dtype)).contiguous()
        rotary_emb = self.rope(torch.cat(positions, dim=0))

        # timestep: video tokens use t, reference / motion tokens t = 0
        timestep = timestep.reshape(-1).expand(batch_size) if timestep.numel() == 1 else timestep.reshape(-1)
        if timestep.shape[0] != batch_size:
            raise ValueError(f"timestep must have one value per sample ({batch_size}), got {tuple(timestep.shape)}")
        if cfg.zero_timestep:
            timestep = torch.cat([timestep, timestep.new_zeros(1)])
        temb, timestep_proj, encoder_hidden_states, _ = self.condition_embedder(timestep, encoder_hidden_states)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        segments = None
        if cfg.zero_timestep:
            temb = temb[:batch_size]
            zero = timestep_proj[batch_size:].expand(batch_size, -1, -1)
            timestep_proj = torch.stack([timestep_proj[:batch_size], zero], dim=1)  # [B, 2, 6, D]
            segments = num_video_tokens

        for i, block in enumerate(self.blocks):
            args = (x, encoder_hidden_states, timestep_proj, rotary_emb, segments)
            audio = (num_video_tokens, audio_tokens, audio_global)
            if torch.is_grad_enabled() and self.gradient_checkpointing:  # block + injection: one checkpoint
                x = self._gradient_checkpointing_func(block, *args, audio_injection=(self.audio_injector, i, *audio))
            else:
                x = self.audio_injector(i, block(*args), *audio)

        # head on the video tokens
        x = x[:, :num_video_tokens]
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(x.device), scale.to(x.device)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)

        x = x.reshape(batch_size, *grid, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        output = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
