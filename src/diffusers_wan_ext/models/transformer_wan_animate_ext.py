"""``WanAnimateExtTransformer3DModel``: stock ``WanAnimateTransformer3DModel`` plus a configurable text-context length.

Stock Diffusers' Wan-Animate transformer reproduces the original Wan2.2-Animate model (the ``dit_animate`` golden
agrees to ~5e-6).  The one thing it cannot represent is a ``text_len`` other than 512: its cross-attention
processor separates the 257 CLIP tokens from the text tokens at a hard-coded ``S - 512``.  The original
``WanAnimateCrossAttention`` splits at 257 image tokens, which is the same for the release's 512-token umT5 context
but not for models built with a shorter context (tiny test models, fine-tunes).  This subclass only swaps in
:class:`~diffusers_wan_ext.WanTextLenAttnProcessor`; weight names are exactly stock's, so LoRAs, hooks and the stock
``WanAnimatePipeline`` apply unchanged.  Converters emit it only when ``text_len != 512``; the release converts to
the stock class.
"""

from __future__ import annotations

from diffusers import ModelMixin  # noqa: F401  (Diffusers' loader looks up loadable bases in this module)
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_wan_animate import WanAnimateTransformer3DModel

from ..utils.shims import ShimSaveMixin
from .attention_processor import WanTextLenAttnProcessor

__all__ = ["WanAnimateExtTransformer3DModel"]


class WanAnimateExtTransformer3DModel(ShimSaveMixin, WanAnimateTransformer3DModel):
    r"""
    Wan2.2-Animate transformer with a configurable text-context length for the image/text split of cross-attention.

    Args:
        patch_size, num_attention_heads, attention_head_dim, in_channels, latent_channels, out_channels, text_dim,
        freq_dim, ffn_dim, num_layers, cross_attn_norm, qk_norm, eps, image_dim, added_kv_proj_dim, rope_max_seq_len,
        pos_embed_seq_len, motion_encoder_channel_sizes, motion_encoder_size, motion_style_dim, motion_dim,
        motion_encoder_dim, face_encoder_hidden_dim, face_encoder_num_heads, inject_face_latents_blocks,
        motion_encoder_batch_size:
            as in :class:`diffusers.WanAnimateTransformer3DModel`.
        text_len (`int`, defaults to 512):
            Number of text tokens at the end of the cross-attention context; the CLIP image tokens are the
            ``S - text_len`` tokens before them.

    Example:
        >>> from diffusers_wan_ext import WanAnimateExtTransformer3DModel
        >>> model = WanAnimateExtTransformer3DModel(num_attention_heads=2, attention_head_dim=24, text_dim=32,
        ...     freq_dim=32, ffn_dim=96, num_layers=5, image_dim=40, added_kv_proj_dim=48,
        ...     motion_encoder_channel_sizes={"4": 32, "8": 16, "16": 8}, motion_encoder_size=16, motion_style_dim=32,
        ...     motion_dim=8, motion_encoder_dim=32, face_encoder_hidden_dim=16, text_len=16)
        >>> type(model.blocks[0].attn2.processor).__name__
        'WanTextLenAttnProcessor'
    """

    _cp_plan = None
    _cp_unsupported_reason = (
        "its face adapter cross-attends each latent frame's video tokens to that frame's face features, so the "
        "tokens cannot be split along the sequence"
    )
    _cp_self_attention_modules: tuple[str, ...] = ("blocks.*.attn1",)
    _sliding_window_unsupported_reason = (
        "its latents start with the reference-image frame and its face features come at the pixel frame rate, so "
        "temporal windows cannot be cut faithfully; long videos come from the pipeline's segments "
        "(segment_frame_length)"
    )

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int | None = 36,
        latent_channels: int | None = 16,
        out_channels: int | None = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = 1280,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        motion_encoder_channel_sizes: dict[str, int] | None = None,
        motion_encoder_size: int = 512,
        motion_style_dim: int = 512,
        motion_dim: int = 20,
        motion_encoder_dim: int = 512,
        face_encoder_hidden_dim: int = 1024,
        face_encoder_num_heads: int = 4,
        inject_face_latents_blocks: int = 5,
        motion_encoder_batch_size: int = 8,
        text_len: int = 512,
    ) -> None:
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            latent_channels=latent_channels,
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
            motion_encoder_channel_sizes=motion_encoder_channel_sizes,
            motion_encoder_size=motion_encoder_size,
            motion_style_dim=motion_style_dim,
            motion_dim=motion_dim,
            motion_encoder_dim=motion_encoder_dim,
            face_encoder_hidden_dim=face_encoder_hidden_dim,
            face_encoder_num_heads=face_encoder_num_heads,
            inject_face_latents_blocks=inject_face_latents_blocks,
            motion_encoder_batch_size=motion_encoder_batch_size,
        )
        if added_kv_proj_dim is not None:
            for block in self.blocks:
                block.attn2.set_processor(WanTextLenAttnProcessor(text_len))
