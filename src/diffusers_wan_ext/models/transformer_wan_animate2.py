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

import functools

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import ModelMixin  # noqa: F401  (Diffusers' loader looks up loadable bases in this module)
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
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
           "WanAnimate2KVCache", "WanAnimate2OffloadedKVLayerCache", "frame_attention", "frame_attention_op"]

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


def frame_attention(query: torch.Tensor, key_gen: torch.Tensor, value_gen: torch.Tensor, key_ref: torch.Tensor,
                    value_ref: torch.Tensor, bias: torch.Tensor | None, hw: int, stride: int) -> torch.Tensor:
    """The generation pass's self-attention, frame by frame: query frame ``j`` (``hw`` tokens of ``query``
    ``[B, frames * hw, H, D]``) attends over the packed generation keys ``key_gen`` ``[B, gen_len, H, D]`` plus, for
    ``j >= 1``, the ``stride`` packed reference slots of frame ``j - 1`` (``bias``: an additive key bias over
    ``gen_len + stride`` keys, or None).  Differentiable: each frame concatenates its own K / V."""
    outputs = []
    gen_len = key_gen.shape[1]
    for j in range(query.shape[1] // hw):
        k, v, keys = key_gen, value_gen, gen_len
        if j >= 1:
            slot = slice((j - 1) * stride, j * stride)
            k, v, keys = torch.cat([key_gen, key_ref[:, slot]], 1), torch.cat([value_gen, value_ref[:, slot]], 1), None
        outputs.append(_sdpa_frame(query[:, j * hw : (j + 1) * hw], k, v, bias, keys))
    return torch.cat(outputs, dim=1)


def _sdpa_frame(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                keys: int | None) -> torch.Tensor:
    mask = None if bias is None else bias[: keys or k.shape[1]].view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@torch.library.custom_op("diffusers_wan_ext::animate2_frame_attention", mutates_args=())
def frame_attention_op(query: torch.Tensor, key_gen: torch.Tensor, value_gen: torch.Tensor, key_ref: torch.Tensor,
                       value_ref: torch.Tensor, bias: torch.Tensor | None, hw: int, stride: int) -> torch.Tensor:
    """:func:`frame_attention` without autograd and without a copy of the generation K / V per frame: one buffer per
    K / V holds them plus a slot that each frame refills with its reference frame.  An opaque op, so a compiled
    block keeps one buffer too (traced, every refill would become a live copy)."""
    gen_len, (b, _, heads, dim) = key_gen.shape[1], key_gen.shape
    key_buf = key_gen.new_empty(b, gen_len + stride, heads, dim)
    value_buf = value_gen.new_empty(b, gen_len + stride, heads, dim)
    key_buf[:, :gen_len], value_buf[:, :gen_len] = key_gen, value_gen
    outputs = []
    for j in range(query.shape[1] // hw):
        keys = gen_len if j == 0 else gen_len + stride
        if j >= 1:
            key_buf[:, gen_len:] = key_ref[:, (j - 1) * stride : j * stride]
            value_buf[:, gen_len:] = value_ref[:, (j - 1) * stride : j * stride]
        outputs.append(_sdpa_frame(query[:, j * hw : (j + 1) * hw], key_buf[:, :keys], value_buf[:, :keys], bias,
                                   keys))
    return torch.cat(outputs, dim=1).contiguous()


@frame_attention_op.register_fake
def _(query, key_gen, value_gen, key_ref, value_ref, bias, hw, stride):
    return query.new_empty(query.shape)


class WanAnimate2OffloadedKVLayerCache(WanAnimate2KVLayerCache):
    """A layer's reference K/V kept on ``offload_device`` (the release's cache is ~60 GB in bf16 at 720 x 1280 x 81);
    :meth:`get` returns them on the device they were computed on."""

    def __init__(self, offload_device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.offload_device = torch.device(offload_device)
        self.device: torch.device | None = None

    def store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.device = key.device
        pin = self.offload_device.type == "cpu" and key.is_cuda
        key, value = (t.to(self.offload_device) for t in (key, value))
        super().store(*((t.pin_memory() for t in (key, value)) if pin else (key, value)))

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        key, value = super().get()
        return key.to(self.device, non_blocking=True), value.to(self.device, non_blocking=True)


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
            bias = key.new_zeros(gen_len + stride)
            bias[stride : 2 * stride] = self.log_scale
        inputs = (query[:, : frames * hw], key_gen, value_gen, key_ref, value_ref, bias, hw, stride)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, key_ref, value_ref)):
            outputs = [frame_attention(*inputs)]
        else:  # one opaque op: its K / V buffer is filled frame by frame, also under torch.compile
            outputs = [frame_attention_op(*inputs)]
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
    _cp_self_attention_modules: tuple[str, ...] = ("blocks.*.self_attn",)
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

    @classmethod
    def from_stock(cls, model: WanAnimate2Transformer3DModel) -> "WanAnimate2ExtTransformer3DModel":
        """This class holding the weights of a stock ``WanAnimate2Transformer3DModel`` (shared, not copied; same
        dtype and device); ``model`` itself is returned when it already is one."""
        if isinstance(model, cls):
            return model
        if not isinstance(model, WanAnimate2Transformer3DModel):
            raise ValueError(f"expected a WanAnimate2Transformer3DModel, got {type(model).__name__}")
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        clip = model.img_emb.proj[0].weight.shape[0] if getattr(model, "img_emb", None) is not None else None
        with init_empty_weights():
            ours = cls(**config, clip_dim=clip or RELEASE_CLIP_DIM)
        ours.load_state_dict(model.state_dict(), strict=True, assign=True)
        return ours.train(model.training)

    def _rope_freqs(self, offsets: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """Stock's table, on the inputs' device when the weights are on ``meta`` (stock takes the patch embedding's
        device, which sequential CPU offload leaves on ``meta``)."""
        if torch.device(device).type == "meta":
            device = getattr(self, "input_device", None) or device
        return super()._rope_freqs(offsets, device)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        """Diffusers' checkpoint function takes positional arguments only, but stock's block loop passes the layer
        cache and the block arguments as keywords (``enable_gradient_checkpointing`` then fails): they are bound to
        the block first."""
        func = gradient_checkpointing_func or torch.utils.checkpoint.checkpoint

        def checkpoint_block(block, *args, **kwargs):
            return func(functools.partial(block, **kwargs) if kwargs else block, *args)

        super()._set_gradient_checkpointing(enable, checkpoint_block)

    def create_mask(self, origin_latent_f: int, hw: int, device: torch.device) -> None:
        """No flex ``BlockMask``: :class:`WanAnimate2DenseAttnProcessor` applies the mask's structure directly."""
        return None

    def new_kv_cache(self, offload_device: torch.device | str | None = None) -> WanAnimate2KVCache:
        """An empty per-layer reference K/V cache for this model (filled by ``kv_cache_mode="extract"``); with
        ``offload_device`` (e.g. ``"cpu"``, DiffSynth's ``animate2_offload_kv``) every layer's K/V is kept there and
        moved back to the compute device when its block reads it."""
        cache = WanAnimate2KVCache(len(self.blocks))
        if offload_device is not None:
            cache.layer_caches = [WanAnimate2OffloadedKVLayerCache(offload_device) for _ in self.blocks]
        return cache

    def forward(
        self,
        hidden_states: list[torch.Tensor] | torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: list[torch.Tensor] | torch.Tensor,
        condition_latents: list[torch.Tensor] | None = None,
        kv_cache: WanAnimate2KVCache | None = None,
        kv_cache_mode: str | None = None,
        seq_len: int | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        offset_grid_sizes: torch.Tensor | None = None,
        reference_grid_sizes: torch.Tensor | None = None,
        origin_len: int | None = None,
        origin_area: list[int] | None = None,
        is_uncondtion: bool = False,
        log_scale: float = 0.0,
        return_dict: bool = True,
        reference_hidden_states: torch.Tensor | None = None,
        reference_encoder_hidden_states: torch.Tensor | None = None,
        reference_image_embeds: torch.Tensor | None = None,
    ):
        r"""
        Stock's forward (see :meth:`diffusers.WanAnimate2Transformer3DModel.forward`) plus ``log_scale``, and a
        one-call form for training.

        Args:
            log_scale (`float`, defaults to 0):
                Added to the generation-pass self-attention scores of the keys of generation latent frame 1
                (DiffSynth's ``animate2_log_scale``); ignored by the reference pass.
            reference_hidden_states, reference_encoder_hidden_states, reference_image_embeds:
                The one-call form (DiffSynth's ``forward_origin``, what training runs): with ``hidden_states`` a
                batch-1 tensor ``[1, in_dim, T + 1, h, w]`` (noisy latents with ``y`` on channels) and
                ``encoder_hidden_states`` ``[1, L, C]``, the driving video's ``[1, in_dim, T, h, w]`` (latents with
                ``condition_y``), its context ``[1, L, C]`` and CLIP features run the reference pass into a fresh
                K/V cache, then the generation pass against it; returns ``[1, out_dim, T + 1, h, w]``.
        """
        if isinstance(hidden_states, torch.Tensor):
            return self.forward_with_reference(
                hidden_states, timestep, encoder_hidden_states, reference_hidden_states,
                reference_encoder_hidden_states, reference_image_embeds, encoder_hidden_states_image,
                log_scale=log_scale, return_dict=return_dict,
            )
        return self.forward_pass(
            hidden_states, timestep, encoder_hidden_states, condition_latents, kv_cache, kv_cache_mode, seq_len,
            encoder_hidden_states_image=encoder_hidden_states_image, offset_grid_sizes=offset_grid_sizes,
            reference_grid_sizes=reference_grid_sizes, origin_len=origin_len, origin_area=origin_area,
            is_uncondtion=is_uncondtion, log_scale=log_scale, return_dict=return_dict,
        )

    def forward_pass(
        self,
        hidden_states: list[torch.Tensor],
        timestep: torch.Tensor,
        encoder_hidden_states: list[torch.Tensor],
        condition_latents: list[torch.Tensor],
        kv_cache: WanAnimate2KVCache,
        kv_cache_mode: str,
        seq_len: int,
        log_scale: float = 0.0,
        **kwargs,
    ):
        """One pass of stock's forward (``kv_cache_mode`` ``"extract"`` or ``"cached"``, stock's other keywords in
        ``kwargs``) with ``log_scale`` set on the dense processors.  The value stays set until the next pass, so that
        a gradient-checkpointing recomputation in backward runs the same attention."""
        processors = [b.self_attn.processor for b in self.blocks]
        dense = [p for p in processors if isinstance(p, WanAnimate2DenseAttnProcessor)]
        if log_scale and kv_cache_mode == "cached" and len(dense) != len(processors):
            raise ValueError("log_scale needs WanAnimate2DenseAttnProcessor on every block's self_attn")
        for p in dense:
            p.log_scale = float(log_scale) if kv_cache_mode == "cached" else p.log_scale
        self.input_device = hidden_states[0].device
        return super().forward(hidden_states, timestep, encoder_hidden_states, condition_latents, kv_cache,
                               kv_cache_mode, seq_len, **kwargs)

    def forward_with_reference(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        reference_hidden_states: torch.Tensor,
        reference_encoder_hidden_states: torch.Tensor,
        reference_image_embeds: torch.Tensor | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        log_scale: float = 0.0,
        return_dict: bool = True,
    ):
        """Reference pass then generation pass in one call (batch 1; see :meth:`forward`).  The video geometry of the
        mask is the clip's own: ``4 (T - 1) + 1`` frames of the latent grid's size."""
        if reference_hidden_states is None or reference_encoder_hidden_states is None:
            raise ValueError("the one-call form needs reference_hidden_states (the driving video's latents with "
                             "condition_y) and reference_encoder_hidden_states (the reference prompt's context)")
        if hidden_states.ndim != 5 or hidden_states.shape[0] != 1:
            raise ValueError(f"hidden_states must be [1, C, T, h, w] (batch 1); got {tuple(hidden_states.shape)}")
        out_dim, patch = self.config.out_dim, self.config.patch_size
        ref, gen = reference_hidden_states[0], hidden_states[0]

        def grid(x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[x.shape[1] // patch[0], x.shape[2] // patch[1], x.shape[3] // patch[2]]])

        grid_ref, grid_gen = grid(ref), grid(gen)
        cache = self.new_kv_cache()
        self.forward_pass([ref[:out_dim]], timestep, [reference_encoder_hidden_states[0]], [ref[out_dim:]], cache,
                          "extract", int(grid_ref.prod()), encoder_hidden_states_image=reference_image_embeds,
                          offset_grid_sizes=grid_ref)
        tokens_h, tokens_w = grid_gen[0, 1].item(), grid_gen[0, 2].item()
        out = self.forward_pass(
            [gen[:out_dim]], timestep, [encoder_hidden_states[0]], [gen[out_dim:]], cache, "cached",
            int(grid_gen.prod()), encoder_hidden_states_image=encoder_hidden_states_image,
            reference_grid_sizes=grid_ref, origin_len=4 * (ref.shape[1] - 1) + 1,
            origin_area=[tokens_w * 16, tokens_h * 16], log_scale=log_scale, return_dict=False,
        )[0]
        sample = torch.stack(out)
        return (sample,) if not return_dict else Transformer2DModelOutput(sample=sample)
