"""``WanVideoAsPromptTransformer3DModel``: ByteDance Video-As-Prompt (Wan2.1-I2V-14B + mixture-of-transformers).

Video-As-Prompt conditions a frozen Wan2.1 image-to-video DiT on a *reference video* that shows the wanted semantics
(an effect, a motion, a camera move).  The reference goes through a second transformer stream (the "MoT expert")
that runs next to the main stream:

* the reference stream has its own patch embedding (36 channels: the reference video's latents + the I2V ``y`` of
  its first frame), its own time / text / CLIP embedder and one full Wan block per entry of ``vap_layers`` (release:
  every 4th DiT layer, ``0, 4, ..., 36``);
* it is *clean*: its modulation uses timestep 1 (``vap_timestep``), whatever the main stream's timestep is;
* its RoPE frame positions are negative, ``-F .. -1`` (h / w positions as usual), so that the reference sits
  "before" the generated video in time;
* in a layer listed in ``vap_layers`` both streams share one **joint self-attention** (queries, keys and values of
  both streams concatenated along the sequence, one attention, split back); cross-attention (the reference stream
  attends to its own prompt ``vap_prompt`` and the CLIP features of its first frame) and FFN stay separate; every
  other layer is a plain Wan block on the main stream, and the reference stream passes through unchanged;
* the output head uses the main stream only, modulated with the main timestep embedding.

The forward is stock :class:`diffusers.WanTransformer3DModel`'s, except that the MoT layers
(:class:`WanVideoAsPromptMoTBlock`) also take the reference stream's inputs as an argument.  The joint attention
lives in their ``attn1`` processors (:class:`WanVideoAsPromptJointAttnProcessor`, which runs the reference block's
stock forward, whose own ``attn1`` -- :class:`WanVideoAsPromptReferenceAttnProcessor` -- does the joint attention),
so every block runs through its ``forward`` and block-level hooks (group offloading, step caches, gradient
checkpointing) see both streams.  Everything of the main stream keeps stock names (LoRAs, hooks, offloading and
attention backends apply).  The reference stream's modules are stock modules as well, under ``vap_`` names in the
style of stock ``WanVACETransformer3DModel`` (``vace_patch_embedding`` / ``vace_blocks``): ``vap_patch_embedding``,
``vap_condition_embedder`` (a stock ``WanTimeTextImageEmbedding``) and ``vap_blocks.k`` (stock
``WanTransformerBlock`` code as :class:`WanVideoAsPromptReferenceBlock`; ``k`` = position in ``vap_layers``).  The release's ``*_mot_ref`` key layout is
converted by :mod:`diffusers_wan_ext.conversion.vap`.

Reference behaviour: ByteDance's release code (``WanTransformer3DMOTModel``).  DiffSynth-Studio 2.1.12 computes the
same except that its ``model_fn_wan_video`` overwrites the main time embedding with the reference stream's before
the output head (a variable-shadowing bug, see the ``dit_vap`` golden); we follow ByteDance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ModelMixin  # noqa: F401  (Diffusers' loader looks up loadable bases in this module)
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils.peft_utils import apply_lora_scale
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    WanTimeTextImageEmbedding,
    WanTransformerBlock,
)
from torch import nn

from .attention_processor import WanTextLenAttnProcessor, wan_attention_output, wan_self_attention_qkv
from .transformer_wan_ext import WanExtTransformer3DModel

__all__ = [
    "RELEASE_VAP_LAYERS",
    "WanVideoAsPromptJointAttnProcessor",
    "WanVideoAsPromptMoTBlock",
    "WanVideoAsPromptReferenceAttnProcessor",
    "WanVideoAsPromptReferenceBlock",
    "WanVideoAsPromptTransformer3DModel",
]

#: ``block_idx_with_mot_ref`` of ByteDance/Video-As-Prompt-Wan2.1-14B (DiffSynth's ``mot_layers``).
RELEASE_VAP_LAYERS: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 28, 32, 36)


@dataclass(eq=False)
class _ReferenceStream:
    """One MoT layer's reference-stream state while its main block runs: set from the block's ``reference``
    argument (so a gradient-checkpoint recomputation of the block sets it again), read by the two ``attn1``
    processors, and holding the reference block's output afterwards."""

    hidden_states: torch.Tensor | None = None
    context: torch.Tensor | None = None
    temb: torch.Tensor | None = None
    rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
    main_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    main_out: torch.Tensor | None = None
    output: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.hidden_states is not None

    def load(self, reference: tuple[torch.Tensor, ...]) -> None:
        """Take the reference block's inputs ``(hidden_states, context, temb, rope_cos, rope_sin)``."""
        self.hidden_states, self.context, self.temb, cos, sin = reference
        self.rotary_emb = (cos, sin)

    def clear(self) -> None:
        for name in ("hidden_states", "context", "temb", "rotary_emb", "main_qkv", "main_out"):
            setattr(self, name, None)

    def take_output(self, default: torch.Tensor) -> torch.Tensor:
        """The reference block's output of the last run (``default`` when the block did not run, e.g. skipped by a
        step cache), and forget it."""
        out, self.output = self.output, None
        return default if out is None else out


