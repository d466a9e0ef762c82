"""``WanDancerTransformer3DModel``: the Wan2.2-Dancer-14B (Wan-Dancer, DiffSynth's "WanToDance") transformer.

Wan-Dancer is a Wan2.1 I2V DiT (CLIP branch, 36 input channels = 16 latents + 4 keyframe-mask + 16 keyframe VAE
channels) with these additions, reproduced with the semantics of DiffSynth-Studio's ``WanModel`` with the
``wantodance_*`` options and ``model_fn_wan_video`` (the reference of the ``dit_wantodance_*`` goldens):

* **Music encoder.**  35 librosa features per music frame (30 per second) -> ``music_projection`` (Linear) -> pre-norm
  transformer layers (``music_encoder.N``: ``nn.MultiheadAttention`` whose queries and keys are the normalised
  input under an interleaved-pair rotary embedding over the whole width, values the normalised input; exact-GELU
  FFN).  The result ``[L, width]`` is resized bilinearly (``align_corners=False``) to ``music_resample_size``
  (149 x 4800 in the release) and again to ``[music_tokens_per_frame * F, dim]``: 8 music tokens per latent frame.
* **Music injection.**  After each block in ``music_inject_layers`` the video tokens are cut into ``8 F`` groups of
  ``h w / 8`` consecutive tokens; group ``j`` cross-attends (stock ``WanAttention``, q/k RMSNorm) to music token ``j``
  after a non-affine LayerNorm, and the result is added (``music_injector.injector.N``).
* **Reference image.**  CLIP features of the reference image go through ``reference_image_embedder`` (the same MLP as
  the CLIP branch) and are put before the keyframe CLIP tokens and the text: the cross-attention's image K/V take the
  first ``image_tokens`` (257) tokens -- the reference image -- and the keyframe CLIP tokens go through the text K/V
  (:class:`WanDancerCrossAttnProcessor`).
* **Global (keyframe) path.**  At a frame rate other than ``native_fps`` (30) -- the global model makes keyframes at
  7.5 fps -- ``patch_embedding_global`` and the global head (``proj_out_global``, ``scale_shift_table_global``)
  replace the stock ones and the temporal RoPE rows are resampled onto the 30-fps time axis
  (:func:`resampled_temporal_rope`).  The local model runs at 30 fps: stock patch embedding, head and RoPE.
* The negative (CFG) branch of the pipeline skips block 9 and its music injection (``skip_blocks=(9,)``).

Everything the release shares with Wan I2V keeps stock Diffusers names (``patch_embedding``, ``condition_embedder``,
``blocks.N.attn1`` ...), so stock Wan LoRAs, hooks and attention backends apply.  ``ref_conv`` is in the release
file but never used by the reference pipeline; it is kept (unused) so that a converted folder exports back to the
release file unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusers import ModelMixin  # noqa: F401  (Diffusers' loader looks up loadable bases in this module)
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanImageEmbedding,
)
from diffusers.utils.peft_utils import apply_lora_scale

from .attention_processor import image_text_cross_attention
from .transformer_wan_ext import WanExtTransformer3DModel

__all__ = [
    "DANCER_CLIP_TOKENS",
    "DANCER_NATIVE_FPS",
    "DANCER_RELEASE_INJECT_LAYERS",
    "DANCER_UNCOND_SKIP_BLOCKS",
    "WanDancerCrossAttnProcessor",
    "WanDancerMusicEncoderLayer",
    "WanDancerMusicSelfAttention",
    "WanDancerTransformer3DModel",
    "is_global_fps",
    "resampled_temporal_rope",
]

#: Release values (DiffSynth-Studio ``model_configs``: Wan-AI/Wan-Dancer-14B, 40 blocks).
DANCER_RELEASE_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27)
#: Frame rate of the local model and of the RoPE time axis; any other rate selects the global path.
DANCER_NATIVE_FPS = 30
#: CLIP tokens per image (the cross-attention's image K/V take this many leading context tokens).
DANCER_CLIP_TOKENS = 257
#: Blocks the reference pipeline skips in the negative (unconditional) branch (``skip_9th_layer``).
DANCER_UNCOND_SKIP_BLOCKS = (9,)
#: Temporal RoPE positions of the dynamic-fps models (149 frames x 30 fps x 5 s / 8 = 2794 in the reference).
DANCER_ROPE_POSITIONS = 2794


def is_global_fps(fps: float, native_fps: int = DANCER_NATIVE_FPS) -> bool:
    """Whether ``fps`` selects the global path (the reference's ``int(fps + 0.5) != 30``)."""
    return int(float(fps) + 0.5) != int(native_fps)


def resampled_temporal_rope(
    num_frames: int, fps: float, dim: int, max_positions: int, native_fps: int = DANCER_NATIVE_FPS,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal RoPE ``(cos, sin)`` ``[num_frames, dim]`` (interleaved pairs) of frames at ``fps`` on the
    ``native_fps`` time axis, as the reference's ``wantodance_get_single_freqs``.

    ``total = int(native / (fps + 1e-6) * F + 0.5)`` positions are spanned: row 0 is position 0, row ``F - 1``
    position ``total - 1``, and row ``i`` between them the linear interpolation of the complex rotations at
    ``floor(i * r)`` and ``min(floor(i * r) + 1, total - 1)`` with weight ``frac(i * r)``, ``r = native / (fps +
    1e-6)`` (interpolated factors are not unit-modulus, exactly as in the reference).  Computed in float64.
    """
    interval = native_fps / (float(fps) + 1e-6)
    total = int(interval * num_frames + 0.5)
    if total > max_positions or total < 1:
        raise ValueError(
            f"{num_frames} latent frames at fps {fps} span {total} positions of the {native_fps}-fps RoPE axis, "
            f"outside the model's 1..{max_positions} (rope_max_seq_len)"
        )
    low = torch.zeros(num_frames, dtype=torch.float64)
    high = torch.zeros(num_frames, dtype=torch.float64)
    weight = torch.zeros(num_frames, dtype=torch.float64)
    for i in range(1, num_frames - 1):
        pos = i * interval
        low[i], high[i], weight[i] = int(pos), min(int(pos) + 1, total - 1), pos - int(pos)
    low[-1] = high[-1] = total - 1
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    angle_low, angle_high = torch.outer(low, inv_freq), torch.outer(high, inv_freq)
    w = weight[:, None]
    cos = (1 - w) * angle_low.cos() + w * angle_high.cos()
    sin = (1 - w) * angle_low.sin() + w * angle_high.sin()
    return cos.repeat_interleave(2, dim=1).float(), sin.repeat_interleave(2, dim=1).float()


def rotate_interleaved(x: torch.Tensor, positions: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding over the whole last axis of ``x`` ``[..., L, D]`` at positions ``0 .. L-1``, consecutive
    channel pairs rotated together (lucidrains' ``RotaryEmbedding.rotate_queries_or_keys``, float32 angles)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device).float()[: dim // 2] / dim))
    angles = torch.outer(torch.arange(positions, device=x.device).float(), inv_freq).repeat_interleave(2, dim=-1)
    angles = angles.to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * angles.cos() + rotated * angles.sin()


class WanDancerMusicSelfAttention(nn.Module):
    r"""
    ``nn.MultiheadAttention``'s math and parameter names (``in_proj_weight`` / ``in_proj_bias`` packed q, k, v and
    ``out_proj``), without its fused kernel, so that hooks which cast or offload per ``nn.Linear`` (layerwise casting,
    group offloading) see ``out_proj`` called as a module.

    Args:
        width (`int`): model width.
        num_heads (`int`): attention heads.
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.to(query.dtype).chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.to(query.dtype).chunk(3)
        q, k, v = (F.linear(x, w, b).unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)
                   for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(-3, -2).flatten(-2)
        return self.out_proj(out)


class WanDancerMusicEncoderLayer(nn.Module):
    r"""
    One pre-norm transformer layer of the Wan-Dancer music encoder (release ``music_encoder.N``).

    Self-attention is ``nn.MultiheadAttention`` (:class:`WanDancerMusicSelfAttention`) with queries and keys ``rotary(norm1(x))`` and values ``norm1(x)``
    (the rotary embedding acts on the layer input, before the projections, as in the reference); the FFN is
    ``linear2(gelu(linear1(norm2(x))))`` with the exact GELU.  Dropout is off (inference semantics).  The norms run in
    float32 (kept there by ``_keep_in_fp32_modules``, as stock Wan's norms).

    Args:
        width (`int`): the encoder width (release 256).
        num_heads (`int`): attention heads (4).
        ff_size (`int`): FFN width (release 1024).
    """

    def __init__(self, width: int, num_heads: int, ff_size: int) -> None:
        super().__init__()
        self.self_attn = WanDancerMusicSelfAttention(width, num_heads)
        self.linear1 = nn.Linear(width, ff_size)
        self.linear2 = nn.Linear(ff_size, width)
        self.norm1 = FP32LayerNorm(width, eps=1e-5)
        self.norm2 = FP32LayerNorm(width, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        qk = rotate_interleaved(h, h.shape[-2])
        x = x + self.self_attn(qk, qk, h)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class WanDancerCrossAttnProcessor(WanAttnProcessor):
    """Cross-attention whose image K/V take the FIRST ``image_tokens`` context tokens and whose text K/V take the rest.

    The Dancer context is ``[reference image (257), keyframe CLIP (257), text]``; the reference (DiffSynth's
    ``CrossAttention``: ``y[:, :257]``) sends only the reference image through the image K/V.

    Args:
        image_tokens: leading context tokens that go through the image K/V (257).
    """

    def __init__(self, image_tokens: int = DANCER_CLIP_TOKENS) -> None:
        super().__init__()
        self.image_tokens = int(image_tokens)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.add_k_proj is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        image, text = encoder_hidden_states[:, : self.image_tokens], encoder_hidden_states[:, self.image_tokens :]
        return image_text_cross_attention(attn, hidden_states, image, text, attention_mask, self._attention_backend)


class WanDancerMusicInjector(nn.Module):
    """The per-layer music cross-attentions (release ``music_injector.injector.N``: stock ``WanAttention``)."""

    def __init__(self, count: int, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.injector = nn.ModuleList([
            WanAttention(dim=dim, heads=num_heads, dim_head=head_dim, eps=eps, cross_attention_dim_head=head_dim,
                         processor=WanAttnProcessor())
            for _ in range(count)
        ])

    def forward(self, index: int, hidden_states: torch.Tensor, music: torch.Tensor) -> torch.Tensor:
        """Add injector ``index``'s cross-attention of ``hidden_states`` ``[B, T * n, D]`` (``T`` groups of ``n``
        tokens) to ``music`` ``[B, T, D]`` (one token per group)."""
        b, seq, dim = hidden_states.shape
        groups = music.shape[1]
        grouped = hidden_states.reshape(b * groups, seq // groups, dim)
        normed = F.layer_norm(grouped.float(), (dim,), eps=1e-6).type_as(grouped)
        out = self.injector[index](normed, encoder_hidden_states=music.reshape(b * groups, 1, dim))
        return hidden_states + out.reshape(b, seq, dim)


class WanDancerTransformer3DModel(WanExtTransformer3DModel):
    r"""
    Wan2.2-Dancer transformer (global and local models): Wan I2V DiT plus music encoder, per-layer music injection,
    reference-image tokens and the global (keyframe) patch embedding / head / resampled temporal RoPE.

    Args:
        patch_size, num_attention_heads, attention_head_dim, in_channels, out_channels, text_dim, freq_dim, ffn_dim,
        num_layers, cross_attn_norm, qk_norm, eps, image_dim, added_kv_proj_dim, pos_embed_seq_len, text_len:
            as in :class:`~diffusers_wan_ext.WanExtTransformer3DModel` (``image_dim`` = CLIP width, 1280).
        rope_max_seq_len (`int`, defaults to 2794):
            RoPE positions per axis (the reference precomputes 2794 temporal positions for the dynamic-fps models).
        music_feature_dim (`int`, defaults to 35): music features per frame (onset, 20 MFCC, 12 chroma, peak, beat).
        music_latent_dim (`int`, defaults to 256): music encoder width.
        music_ff_size (`int`, defaults to 1024): music encoder FFN width.
        music_num_heads (`int`, defaults to 4): music encoder heads.
        music_num_layers (`int`, defaults to 2): music encoder layers.
        music_inject_layers (`tuple[int]`): blocks after which the music is injected (release ``0, 4, ..., 27``).
        music_tokens_per_frame (`int`, defaults to 8): music tokens per latent frame.
        music_resample_size (`tuple[int, int]`, defaults to `(149, 4800)`): the intermediate bilinear resize of the
            encoded music (hard-coded in the reference).
        reference_image (`bool`, defaults to `True`): adds ``reference_image_embedder`` (release
            ``img_emb_refimage``).
        global_modules (`bool`, defaults to `True`): adds ``patch_embedding_global``, ``proj_out_global`` and
            ``scale_shift_table_global`` (release ``patch_embedding_global`` / ``head_global``).
        ref_conv_in_channels (`int`, *optional*): keeps the release's unused ``ref_conv`` (16); ``None``: omitted.
        native_fps (`int`, defaults to 30): frame rate of the local path; any other rate runs the global path.
        image_tokens (`int`, defaults to 257): leading context tokens that go through the image K/V.

    Example:
        >>> import torch
        >>> from diffusers_wan_ext.models import WanDancerTransformer3DModel
        >>> model = WanDancerTransformer3DModel(num_attention_heads=2, attention_head_dim=24, in_channels=36,
        ...     text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, image_dim=40, added_kv_proj_dim=48,
        ...     text_len=16, music_latent_dim=32, music_ff_size=64, music_inject_layers=(0,))
        >>> out = model(torch.randn(1, 36, 3, 8, 8), torch.tensor([500.0]), torch.randn(1, 16, 32),
        ...     encoder_hidden_states_image=torch.randn(1, 257, 40), reference_image_embeds=torch.randn(1, 257, 40),
        ...     music_features=torch.randn(40, 35), fps=7.5, return_dict=False)[0]
        >>> tuple(out.shape)
        (1, 16, 3, 8, 8)
    """

    _keep_in_fp32_modules = [*WanExtTransformer3DModel._keep_in_fp32_modules, "scale_shift_table_global"]
    _cp_plan = None
    _cp_unsupported_reason = (
        "its music injection groups each latent frame's tokens with that frame's music tokens, and its music tokens "
        "are resampled over the whole clip, so the tokens cannot be split along the sequence"
    )
    _sliding_window_unsupported_reason = (
        "its music tokens are resampled over the whole clip (8 per latent frame) and its keyframe RoPE depends on the "
        "clip's frame rate, so temporal windows cannot be cut faithfully; long dances come from the pipeline's "
        "local segments"
    )

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 36,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = 1280,
        added_kv_proj_dim: int | None = 5120,
        rope_max_seq_len: int = DANCER_ROPE_POSITIONS,
        pos_embed_seq_len: int | None = None,
        text_len: int = 512,
        music_feature_dim: int = 35,
        music_latent_dim: int = 256,
        music_ff_size: int = 1024,
        music_num_heads: int = 4,
        music_num_layers: int = 2,
        music_inject_layers: Sequence[int] = DANCER_RELEASE_INJECT_LAYERS,
        music_tokens_per_frame: int = 8,
        music_resample_size: Sequence[int] = (149, 4800),
        reference_image: bool = True,
        global_modules: bool = True,
        ref_conv_in_channels: int | None = None,
        native_fps: int = DANCER_NATIVE_FPS,
        image_tokens: int = DANCER_CLIP_TOKENS,
    ) -> None:
        super().__init__(
            patch_size=patch_size, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, freq_dim=freq_dim,
            ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps,
            image_dim=image_dim, added_kv_proj_dim=added_kv_proj_dim, rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len, text_len=text_len,
        )
        layers = [int(i) for i in music_inject_layers]
        if len(set(layers)) != len(layers) or any(not 0 <= i < num_layers for i in layers):
            raise ValueError(f"music_inject_layers {layers} must be distinct block indices below num_layers "
                             f"{num_layers}")
        if image_dim is None or added_kv_proj_dim is None:
            raise ValueError("Wan-Dancer needs the CLIP image branch (image_dim and added_kv_proj_dim)")
        inner_dim = num_attention_heads * attention_head_dim
        for block in self.blocks:
            block.attn2.set_processor(WanDancerCrossAttnProcessor(image_tokens))
        self.music_projection = nn.Linear(music_feature_dim, music_latent_dim)
        self.music_encoder = nn.ModuleList([
            WanDancerMusicEncoderLayer(music_latent_dim, music_num_heads, music_ff_size)
            for _ in range(music_num_layers)
        ])
        self.music_injector = WanDancerMusicInjector(len(layers), inner_dim, num_attention_heads, eps)
        #: block index -> injector index (injectors are numbered in block order, as the reference builds them)
        self.music_injector_slots = {block: slot for slot, block in enumerate(sorted(layers))}
        self.reference_image_embedder = WanImageEmbedding(image_dim, inner_dim) if reference_image else None
        self.patch_embedding_global = self.proj_out_global = self.scale_shift_table_global = None
        if global_modules:
            self.patch_embedding_global = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
            self.proj_out_global = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
            self.scale_shift_table_global = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)
        self.ref_conv = None
        if ref_conv_in_channels:
            self.ref_conv = nn.Conv2d(ref_conv_in_channels, inner_dim, kernel_size=tuple(patch_size[1:]),
                                      stride=tuple(patch_size[1:]))

    # ------------------------------------------------------------------------------------------------------------
    def encode_music(self, music_features: torch.Tensor, num_frames: int, dtype: torch.dtype) -> torch.Tensor:
        """Music tokens ``[B, music_tokens_per_frame * num_frames, dim]`` from features ``[L, 35]`` or
        ``[B, L, 35]``: projection, encoder layers, then the two bilinear resizes of the reference."""
        cfg = self.config
        if music_features.ndim == 2:
            music_features = music_features.unsqueeze(0)
        if music_features.ndim != 3 or music_features.shape[-1] != cfg.music_feature_dim:
            raise ValueError(f"music_features must be [L, {cfg.music_feature_dim}] or [B, L, "
                             f"{cfg.music_feature_dim}], got {tuple(music_features.shape)}")
        x = self.music_projection(music_features.to(dtype))
        for layer in self.music_encoder:
            x = layer(x)
        x = F.interpolate(x.unsqueeze(1), size=tuple(cfg.music_resample_size), mode="bilinear", align_corners=False)
        tokens = (cfg.music_tokens_per_frame * num_frames, self.config.num_attention_heads * cfg.attention_head_dim)
        return F.interpolate(x, size=tokens, mode="bilinear", align_corners=False).squeeze(1)

    def _rotary(self, hidden_states: torch.Tensor, fps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Stock 3-D RoPE of the token grid; on the global path the temporal rows are resampled for ``fps``."""
        cos, sin = self.rope(hidden_states)
        if not is_global_fps(fps, self.config.native_fps):
            return cos, sin
        _, _, f, h, w = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        f, h, w = f // p_t, h // p_h, w // p_w
        t_dim = self.rope.t_dim
        t_cos, t_sin = resampled_temporal_rope(f, fps, t_dim, self.config.rope_max_seq_len, self.config.native_fps)
        t_cos = t_cos.to(cos).view(f, 1, 1, t_dim).expand(f, h, w, t_dim).reshape(1, f * h * w, 1, t_dim)
        t_sin = t_sin.to(sin).view(f, 1, 1, t_dim).expand(f, h, w, t_dim).reshape(1, f * h * w, 1, t_dim)
        return torch.cat([t_cos, cos[..., t_dim:]], dim=-1), torch.cat([t_sin, sin[..., t_dim:]], dim=-1)

    def _head(self, hidden_states: torch.Tensor, temb: torch.Tensor, use_global: bool, batch_size: int,
              grid: tuple[int, int, int]) -> torch.Tensor:
        if not use_global:
            return self._output_projection(hidden_states, temb, batch_size, grid)
        table, proj = self.scale_shift_table_global, self.proj_out_global
        shift, scale = (table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(hidden_states.device), scale.to(hidden_states.device)
        hidden_states = proj((self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states))
        p_t, p_h, p_w = self.config.patch_size
        hidden_states = hidden_states.reshape(batch_size, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _check_inputs(self, hidden_states: torch.Tensor, music_features, reference_image_embeds, use_global: bool):
        cfg = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(f"hidden_states must be [B, {cfg.in_channels}, F, H, W] (latents concatenated with the "
                             f"keyframe condition y), got {tuple(hidden_states.shape)}")
        if music_features is None:
            raise ValueError("music_features is required: Wan-Dancer is driven by music ([L, 35] librosa features)")
        hw = (hidden_states.shape[3] // cfg.patch_size[1]) * (hidden_states.shape[4] // cfg.patch_size[2])
        if hw % cfg.music_tokens_per_frame:
            raise ValueError(f"each latent frame has {hw} tokens, not a multiple of music_tokens_per_frame "
                             f"{cfg.music_tokens_per_frame}: choose a height / width whose token grid divides by it")
        if reference_image_embeds is not None and self.reference_image_embedder is None:
            raise ValueError("reference_image_embeds given, but this transformer has no reference_image_embedder")
        if use_global and self.patch_embedding_global is None:
            raise ValueError(f"fps other than {cfg.native_fps} needs the global modules (patch_embedding_global / "
                             "head_global), which this transformer lacks")

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.LongTensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        reference_image_embeds: torch.Tensor | None = None,
        music_features: torch.Tensor | None = None,
        fps: float = DANCER_NATIVE_FPS,
        skip_blocks: Sequence[int] = (),
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, in_channels, F, H, W)`):
                Noisy latents concatenated (channels) with the keyframe condition ``y`` (4 mask + 16 VAE channels).
            timestep (`torch.Tensor` of shape `(B,)`): diffusion timesteps in [0, 1000].
            encoder_hidden_states (`torch.Tensor` of shape `(B, text_len, text_dim)`): umT5 context.
            encoder_hidden_states_image (`torch.Tensor`, *optional*): CLIP features of the first keyframe
                `(B, 257, image_dim)`.
            reference_image_embeds (`torch.Tensor`, *optional*): CLIP features of the reference image
                `(B, 257, image_dim)` (put first in the context: the image K/V).
            music_features (`torch.Tensor`): librosa features `(L, 35)` or `(B, L, 35)` at 30 frames per second.
            fps (`float`, defaults to 30): frame rate of the latent frames; not ``native_fps`` -> global path.
            skip_blocks (`Sequence[int]`): blocks skipped with their music injection (the negative branch: ``(9,)``).
            return_dict, attention_kwargs: as in :meth:`diffusers.WanTransformer3DModel.forward`.
        """
        use_global = is_global_fps(fps, self.config.native_fps)
        self._check_inputs(hidden_states, music_features, reference_image_embeds, use_global)
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (num_frames // p_t, height // p_h, width // p_w)

        rotary_emb = self._rotary(hidden_states, fps)
        patch_embedding = self.patch_embedding_global if use_global else self.patch_embedding
        hidden_states = patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        temb, timestep_proj, encoder_hidden_states, image_tokens = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        context = [encoder_hidden_states]
        if image_tokens is not None:
            context.insert(0, image_tokens)
        if reference_image_embeds is not None:
            context.insert(0, self.reference_image_embedder(reference_image_embeds).type_as(encoder_hidden_states))
        encoder_hidden_states = torch.cat(context, dim=1)

        music = self.encode_music(music_features, grid[0], hidden_states.dtype)
        if music.shape[0] != batch_size:
            music = music.expand(batch_size, -1, -1)

        skip = {int(i) for i in skip_blocks}
        for index, block in enumerate(self.blocks):
            if index in skip:
                continue
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb
                )
            else:
                hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
            if index in self.music_injector_slots:
                hidden_states = self.music_injector(self.music_injector_slots[index], hidden_states, music)

        output = self._head(hidden_states, temb, use_global, batch_size, grid)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
