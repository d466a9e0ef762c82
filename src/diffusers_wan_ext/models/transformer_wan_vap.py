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

Everything of the main stream keeps stock :class:`diffusers.WanTransformer3DModel` names (LoRAs, hooks, offloading
and attention backends apply).  The reference stream's modules are stock modules as well, under ``vap_`` names in
the style of stock ``WanVACETransformer3DModel`` (``vace_patch_embedding`` / ``vace_blocks``):
``vap_patch_embedding``, ``vap_condition_embedder`` (a stock ``WanTimeTextImageEmbedding``) and ``vap_blocks.k``
(stock ``WanTransformerBlock``; ``k`` = position in ``vap_layers``).  The release's ``*_mot_ref`` key layout is
converted by :mod:`diffusers_wan_ext.conversion.vap`.

Reference behaviour: ByteDance's release code (``WanTransformer3DMOTModel``).  DiffSynth-Studio 2.1.12 computes the
same except that its ``model_fn_wan_video`` overwrites the main time embedding with the reference stream's before
the output head (a variable-shadowing bug, see the ``dit_vap`` golden); we follow ByteDance.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ModelMixin  # noqa: F401  (Diffusers' loader looks up loadable bases in this module)
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding, WanTransformerBlock
from diffusers.utils.peft_utils import apply_lora_scale
from torch import nn

from .attention_processor import WanTextLenAttnProcessor, wan_attention_output, wan_self_attention_qkv
from .transformer_wan_ext import WanExtTransformer3DModel

__all__ = ["RELEASE_VAP_LAYERS", "WanVideoAsPromptTransformer3DModel"]

#: ``block_idx_with_mot_ref`` of ByteDance/Video-As-Prompt-Wan2.1-14B (DiffSynth's ``mot_layers``).
RELEASE_VAP_LAYERS: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 28, 32, 36)