def _match_batch(t: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    if t.shape[0] == batch_size:
        return t
    if t.shape[0] == 1:
        return t.expand(batch_size, *t.shape[1:])
    raise ValueError(f"{name} has batch {t.shape[0]}, expected 1 or {batch_size} (the latent batch)")


class WanVideoAsPromptJointAttnProcessor(WanAttnProcessor):
    """``attn1`` of a MoT layer (main stream).  Without a reference it is stock ``WanAttnProcessor``; with one it
    computes the main queries / keys / values, runs the reference block (stock ``WanTransformerBlock.forward``, whose
    ``attn1`` -- :class:`WanVideoAsPromptReferenceAttnProcessor` -- performs the joint attention) and returns the main
    stream's share of the joint attention.  The rest of both blocks is stock code."""

    def __init__(self, stream: _ReferenceStream, vap_block: WanTransformerBlock):
        super().__init__()
        self.stream = stream
        self.vap_block = vap_block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        stream = self.stream
        if not stream.active:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = wan_self_attention_qkv(attn, hidden_states, rotary_emb)
        stream.main_qkv = (query, key, value)
        stream.hidden_states = self.vap_block(stream.hidden_states, stream.context, stream.temb, stream.rotary_emb)
        out, stream.main_qkv, stream.main_out = stream.main_out, None, None
        if out is None:
            raise RuntimeError(
                "the reference block's self-attention did not run (a step cache served it), so the main stream's "
                "share of the joint attention is missing: cache the main blocks only, e.g. "
                "PyramidAttentionBroadcastConfig(spatial_attention_block_identifiers=('^blocks',), ...)"
            )
        return wan_attention_output(attn, out, query)


class WanVideoAsPromptReferenceAttnProcessor(WanAttnProcessor):
    """``attn1`` of a reference-stream block: one attention over the concatenated main and reference tokens (the
    main stream's queries / keys / values come from :class:`WanVideoAsPromptJointAttnProcessor`); returns the
    reference's share and hands the main stream's share back."""

    def __init__(self, stream: _ReferenceStream):
        super().__init__()
        self.stream = stream

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        stream = self.stream
        if stream.main_qkv is None:
            raise RuntimeError(
                "a Video-As-Prompt reference block runs inside its DiT layer's joint attention; call the "
                "WanVideoAsPromptTransformer3DModel with vap_hidden_states instead of the block alone"
            )
        q, k, v = stream.main_qkv
        qv, kv, vv = wan_self_attention_qkv(attn, hidden_states, rotary_emb)
        joint = dispatch_attention_fn(
            torch.cat([q, qv], dim=1), torch.cat([k, kv], dim=1), torch.cat([v, vv], dim=1),
            attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
        )
        stream.main_out, out = joint.split([q.shape[1], qv.shape[1]], dim=1)
        return wan_attention_output(attn, out, qv)


class WanVideoAsPromptReferenceBlock(WanTransformerBlock):
    """A reference-stream block (``vap_blocks.k``): stock ``WanTransformerBlock`` whose ``attn1`` is
    :class:`WanVideoAsPromptReferenceAttnProcessor`.  A class of its own so that regional compilation of the
    (uniform) plain ``WanTransformerBlock`` layers leaves it out."""


class WanVideoAsPromptMoTBlock(WanTransformerBlock):
    """The main-stream block of a MoT layer (its ``attn1`` is :class:`WanVideoAsPromptJointAttnProcessor`).

    ``forward(..., reference)`` takes the reference stream's ``(hidden_states, context, temb, rope_cos, rope_sin)``
    as an argument, so hooks, gradient checkpointing (whose recomputation runs the reference block again from the
    same inputs) and compilation see the whole layer; the reference block's output is read back with
    :meth:`reference_output`.  Without ``reference`` it is the stock block.
    """

    @property
    def stream(self) -> _ReferenceStream:
        processor = self.attn1.processor
        if not isinstance(processor, WanVideoAsPromptJointAttnProcessor):
            raise ValueError(
                f"the self-attention processor of a MoT layer was replaced ({type(processor).__name__}); the joint "
                "attention needs WanVideoAsPromptJointAttnProcessor there (use set_attention_backend to change the "
                "kernel)"
            )
        return processor.stream

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        reference: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        if reference is None:
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        stream = self.stream
        stream.load(reference)
        try:
            hidden_states = super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
            # the reference block's output (its input when the joint attention was skipped, e.g. by a cache hook)
            stream.output = stream.hidden_states
        finally:
            stream.clear()
        return hidden_states

    def reference_output(self, default: torch.Tensor) -> torch.Tensor:
        """The reference stream after this layer's last run with a ``reference`` (``default`` if it did not run)."""
        return self.stream.take_output(default)


class WanVideoAsPromptTransformer3DModel(WanExtTransformer3DModel):
    r"""
    Wan2.1 image-to-video transformer with the Video-As-Prompt reference stream (mixture of transformers).

    Args:
        patch_size, num_attention_heads, attention_head_dim, in_channels, out_channels, text_dim, freq_dim, ffn_dim,
        num_layers, cross_attn_norm, qk_norm, eps, image_dim, added_kv_proj_dim, rope_max_seq_len, pos_embed_seq_len:
            as in :class:`diffusers.WanTransformer3DModel` (release: the Wan2.1-I2V-14B values, ``in_channels=36``,
            ``image_dim=1280``); the reference stream has the same widths.
        text_len (`int`, defaults to 512):
            Text tokens at the end of each cross-attention context (image/text split of the CLIP branch); both
            streams use it.
        vap_layers (`list[int]`, defaults to ``0, 4, ..., 36``):
            The DiT layers with a reference-stream block and joint self-attention (the release's
            ``block_idx_with_mot_ref``).

    Example:
        >>> import torch
        >>> from diffusers_wan_ext import WanVideoAsPromptTransformer3DModel
        >>> model = WanVideoAsPromptTransformer3DModel(num_attention_heads=2, attention_head_dim=24, in_channels=36,
        ...     text_dim=32, freq_dim=32, ffn_dim=96, num_layers=3, image_dim=40, added_kv_proj_dim=48, text_len=16,
        ...     vap_layers=[0, 2])
        >>> x, ref = torch.randn(1, 36, 3, 8, 8), torch.randn(1, 36, 3, 8, 8)
        >>> ctx, clip = torch.randn(1, 16, 32), torch.randn(1, 257, 40)
        >>> out = model(x, torch.tensor([500.0]), ctx, clip, vap_hidden_states=ref, vap_encoder_hidden_states=ctx,
        ...             vap_encoder_hidden_states_image=clip, return_dict=False)[0]
        >>> tuple(out.shape)
        (1, 16, 3, 8, 8)
    """

    _no_split_modules = ["WanTransformerBlock", "WanVideoAsPromptMoTBlock", "WanVideoAsPromptReferenceBlock"]
    # the plain layers only: MoT layers and reference blocks differ in their attention processors (and each MoT
    # processor holds its own reference block), so compiling them with the plain ones would recompile per layer
    _repeated_blocks = ["WanTransformerBlock"]
    _cp_plan = None
    _cp_unsupported_reason = (
        "its joint attention between the reference and the main stream needs both streams' full token sequences"
    )
    # sliding windows: the reference video (at frame positions -F .. -1) goes whole to every window, just before
    # the window's frames 0 ..; only the main stream's hidden_states are sliced
    _sliding_window_inputs: dict[str, int] = {}
    _cp_self_attention_modules: tuple[str, ...] = ("blocks.*.attn1", "vap_blocks.*.attn1")

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
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        text_len: int = 512,
        vap_layers: list[int] | tuple[int, ...] = RELEASE_VAP_LAYERS,
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
            text_len=text_len,
        )
        layers = [int(i) for i in vap_layers]
        if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= num_layers:
            raise ValueError(
                f"vap_layers must be increasing, distinct DiT layer indices in [0, {num_layers}); got {list(vap_layers)} "
                "(the release uses 0, 4, ..., 36)"
            )
        inner_dim = num_attention_heads * attention_head_dim
        self.vap_patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.vap_condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim,
            time_freq_dim=freq_dim,
            time_proj_dim=inner_dim * 6,
            text_embed_dim=text_dim,
            image_embed_dim=image_dim,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        def block(cls: type[WanTransformerBlock]) -> WanTransformerBlock:
            new = cls(inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
            if added_kv_proj_dim is not None:
                new.attn2.set_processor(WanTextLenAttnProcessor(text_len))
            return new

        self.vap_blocks = nn.ModuleList([block(WanVideoAsPromptReferenceBlock) for _ in layers])
        # the joint attention lives in the processors: every block (main and reference) runs its stock forward
        for layer, vap_block in zip(layers, self.vap_blocks):
            self.blocks[layer] = block(WanVideoAsPromptMoTBlock)
            stream = _ReferenceStream()
            self.blocks[layer].attn1.set_processor(WanVideoAsPromptJointAttnProcessor(stream, vap_block))
            vap_block.attn1.set_processor(WanVideoAsPromptReferenceAttnProcessor(stream))

    # ------------------------------------------------------------------------------------------------ helpers
    def vap_rotary_emb(self, vap_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE of the reference tokens: frame positions ``-F .. -1``, height / width positions ``0 ..``.

        Computed by the ``rope`` module's own forward (so offload hooks on it bring its tables in): the tables of
        frames ``0 .. F``, frames ``F .. 1`` taken in that order, and the temporal ``sin`` negated
        (``cos(-x) = cos(x)``, ``sin(-x) = -sin(x)``)."""
        _, _, f, h, w = vap_hidden_states.shape
        p_t = self.config.patch_size[0]
        ppf = f // p_t
        grid = vap_hidden_states.new_zeros(()).expand(1, 1, (ppf + 1) * p_t, h, w)  # shape only, no memory
        cos, sin = self.rope(grid)
        cos = cos.unflatten(1, (ppf + 1, -1))[:, 1:].flip(1).flatten(1, 2)
        sin = sin.unflatten(1, (ppf + 1, -1))[:, 1:].flip(1).flatten(1, 2)
        t = self.rope.t_dim
        return cos, torch.cat([-sin[..., :t], sin[..., t:]], dim=-1)

    def _embed_reference(self, batch_size: int, vap_hidden_states: torch.Tensor, context: torch.Tensor,
                         context_image: torch.Tensor | None, timestep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The reference stream's block inputs ``(tokens, context, temb, rope_cos, rope_sin)``."""
        x = _match_batch(vap_hidden_states, batch_size, "vap_hidden_states")
        cos, sin = self.vap_rotary_emb(x)
        x = self.vap_patch_embedding(x.to(self.vap_patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2).contiguous()
        context = _match_batch(context, batch_size, "vap_encoder_hidden_states")
        image = None if context_image is None else _match_batch(
            context_image, batch_size, "vap_encoder_hidden_states_image")
        _, proj, context, image = self.vap_condition_embedder(timestep.expand(batch_size), context, image)
        if image is not None:
            context = torch.concat([image, context], dim=1)
        return x, context, proj.unflatten(1, (6, -1)), cos, sin

    def _check_vap_inputs(self, hidden_states, timestep, vap_hidden_states, vap_encoder_hidden_states,
                          vap_encoder_hidden_states_image) -> None:
        cfg = self.config
        if vap_hidden_states.ndim != 5 or vap_hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"vap_hidden_states must be [B, {cfg.in_channels}, F, H, W] (the reference video's latents "
                f"concatenated with the I2V condition of its first frame), got {tuple(vap_hidden_states.shape)}"
            )
        if tuple(vap_hidden_states.shape[-2:]) != tuple(hidden_states.shape[-2:]):
            raise ValueError(
                f"vap_hidden_states has latent size {tuple(vap_hidden_states.shape[-2:])} but hidden_states has "
                f"{tuple(hidden_states.shape[-2:])}: encode the reference video at the generated video's size"
            )
        if vap_encoder_hidden_states is None:
            raise ValueError("vap_hidden_states needs vap_encoder_hidden_states (the umT5 context of vap_prompt)")
        if cfg.image_dim is not None and vap_encoder_hidden_states_image is None:
            raise ValueError(
                "vap_hidden_states needs vap_encoder_hidden_states_image (CLIP features of the reference video's first "
                "frame): this transformer has a CLIP branch"
            )
        if timestep.ndim != 1:
            raise ValueError("Video-As-Prompt takes one timestep per sample (shape [B]); per-token timesteps are TI2V's")
        foreign = [i for i in self.config.vap_layers
                   if not isinstance(self.blocks[i].attn1.processor, WanVideoAsPromptJointAttnProcessor)]
        if foreign:
            raise ValueError(
                f"the self-attention processors of the MoT layers {foreign} were replaced "
                f"({type(self.blocks[foreign[0]].attn1.processor).__name__}); the joint attention needs "
                "WanVideoAsPromptJointAttnProcessor there (use set_attention_backend to change the kernel)"
            )

    # ------------------------------------------------------------------------------------------------ forward
    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.LongTensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        vap_hidden_states: torch.Tensor | None = None,
        vap_encoder_hidden_states: torch.Tensor | None = None,
        vap_encoder_hidden_states_image: torch.Tensor | None = None,
        vap_timestep: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, in_channels, F, H, W)`):
                Noisy latents concatenated with the I2V condition ``y`` (mask + image latents).
            timestep (`torch.Tensor` of shape `(B,)`): diffusion timesteps in [0, 1000].
            encoder_hidden_states (`torch.Tensor` of shape `(B, text_len, text_dim)`): umT5 context of the prompt.
            encoder_hidden_states_image (`torch.Tensor` of shape `(B, 257, image_dim)`): CLIP features of the image.
            vap_hidden_states (`torch.Tensor` of shape `(B or 1, in_channels, F_ref, H, W)`, *optional*):
                The reference video: its normalized latents concatenated with the I2V condition of its first
                frame.  ``None`` runs the plain image-to-video DiT (the reference stream is skipped).
            vap_encoder_hidden_states (`torch.Tensor` of shape `(B or 1, text_len, text_dim)`):
                umT5 context of ``vap_prompt`` (the reference video's caption).
            vap_encoder_hidden_states_image (`torch.Tensor` of shape `(B or 1, 257, image_dim)`):
                CLIP features of the reference video's first frame.
            vap_timestep (`torch.Tensor` of shape `(B,)`, *optional*):
                Timestep of the reference stream; default 1 (the clean reference, as the release does).
            return_dict, attention_kwargs: as in :meth:`diffusers.WanTransformer3DModel.forward` (the whole forward,
                reference stream included, runs inside it).
        """
        if vap_hidden_states is None:
            if vap_encoder_hidden_states is not None or vap_encoder_hidden_states_image is not None:
                raise ValueError(
                    "vap_encoder_hidden_states / vap_encoder_hidden_states_image given without vap_hidden_states: "
                    "pass the reference video's latents as vap_hidden_states"
                )
            reference = None
        else:
            self._check_vap_inputs(hidden_states, timestep, vap_hidden_states, vap_encoder_hidden_states,
                                   vap_encoder_hidden_states_image)
            vap_timestep = torch.ones_like(timestep) if vap_timestep is None else vap_timestep
            reference = self._embed_reference(hidden_states.shape[0], vap_hidden_states, vap_encoder_hidden_states,
                                              vap_encoder_hidden_states_image, vap_timestep)
        return self._forward_streams(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                                     reference, return_dict)

    def _forward_streams(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                         reference, return_dict):
        """Stock ``WanTransformer3DModel.forward``, with the reference stream passed through the MoT layers."""
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (num_frames // p_t, height // p_h, width // p_w)
        rotary_emb = self.rope(hidden_states)
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)

        ts_seq_len = None
        if timestep.ndim == 2:  # per-token timesteps (Wan2.2 TI2V layout), only without the reference
            ts_seq_len = timestep.shape[1]
            timestep = timestep.flatten()
        temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=ts_seq_len
        )
        timestep_proj = timestep_proj.unflatten(2 if ts_seq_len is not None else 1, (6, -1))
        if encoder_hidden_states_image is not None:
            encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

        for block in self.blocks:
            args = (hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
            mot = reference is not None and isinstance(block, WanVideoAsPromptMoTBlock)
            if mot:
                args = (*args, reference)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, *args)
            else:
                hidden_states = block(*args)
            if mot:
                reference = (block.reference_output(reference[0]), *reference[1:])

        output = self._output_projection(hidden_states, temb, batch_size, grid)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
