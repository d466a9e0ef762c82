"""``MovaDualTowerBridge``: MOVA's dual-tower bridge (openmoss/MOVA-360p / MOVA-720p ``dual_tower_bridge/``).

Before each interaction layer ``i`` of the joint forward, the bridge lets each tower read the other one:
``v <- v + a2v_i(v, a)`` and ``a <- a + v2a_i(a, v)``, both from the pre-bridge states.  A conditioner
(:class:`MovaBridgeCrossAttention`, DiffSynth's ``ConditionalCrossAttentionBlock``) is

``cond(x, c) = to_out(attn(rope_x(norm_q(to_q(x))), rope_c(norm_k(to_k(LN(c)))), to_v(LN(c))))``

with ``LN`` an affine LayerNorm of the condition stream (``norm_context``), RMSNorms over the full width before the
head split, ``width / head_dim`` heads and no mask.  Its RoPE is *not* Wan's: HF-style rotate-half over the two
halves of a head, ``inv_freq = theta^(-arange(0, d, 2) / d)``; positions count audio latents -- audio token ``j`` is
at ``j`` and every video token of latent frame ``f`` at ``f * audio_fps * 4 / frame_rate`` (4 = the video VAE's
temporal stride).  Weight names follow Diffusers' attention (``to_q`` ... ``to_out.0``); the release layout
converts with :mod:`diffusers_wan_ext.conversion.mova`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from ..utils.shims import ShimSaveMixin

__all__ = ["INTERACTION_STRATEGIES", "MovaBridgeCrossAttention", "MovaBridgeOutput", "MovaDualTowerBridge",
           "interaction_layers", "rotate_half_rope"]

#: The reference's interaction strategies (which of the first ``min(visual, audio)`` layers get a conditioner).
INTERACTION_STRATEGIES = ("full", "shallow_focus", "distributed", "progressive", "custom")


def interaction_layers(strategy: str, visual_layers: int, audio_layers: int) -> list[int]:
    """The layer indices that carry a conditioner pair under ``strategy`` (DiffSynth's
    ``CrossModalInteractionController``)."""
    n = min(visual_layers, audio_layers)
    if strategy == "full":
        return list(range(n))
    if strategy == "shallow_focus":
        return list(range(min(10, n // 3)))
    if strategy == "distributed":
        return list(range(0, n, 3))
    if strategy == "progressive":
        return list(range(min(8, n))) + (list(range(8, n, 3)) if n > 8 else [])
    if strategy == "custom":
        return [i for i in (0, 2, 4, 6, 8, 12, 16, 20) if i < n]
    raise ValueError(f"interaction_strategy {strategy!r} is not one of {', '.join(INTERACTION_STRATEGIES)}")


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` ``[B, L, H, D]`` and ``cos`` / ``sin`` ``[1, L, D]``."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class MovaBridgeOutput(BaseOutput):
    """Both streams after one interaction layer.

    Args:
        visual_hidden_states: video tokens ``[B, N_v, D_v]``.
        audio_hidden_states: audio tokens ``[B, L, D_a]``.
    """

    visual_hidden_states: torch.Tensor = None
    audio_hidden_states: torch.Tensor = None


class MovaBridgeCrossAttention(nn.Module):
    """One conditioner: the primary stream (``dim`` wide) attends to the LayerNormed condition stream.

    Args:
        dim: primary width (queries, output).
        context_dim: condition width (keys / values).
        num_heads: ``dim // head_dim``.
        eps: epsilon of the LayerNorm and the RMSNorms.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads = num_heads
        self.norm_context = nn.LayerNorm(context_dim, eps=eps)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim)
        self.to_v = nn.Linear(context_dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        context_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The update of ``hidden_states`` ``[B, N, dim]`` from ``context`` ``[B, M, context_dim]``."""
        context = self.norm_context(context)
        query = self.norm_q(self.to_q(hidden_states)).unflatten(2, (self.heads, -1))
        key = self.norm_k(self.to_k(context)).unflatten(2, (self.heads, -1))
        value = self.to_v(context).unflatten(2, (self.heads, -1))
        if rotary is not None:
            query = rotate_half_rope(query, *rotary)
        if context_rotary is not None:
            key = rotate_half_rope(key, *context_rotary)
        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).type_as(query)
        return self.to_out[1](self.to_out[0](out))


class MovaDualTowerBridge(ShimSaveMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    MOVA's bridge between the video and the audio tower: per interaction layer an audio->video and a video->audio
    cross-attention with time-aligned RoPE.

    Args:
        visual_layers (`int`, defaults to 40), audio_layers (`int`, defaults to 30): depths of the two towers.
        visual_hidden_dim (`int`, defaults to 5120), audio_hidden_dim (`int`, defaults to 1536): tower widths.
        audio_fps (`float`, defaults to 50.0): audio latents per second (48000 Hz / hop 960).
        head_dim (`int`, defaults to 128): head dim of both directions (heads = width / head_dim).
        interaction_strategy (`str`, defaults to ``"full"``): which layers interact (:data:`INTERACTION_STRATEGIES`).
        apply_cross_rope (`bool`, defaults to `True`): rotate queries and keys by the aligned positions.
        apply_first_frame_bias_in_rope (`bool`, defaults to `False`): latent frame ``f >= 1`` starts at
            ``1 / fps + (f - 1) * 4 / fps`` seconds instead of ``f * 4 / fps``.
        rope_theta (`float`, defaults to 10000.0): RoPE base.
        eps (`float`, defaults to 1e-6): norm epsilon.

    Example:
        >>> import torch
        >>> from diffusers_wan_ext import MovaDualTowerBridge
        >>> bridge = MovaDualTowerBridge(visual_layers=2, audio_layers=1, visual_hidden_dim=48, audio_hidden_dim=36,
        ...     head_dim=12)
        >>> out = bridge(torch.randn(1, 32, 48), torch.randn(1, 19, 36), layer_index=0, video_grid_size=(2, 4, 4),
        ...     frame_rate=24.0)
        >>> tuple(out.visual_hidden_states.shape), tuple(out.audio_hidden_states.shape)
        ((1, 32, 48), (1, 19, 36))
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["MovaBridgeCrossAttention"]
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        visual_layers: int = 40,
        audio_layers: int = 30,
        visual_hidden_dim: int = 5120,
        audio_hidden_dim: int = 1536,
        audio_fps: float = 50.0,
        head_dim: int = 128,
        interaction_strategy: str = "full",
        apply_cross_rope: bool = True,
        apply_first_frame_bias_in_rope: bool = False,
        rope_theta: float = 10000.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        for name, width in (("visual_hidden_dim", visual_hidden_dim), ("audio_hidden_dim", audio_hidden_dim)):
            if width % head_dim:
                raise ValueError(f"{name} {width} is not divisible by head_dim {head_dim}")
        layers = interaction_layers(interaction_strategy, visual_layers, audio_layers)
        self.audio_to_video = nn.ModuleDict({
            str(i): MovaBridgeCrossAttention(visual_hidden_dim, audio_hidden_dim, visual_hidden_dim // head_dim, eps)
            for i in layers
        })
        self.video_to_audio = nn.ModuleDict({
            str(i): MovaBridgeCrossAttention(audio_hidden_dim, visual_hidden_dim, audio_hidden_dim // head_dim, eps)
            for i in layers
        })

    @property
    def interaction_layers(self) -> list[int]:
        """The layers with a conditioner pair, ascending."""
        return sorted(int(k) for k in self.audio_to_video.keys())

    def rotary(
        self, video_grid_size: tuple[int, int, int], audio_length: int, frame_rate: float,
        device: torch.device | None = None,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``((cos_v, sin_v), (cos_a, sin_a))``, float32 ``[1, N, head_dim]``, for a video token grid
        ``(F, h, w)`` and ``audio_length`` audio tokens at ``frame_rate`` video frames per second."""
        f, h, w = (int(s) for s in video_grid_size)
        cfg = self.config
        if cfg.apply_first_frame_bias_in_rope:
            starts = torch.zeros(f, device=device, dtype=torch.float32)
            if f > 1:
                starts[1:] = 1.0 / float(frame_rate) + torch.arange(f - 1, device=device, dtype=torch.float32) * (
                    4.0 / float(frame_rate))
            video_pos = starts * float(cfg.audio_fps)
        else:
            video_pos = torch.arange(f, device=device, dtype=torch.float32) * (
                float(cfg.audio_fps) / (float(frame_rate) / 4.0))
        video_pos = video_pos.repeat_interleave(h * w)
        audio_pos = torch.arange(int(audio_length), device=device, dtype=torch.float32)
        d = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))

        def table(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            freqs = pos[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)[None]
            return emb.cos(), emb.sin()

        return table(video_pos), table(audio_pos)

    def forward(
        self,
        visual_hidden_states: torch.Tensor,
        audio_hidden_states: torch.Tensor,
        layer_index: int = 0,
        video_grid_size: tuple[int, int, int] | None = None,
        frame_rate: float | None = None,
        rotary: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        condition_scale: float = 1.0,
        return_dict: bool = True,
    ) -> MovaBridgeOutput | tuple[torch.Tensor, torch.Tensor]:
        """Both streams after interaction layer ``layer_index`` (unchanged where the layer has no conditioner).

        ``rotary`` is :meth:`rotary`'s result (computed from ``video_grid_size`` and ``frame_rate`` when omitted);
        ``condition_scale`` multiplies both updates (1.0 in the reference pipeline)."""
        key = str(int(layer_index))
        if key in self.audio_to_video:
            if self.config.apply_cross_rope:
                if rotary is None:
                    if video_grid_size is None or frame_rate is None:
                        raise ValueError("MovaDualTowerBridge: pass rotary, or video_grid_size and frame_rate")
                    rotary = self.rotary(video_grid_size, audio_hidden_states.shape[1], frame_rate,
                                         visual_hidden_states.device)
                video_rope, audio_rope = rotary
            else:
                video_rope = audio_rope = None
            a2v = self.audio_to_video[key](visual_hidden_states, audio_hidden_states, video_rope, audio_rope)
            v2a = self.video_to_audio[key](audio_hidden_states, visual_hidden_states, audio_rope, video_rope)
            visual_hidden_states = visual_hidden_states + a2v * condition_scale
            audio_hidden_states = audio_hidden_states + v2a * condition_scale
        if not return_dict:
            return visual_hidden_states, audio_hidden_states
        return MovaBridgeOutput(visual_hidden_states=visual_hidden_states, audio_hidden_states=audio_hidden_states)