def _block_modulation(block: WanTransformerBlock, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The six modulation vectors of a Wan block for a ``[B, 6, D]`` time projection (as stock computes them)."""
    return (block.scale_shift_table + temb.float()).chunk(6, dim=1)


def _block_after_self_attention(block: WanTransformerBlock, hidden_states, context, modulation) -> torch.Tensor:
    """Steps 2-3 of stock ``WanTransformerBlock.forward``: cross-attention and the modulated FFN."""
    _, _, _, c_shift, c_scale, c_gate = modulation
    norm = block.norm2(hidden_states.float()).type_as(hidden_states)
    hidden_states = hidden_states + block.attn2(norm, context, None, None)
    norm = (block.norm3(hidden_states.float()) * (1 + c_scale) + c_shift).type_as(hidden_states)
    ff = block.ffn(norm)
    return (hidden_states.float() + ff.float() * c_gate).type_as(hidden_states)


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

    _no_split_modules = ["WanTransformerBlock"]
    _repeated_blocks = ["WanTransformerBlock"]

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
        self.vap_blocks = nn.ModuleList(
            [
                WanTransformerBlock(
                    inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim
                )
                for _ in layers
            ]
        )
        if added_kv_proj_dim is not None:
            for block in self.vap_blocks:
                block.attn2.set_processor(WanTextLenAttnProcessor(text_len))
        self._vap_index = {layer: k for k, layer in enumerate(layers)}

    # ------------------------------------------------------------------------------------------------ helpers
    def vap_rotary_emb(self, vap_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE of the reference tokens: frame positions ``-F .. -1``, height / width positions ``0 ..``."""
        rope = self.rope
        _, _, f, h, w = vap_hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        ppf, pph, ppw = f // p_t, h // p_h, w // p_w
        device = rope.freqs_cos.device
        positions = torch.arange(-ppf, 0, device=device, dtype=torch.float64)
        cos_f, sin_f = get_1d_rotary_pos_embed(
            rope.t_dim, positions, use_real=True, repeat_interleave_real=True, freqs_dtype=torch.float64
        )
        split = [rope.t_dim, rope.h_dim, rope.w_dim]
        out = []
        for table, frames in ((rope.freqs_cos, cos_f), (rope.freqs_sin, sin_f)):
            _, table_h, table_w = table.split(split, dim=1)
            out.append(torch.cat([
                frames.to(table.dtype).view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1),
                table_h[:pph].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1),
                table_w[:ppw].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1),
            ], dim=-1).reshape(1, ppf * pph * ppw, 1, -1))
        return out[0], out[1]

    def _joint_block(self, block, vap_block, x, context, temb, rope, xv, context_v, temb_v, rope_v):
        """One MoT layer: joint self-attention of both streams, then each stream's cross-attention and FFN."""
        mod = _block_modulation(block, temb)
        mod_v = _block_modulation(vap_block, temb_v)
        nx = (block.norm1(x.float()) * (1 + mod[1]) + mod[0]).type_as(x)
        nxv = (vap_block.norm1(xv.float()) * (1 + mod_v[1]) + mod_v[0]).type_as(xv)
        q, k, v = wan_self_attention_qkv(block.attn1, nx, rope)
        qv, kv, vv = wan_self_attention_qkv(vap_block.attn1, nxv, rope_v)
        joint = dispatch_attention_fn(
            torch.cat([q, qv], dim=1), torch.cat([k, kv], dim=1), torch.cat([v, vv], dim=1),
            attn_mask=None, dropout_p=0.0, is_causal=False, backend=block.attn1.processor._attention_backend,
        )
        out, out_v = joint.split([q.shape[1], qv.shape[1]], dim=1)
        x = (x.float() + wan_attention_output(block.attn1, out, q) * mod[2]).type_as(x)
        xv = (xv.float() + wan_attention_output(vap_block.attn1, out_v, qv) * mod_v[2]).type_as(xv)
        x = _block_after_self_attention(block, x, context, mod)
        xv = _block_after_self_attention(vap_block, xv, context_v, mod_v)
        return x, xv

    def _check_vap_inputs(self, hidden_states, vap_hidden_states, vap_encoder_hidden_states,
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

    @staticmethod
    def _match_batch(t: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
        if t.shape[0] == batch_size:
            return t
        if t.shape[0] == 1:
            return t.expand(batch_size, *t.shape[1:])
        raise ValueError(f"{name} has batch {t.shape[0]}, expected 1 or {batch_size} (the latent batch)")

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
            return_dict, attention_kwargs: as in :meth:`diffusers.WanTransformer3DModel.forward`.
        """
        if vap_hidden_states is None:
            if vap_encoder_hidden_states is not None or vap_encoder_hidden_states_image is not None:
                raise ValueError(
                    "vap_encoder_hidden_states / vap_encoder_hidden_states_image given without vap_hidden_states: "
                    "pass the reference video's latents as vap_hidden_states"
                )
            return super().forward(
                hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                return_dict=return_dict, attention_kwargs=attention_kwargs,
            )
        if timestep.ndim != 1:
            raise ValueError("Video-As-Prompt takes one timestep per sample (shape [B]); per-token timesteps are TI2V's")
        self._check_vap_inputs(hidden_states, vap_hidden_states, vap_encoder_hidden_states,
                               vap_encoder_hidden_states_image)
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (num_frames // p_t, height // p_h, width // p_w)

        # main stream (stock prologue)
        rotary_emb = self.rope(hidden_states)
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj, context, context_image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        if context_image is not None:
            context = torch.concat([context_image, context], dim=1)

        # reference stream: clean timestep, negative frame positions, own prompt and CLIP features
        vap_hidden_states = self._match_batch(vap_hidden_states, batch_size, "vap_hidden_states")
        vap_context = self._match_batch(vap_encoder_hidden_states, batch_size, "vap_encoder_hidden_states")
        vap_image = vap_encoder_hidden_states_image
        if vap_image is not None:
            vap_image = self._match_batch(vap_image, batch_size, "vap_encoder_hidden_states_image")
        if vap_timestep is None:
            vap_timestep = torch.ones_like(timestep)
        vap_rotary_emb = self.vap_rotary_emb(vap_hidden_states)
        xv = self.vap_patch_embedding(vap_hidden_states.to(self.vap_patch_embedding.weight.dtype))
        xv = xv.flatten(2).transpose(1, 2).contiguous()
        _, vap_proj, vap_context, vap_context_image = self.vap_condition_embedder(
            vap_timestep.expand(batch_size), vap_context, vap_image
        )
        vap_proj = vap_proj.unflatten(1, (6, -1))
        if vap_context_image is not None:
            vap_context = torch.concat([vap_context_image, vap_context], dim=1)

        checkpoint = torch.is_grad_enabled() and self.gradient_checkpointing
        for index, block in enumerate(self.blocks):
            k = self._vap_index.get(index)
            if k is None:
                args = (block, x, context, timestep_proj, rotary_emb)
                x = self._gradient_checkpointing_func(*args) if checkpoint else block(*args[1:])
            else:
                args = (block, self.vap_blocks[k], x, context, timestep_proj, rotary_emb,
                        xv, vap_context, vap_proj, vap_rotary_emb)
                x, xv = self._gradient_checkpointing_func(self._joint_block, *args) if checkpoint else \
                    self._joint_block(*args)

        output = self._output_projection(x, temb, batch_size, grid)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
