"""Tiny encoders and widths shared by the families' tiny-release factories (demo and tests; no downloads).

The structure is real (depths, patching, RoPE split, token counts); only the widths are tiny.
"""

from __future__ import annotations

from diffusers import AutoencoderKLWan
from transformers import UMT5Config, UMT5EncoderModel

__all__ = ["TINY", "tiny_t5", "tiny_vae21"]

#: Widths of the tiny releases.
TINY = dict(
    dim=48, num_heads=2, ffn_dim=96, num_layers=2, freq_dim=32, text_dim=32, clip_dim=32, clip_layers=3,
    clip_heads=2, clip_image=224, t5_vocab=256, vae_dim=8,
)


def tiny_t5():
    """A tiny umT5 encoder (width ``TINY["text_dim"]``, vocabulary ``TINY["t5_vocab"]``)."""
    return UMT5EncoderModel(UMT5Config(
        vocab_size=TINY["t5_vocab"], d_model=TINY["text_dim"], d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False,
    )).eval()


def tiny_vae21():
    """A tiny Wan2.1 VAE (real structure and latent statistics, width ``TINY["vae_dim"]``)."""
    return AutoencoderKLWan(base_dim=TINY["vae_dim"], z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                            temperal_downsample=[False, True, True]).eval()
