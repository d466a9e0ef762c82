"""``WanExtTransformer3DModel``: stock ``WanTransformer3DModel`` plus a configurable text-context length.

Weight names are exactly stock Diffusers' names, so LoRAs, hooks, offloading and the stock pipelines apply
unchanged.  The only addition is ``text_len``: the number of text tokens at the end of the cross-attention context,
which stock hard-codes to 512.  Converters emit this class only where stock cannot represent a checkpoint (a CLIP
image branch with ``text_len != 512``); every release converts to the stock class.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin  # noqa: F401  (Diffusers' loader looks up loadable bases in this module)
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from ..utils.shims import ShimSaveMixin
from .attention_processor import WanTextLenAttnProcessor

__all__ = ["WanExtTransformer3DModel"]


class WanExtTransformer3DModel(ShimSaveMixin, WanTransformer3DModel):
    r"""
    Wan transformer with a configurable text-context length for the image/text split of I2V cross-attention.

    Args:
        patch_size, num_attention_heads, attention_head_dim, in_channels, out_channels, text_dim, freq_dim, ffn_dim,
        num_layers, cross_attn_norm, qk_norm, eps, image_dim, added_kv_proj_dim, rope_max_seq_len, pos_embed_seq_len:
            as in :class:`diffusers.WanTransformer3DModel`.
        text_len (`int`, defaults to 512):
            Number of text tokens at the end of the cross-attention context (umT5 context length).  The image tokens
            (CLIP, 257 per image) are the ``S - text_len`` tokens before them.

    Example:
        >>> from diffusers_wan_ext import WanExtTransformer3DModel
        >>> model = WanExtTransformer3DModel(num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32,
        ...     ffn_dim=96, num_layers=1, in_channels=36, image_dim=40, added_kv_proj_dim=48, text_len=16)
        >>> type(model.blocks[0].attn2.processor).__name__
        'WanTextLenAttnProcessor'
    """

    _no_split_modules = ["WanTransformerBlock"]
    _repeated_blocks = ["WanTransformerBlock"]
    _cp_plan = WanTransformer3DModel._cp_plan  # stock's: the extra ``text_len`` changes no token layout
    _cp_self_attention_modules: tuple[str, ...] = ("blocks.*.attn1",)
    # sliding windows (hooks.sliding_window): only hidden_states (and per-token timesteps) carry latent frames
    _sliding_window_inputs: dict[str, int] = {}

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
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        text_len: int = 512,
    ) -> None:
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        if added_kv_proj_dim is not None:
            for block in self.blocks:
                block.attn2.set_processor(WanTextLenAttnProcessor(text_len))

    def _output_projection(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, batch_size: int, grid: tuple[int, int, int],
        skip_tokens: int = 0,
    ) -> torch.Tensor:
        """Stock's last step: output norm modulated by ``temb`` (``[B, D]``, or ``[B, S, D]`` per token), projection
        and unpatchify of ``hidden_states`` ``[B, skip_tokens + F*H*W, D]`` to ``[B, out_channels, F*pt, H*ph, W*pw]``
        (``grid`` = patches per axis).  The first ``skip_tokens`` tokens (e.g. reference-image tokens) are dropped
        after ``proj_out``, whose output is where context parallelism gathers the sequence."""
        if temb.ndim == 3:
            shift, scale = (self.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(hidden_states.device), scale.to(hidden_states.device)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)[:, skip_tokens:]
        p_t, p_h, p_w = self.config.patch_size
        hidden_states = hidden_states.reshape(batch_size, *grid, p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
