"""``WanAnimate2ExtTransformer3DModel``: stock ``WanAnimate2Transformer3DModel`` plus what it lacks for parity.

Stock Diffusers 0.42.1 ports the Wan2.2-Animate-2-14B DiT (DiffSynth-Studio's ``WanAnimate2Transformer``): a
reference pass (``kv_cache_mode="extract"``) caches every block's pre-RoPE keys / values of the reference (driving)
video, and each denoising step (``kv_cache_mode="cached"``) attends over the generation tokens plus, for generation
latent frame ``j >= 1``, the cached tokens of reference frame ``j - 1``.  The ``dit_animate2`` golden agrees with it
to fp32 rounding on the outputs it can produce.  This subclass adds three things, keeping every weight name:

* ``clip_dim`` -- the width of the CLIP features of ``img_emb`` (stock and DiffSynth hard-code 1280, the release
  value); models with another CLIP width (tiny test models) need it from the config.
* ``log_scale`` -- DiffSynth's ``animate2_log_scale``: a constant added to the self-attention scores of the keys of
  generation latent frame 1 (packed positions ``[hw, 2 hw)``), which stock has no argument for.
* a dense attention processor (:class:`WanAnimate2DenseAttnProcessor`) for the generation pass: stock builds a flex
  ``BlockMask`` that needs ``torch.compile`` and the ``flex`` backend; this one computes the same masked attention
  frame by frame with ordinary scaled-dot-product attention (any device, any SDPA backend, no mask tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401  (Diffusers' loader looks up loadable bases in this module)
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_wan_animate_2 import (
    MLPProj,
    WanAnimate2AttnProcessor,
    WanAnimate2KVCache,
    WanAnimate2KVLayerCache,
    WanAnimate2Transformer3DModel,
    rope_apply,
)

from ..utils.shims import ShimSaveMixin

__all__ = ["RELEASE_CLIP_DIM", "WanAnimate2DenseAttnProcessor", "WanAnimate2ExtTransformer3DModel",
           "WanAnimate2KVCache"]

#: CLIP feature width of the release (and the width stock hard-codes).
RELEASE_CLIP_DIM = 1280


def pack_frames(x: torch.Tensor, frames: int, hw: int, stride: int, total: int) -> torch.Tensor:
    """Scatter ``x`` ``[B, frames * hw, H, D]`` into zeros ``[B, total, H, D]`` at ``stride`` tokens per frame (the
    reference's packed layout: each latent frame occupies ``stride`` slots, its ``hw`` tokens first)."""
    b, _, heads, head_dim = x.shape
    out = x.new_zeros(b, total, heads, head_dim)
    out[:, : frames * stride].view(b, frames, stride, heads, head_dim)[:, :, :hw] = x[:, : frames * hw].view(
        b, frames, hw, heads, head_dim
    )
    return out


class WanAnimate2DenseAttnProcessor(WanAnimate2AttnProcessor):
    r"""
    Self-attention of Wan-Animate-2 without flex attention; the reference pass is stock's.

    For the generation pass, the generation tokens and the cached reference tokens are laid out as in the reference
    (``origin_latent_hw`` slots per latent frame, zeros in unused slots), and each generation latent frame ``j``
    attends with scaled-dot-product attention over all ``(origin_latent_frames + 1) * origin_latent_hw`` generation
    slots plus the ``origin_latent_hw`` slots of reference frame ``j - 1`` (none for ``j = 0``) -- exactly the keys
    the reference's ``BlockMask`` lets it see, zero slots included.  :attr:`log_scale` (set by the model's forward)
    is added to the scores of the keys of generation frame 1.
    """

    def __init__(self) -> None:
        self.log_scale = 0.0

    def _project(self, attn, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        return tuple(t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        rotary_emb: torch.Tensor,
        grid_sizes: torch.Tensor,
        kv_cache: WanAnimate2KVLayerCache,
        kv_cache_mode: str,
        rope_stride: int = 1,
        reference_rotary_emb: torch.Tensor | None = None,
        reference_grid_sizes: torch.Tensor | None = None,
        reference_rope_stride: int = 1,
        attention_mask=None,
        origin_latent_frames: int | None = None,
        origin_latent_hw: int | None = None,
    ) -> torch.Tensor:
        if kv_cache_mode != "cached":
            return super().__call__(
                attn, hidden_states, rotary_emb, grid_sizes, kv_cache, kv_cache_mode, rope_stride=rope_stride,
                reference_rotary_emb=reference_rotary_emb, reference_grid_sizes=reference_grid_sizes,
                reference_rope_stride=reference_rope_stride, attention_mask=attention_mask,
                origin_latent_frames=origin_latent_frames, origin_latent_hw=origin_latent_hw,
            )
        query, key, value = self._project(attn, hidden_states)
        query = rope_apply(query, grid_sizes, rotary_emb, rope_stride).type_as(value)
        key = rope_apply(key, grid_sizes, rotary_emb, rope_stride).type_as(value)
        key_ref, value_ref = kv_cache.get()
        key_ref = rope_apply(key_ref, reference_grid_sizes, reference_rotary_emb, reference_rope_stride).type_as(value)

        frames, height, width = grid_sizes[0].tolist()
        ref_frames, ref_height, ref_width = reference_grid_sizes[0].tolist()
        hw, ref_hw, stride = height * width, ref_height * ref_width, origin_latent_hw
        if frames > origin_latent_frames + 1 or ref_frames > origin_latent_frames or max(hw, ref_hw) > stride:
            raise ValueError(
                f"the clip ({frames} latent frames of {hw} tokens, reference {ref_frames} x {ref_hw}) does not fit the "
                f"video geometry given by origin_len / origin_area ({origin_latent_frames} + 1 frames of {stride} "
                "tokens)"
            )
        gen_len, ref_len = (origin_latent_frames + 1) * stride, origin_latent_frames * stride
        key_gen = pack_frames(key, frames, hw, stride, gen_len)
        value_gen = pack_frames(value, frames, hw, stride, gen_len)
        key_ref = pack_frames(key_ref, ref_frames, ref_hw, stride, ref_len)
        value_ref = pack_frames(value_ref, ref_frames, ref_hw, stride, ref_len)
        bias = None
        if self.log_scale:
            bias = key.new_zeros(gen_len)
            bias[stride : 2 * stride] = self.log_scale

        outputs = []
        for j in range(frames):
            q = query[:, j * hw : (j + 1) * hw]
            k, v, mask = key_gen, value_gen, bias
            if j >= 1:
                k = torch.cat([key_gen, key_ref[:, (j - 1) * stride : j * stride]], dim=1)
                v = torch.cat([value_gen, value_ref[:, (j - 1) * stride : j * stride]], dim=1)
                mask = None if bias is None else torch.cat([bias, bias.new_zeros(stride)])
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=None if mask is None else mask.view(1, 1, 1, -1),
            )
            outputs.append(out.transpose(1, 2))
        outputs.append(query[:, frames * hw :])  # padded query positions pass through, as in the reference
        hidden_states = torch.cat(outputs, dim=1).flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class WanAnimate2ExtTransformer3DModel(ShimSaveMixin, WanAnimate2Transformer3DModel):
    r"""
    Wan2.2-Animate-2 transformer: stock ``WanAnimate2Transformer3DModel`` with a configurable CLIP width, DiffSynth's
    ``log_scale`` score bias and a dense (flex-free) generation-pass attention.

    Args:
        patch_size, text_len, in_dim, dim, ffn_dim, freq_dim, text_dim, out_dim, num_heads, num_layers,
        cross_attn_norm, eps, use_img_emb, refer_offset_t, refer_offset_h, refer_offset_w, refer_stride:
            as in :class:`diffusers.WanAnimate2Transformer3DModel`.
        clip_dim (`int`, defaults to 1280):
            Width of the CLIP image features ``img_emb`` takes (the release: 1280).

    Example:
        >>> from diffusers_wan_ext.models import WanAnimate2ExtTransformer3DModel
        >>> model = WanAnimate2ExtTransformer3DModel(text_len=16, dim=48, ffn_dim=96, freq_dim=32, text_dim=32,
        ...     num_heads=2, num_layers=2, clip_dim=40)
        >>> tuple(model.img_emb.proj[0].weight.shape)
        (40,)
    """

    _cp_plan = None
    _cp_unsupported_reason = (
        "each generation latent frame attends to its own cached reference frame through a frame-structured mask "
        "over the whole clip, so the tokens cannot be split along the sequence"
    )

    @register_to_config
    def __init__(
        self,
        patch_size: tuple = (1, 2, 2),
        text_len: int = 512,
        in_dim: int = 36,
        dim: int = 5120,
        ffn_dim: int = 13824,
        freq_dim: int = 256,
        text_dim: int = 4096,
        out_dim: int = 16,
        num_heads: int = 40,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        use_img_emb: bool = True,
        refer_offset_t: int = 1,
        refer_offset_h: int = 0,
        refer_offset_w: int = -1,
        refer_stride: int = 1,
        clip_dim: int = RELEASE_CLIP_DIM,
    ) -> None:
        super().__init__(
            patch_size=patch_size, text_len=text_len, in_dim=in_dim, dim=dim, ffn_dim=ffn_dim, freq_dim=freq_dim,
            text_dim=text_dim, out_dim=out_dim, num_heads=num_heads, num_layers=num_layers,
            cross_attn_norm=cross_attn_norm, eps=eps, use_img_emb=use_img_emb, refer_offset_t=refer_offset_t,
            refer_offset_h=refer_offset_h, refer_offset_w=refer_offset_w, refer_stride=refer_stride,
        )
        if use_img_emb and clip_dim != RELEASE_CLIP_DIM:
            self.img_emb = MLPProj(clip_dim, dim)
        for block in self.blocks:
            block.self_attn.set_processor(WanAnimate2DenseAttnProcessor())

    def create_mask(self, origin_latent_f: int, hw: int, device: torch.device) -> None:
        """No flex ``BlockMask``: :class:`WanAnimate2DenseAttnProcessor` applies the mask's structure directly."""
        return None

    def new_kv_cache(self) -> WanAnimate2KVCache:
        """An empty per-layer reference K/V cache for this model (filled by ``kv_cache_mode="extract"``)."""
        return WanAnimate2KVCache(len(self.blocks))

    def forward(
        self,
        hidden_states: list[torch.Tensor],
        timestep: torch.Tensor,
        encoder_hidden_states: list[torch.Tensor],
        condition_latents: list[torch.Tensor],
        kv_cache: WanAnimate2KVCache,
        kv_cache_mode: str,
        seq_len: int,
        encoder_hidden_states_image: torch.Tensor | None = None,
        offset_grid_sizes: torch.Tensor | None = None,
        reference_grid_sizes: torch.Tensor | None = None,
        origin_len: int | None = None,
        origin_area: list[int] | None = None,
        is_uncondtion: bool = False,
        log_scale: float = 0.0,
        return_dict: bool = True,
    ):
        r"""
        Stock's forward (see :meth:`diffusers.WanAnimate2Transformer3DModel.forward`) plus ``log_scale``.

        Args:
            log_scale (`float`, defaults to 0):
                Added to the generation-pass self-attention scores of the keys of generation latent frame 1
                (DiffSynth's ``animate2_log_scale``); ignored by the reference pass.
        """
        if log_scale and kv_cache_mode == "cached":
            processors = [b.self_attn.processor for b in self.blocks]
            if not all(isinstance(p, WanAnimate2DenseAttnProcessor) for p in processors):
                raise ValueError("log_scale needs WanAnimate2DenseAttnProcessor on every block's self_attn")
            for p in processors:
                p.log_scale = float(log_scale)
        try:
            return super().forward(
                hidden_states, timestep, encoder_hidden_states, condition_latents, kv_cache, kv_cache_mode, seq_len,
                encoder_hidden_states_image=encoder_hidden_states_image, offset_grid_sizes=offset_grid_sizes,
                reference_grid_sizes=reference_grid_sizes, origin_len=origin_len, origin_area=origin_area,
                is_uncondtion=is_uncondtion, return_dict=return_dict,
            )
        finally:
            for block in self.blocks:
                if isinstance(block.self_attn.processor, WanAnimate2DenseAttnProcessor):
                    block.self_attn.processor.log_scale = 0.0

