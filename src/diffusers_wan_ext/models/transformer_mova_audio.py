"""``MovaAudioTransformer1DModel``: MOVA's audio DiT (openmoss/MOVA-360p / MOVA-720p ``audio_dit/``).

MOVA generates a video and its sound track together: a Wan2.2-I2V video DiT and this 1-D audio DiT denoise in
lockstep, joined block by block by the dual-tower bridge (:class:`~diffusers_wan_ext.models.mova_bridge.
MovaDualTowerBridge`; the joint forward is :func:`~diffusers_wan_ext.models.mova_joint_forward.mova_joint_forward`).

The audio DiT is a Wan DiT over a 1-D sequence of 128-channel DAC-VAE latents (50 per second):

* ``patch_embedding`` is a ``Conv1d`` with kernel 1 (``[B, C, L]`` -> ``L`` tokens);
* the time / text embedding, the blocks (self-attention with q/k RMSNorm over the full width, text-only
  cross-attention, FFN, 6-way modulation) and the 2-way modulated head are stock Diffusers Wan parts
  (``WanTimeTextImageEmbedding``, ``WanTransformerBlock``), so weight names, LoRA targets and step caches are those
  of ``WanTransformer3DModel``;
* self-attention RoPE is 1-D over the **whole** head dim, positions ``0 .. L-1``, in Wan's complex-pair convention
  (consecutive channel pairs), theta 10000 (DiffSynth's ``MovaAudioDit``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding, WanTransformerBlock

from ..utils.shims import ShimSaveMixin

__all__ = ["MovaAudioRotaryPosEmbed", "MovaAudioTransformer1DModel"]


class MovaAudioRotaryPosEmbed(nn.Module):
    """1-D RoPE over the whole head dim in Wan's complex-pair convention (cos / sin repeated per channel pair).

    Args:
        attention_head_dim: the head dim (even).
        max_seq_len: the longest audio sequence the table covers.
        theta: the RoPE base.
    """

    def __init__(self, attention_head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        freqs_dtype = torch.float32 if torch.backends.mps.is_available() else torch.float64
        cos, sin = get_1d_rotary_pos_embed(attention_head_dim, max_seq_len, theta, use_real=True,
                                           repeat_interleave_real=True, freqs_dtype=freqs_dtype)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``[1, L, 1, head_dim]`` for ``hidden_states`` ``[B, C, L]``."""
        length = hidden_states.shape[-1]
        torch._check(length <= self.max_seq_len)
        return self.freqs_cos[:length][None, :, None], self.freqs_sin[:length][None, :, None]


class MovaAudioTransformer1DModel(
    ShimSaveMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin
):
    r"""
    MOVA's audio diffusion transformer: Wan blocks over a 1-D latent sequence.

    Args:
        in_channels (`int`, defaults to 128): audio-VAE latent channels.
        out_channels (`int`, defaults to 128): predicted channels.
        num_attention_heads (`int`, defaults to 12), attention_head_dim (`int`, defaults to 128): attention shape.
        text_dim (`int`, defaults to 4096): umT5 width.
        freq_dim (`int`, defaults to 256): sinusoidal timestep width.
        ffn_dim (`int`, defaults to 8960): FFN width.
        num_layers (`int`, defaults to 30): blocks.
        cross_attn_norm (`bool`, defaults to `True`): affine LayerNorm before cross-attention.
        qk_norm (`str`, defaults to ``"rms_norm_across_heads"``): q/k normalization of the attentions.
        eps (`float`, defaults to 1e-6): norm epsilon.
        rope_max_seq_len (`int`, defaults to 16384): longest audio sequence (latents) the RoPE table covers.
        rope_theta (`float`, defaults to 10000.0): RoPE base.

    Example:
        >>> import torch
        >>> from diffusers_wan_ext import MovaAudioTransformer1DModel
        >>> model = MovaAudioTransformer1DModel(num_attention_heads=3, attention_head_dim=12, text_dim=32,
        ...     freq_dim=24, ffn_dim=60, num_layers=1)
        >>> out = model(torch.randn(1, 128, 19), torch.tensor([500.0]), torch.randn(1, 8, 32), return_dict=False)[0]
        >>> tuple(out.shape)
        (1, 128, 19)
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]
    _no_split_modules = ["WanTransformerBlock"]
    _keep_in_fp32_modules = ["rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]
    _repeated_blocks = ["WanTransformerBlock"]
    _cp_plan = None
    _cp_unsupported_reason = (
        "MOVA's audio tower runs in lockstep with the video tower through the dual-tower bridge, whose cross-modal "
        "attention needs both full token sequences at every interaction layer"
    )
    _cp_self_attention_modules: tuple[str, ...] = ("blocks.*.attn1",)

    @register_to_config
    def __init__(
        self,
        in_channels: int = 128,
        out_channels: int = 128,
        num_attention_heads: int = 12,
        attention_head_dim: int = 128,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 8960,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_max_seq_len: int = 16384,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.rope = MovaAudioRotaryPosEmbed(attention_head_dim, rope_max_seq_len, rope_theta)
        self.patch_embedding = nn.Conv1d(in_channels, inner_dim, kernel_size=1)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim, time_freq_dim=freq_dim, time_proj_dim=inner_dim * 6, text_embed_dim=text_dim,
        )
        self.blocks = nn.ModuleList(
            [WanTransformerBlock(inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps)
             for _ in range(num_layers)]
        )
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)
        self.gradient_checkpointing = False

    def embed(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Tokens ``[B, L, D]``, ``temb`` ``[B, D]``, block modulation ``[B, 6, D]``, embedded text context and
        the RoPE ``(cos, sin)`` of latents ``hidden_states`` ``[B, C, L]`` (what the blocks take)."""
        rotary_emb = self.rope(hidden_states)
        tokens = self.patch_embedding(hidden_states).transpose(1, 2).contiguous()
        temb, timestep_proj, context, _ = self.condition_embedder(timestep, encoder_hidden_states)
        return tokens, temb, timestep_proj.unflatten(1, (6, -1)), context, rotary_emb

    def project_out(self, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The modulated output norm and projection of ``tokens`` ``[B, L, D]`` -> ``[B, out_channels, L]``."""
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(tokens.device), scale.to(tokens.device)
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        return self.proj_out(tokens).transpose(1, 2)

    def run_block(self, index: int, tokens: torch.Tensor, context: torch.Tensor, timestep_proj: torch.Tensor,
                  rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Block ``index`` (through gradient checkpointing when enabled and training)."""
        block = self.blocks[index]
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, tokens, context, timestep_proj, rotary_emb)
        return block(tokens, context, timestep_proj, rotary_emb)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Audio velocity ``[B, out_channels, L]`` of latents ``hidden_states`` ``[B, in_channels, L]`` at
        ``timestep`` ``[B]`` with umT5 context ``encoder_hidden_states`` ``[B, S, text_dim]`` (the audio tower alone,
        no bridge -- what ``dit_mova_audio`` checks)."""
        tokens, temb, timestep_proj, context, rotary_emb = self.embed(hidden_states, timestep, encoder_hidden_states)
        for index in range(len(self.blocks)):
            tokens = self.run_block(index, tokens, context, timestep_proj, rotary_emb)
        output = self.project_out(tokens, temb)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
