"""``WanFunTransformer3DModel``: the Wan-Fun (VideoX-Fun / PAI) transformer as a small delta on stock Diffusers.

Everything the Fun checkpoints share with Wan keeps stock ``WanTransformer3DModel`` names (so stock Wan LoRAs,
hooks, offloading, caching and attention backends apply).  The additions:

* any ``in_channels`` -- 16 noisy latents plus what the pipeline concatenates: 32 (Wan2.1 camera: image latents),
  36 (InP / Wan2.2 camera: mask + image latents), 48 (Wan2.1 control: control latents + image latents),
  52 (Wan2.2 control: control latents + mask + image latents);
* ``ref_conv`` (Fun V1.1 Control, Wan2.2-Fun Control): the VAE latent of a reference image becomes ``h*w`` tokens
  prepended to the video tokens at RoPE frame 0 (the video frames move to 1..F) and dropped before the head;
* ``control_adapter`` (Control-Camera): :class:`~diffusers_wan_ext.models.camera_adapter.WanCameraControlAdapter`
  on the packed Plücker map, added to the patch embeddings;
* the CLIP image branch is optional (Wan2.2-Fun has none: ``image_dim=None``), and its image/text split follows
  ``text_len`` (see :class:`~diffusers_wan_ext.models.transformer_wan_ext.WanExtTransformer3DModel`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffusers import ModelMixin  # noqa: F401  (Diffusers' loader looks up loadable bases in this module)
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils.peft_utils import apply_lora_scale

from .camera_adapter import WanCameraControlAdapter
from .transformer_wan_ext import WanExtTransformer3DModel

__all__ = ["WanFunTransformer3DModel"]


class WanFunTransformer3DModel(WanExtTransformer3DModel):
    r"""
    Wan-Fun transformer: stock Wan layers plus the optional ``ref_conv`` and camera ``control_adapter``.

    Args:
        patch_size, num_attention_heads, attention_head_dim, in_channels, out_channels, text_dim, freq_dim, ffn_dim,
        num_layers, cross_attn_norm, qk_norm, eps, image_dim, added_kv_proj_dim, rope_max_seq_len, pos_embed_seq_len:
            as in :class:`diffusers.WanTransformer3DModel` (``image_dim=None`` for the CLIP-free Wan2.2-Fun models).
        text_len (`int`, defaults to 512):
            Text tokens at the end of the cross-attention context (image/text split of the CLIP branch).
        ref_conv_in_channels (`int`, *optional*):
            Latent channels of the reference image (16); adds ``ref_conv``.  ``None``: no reference image.
        control_adapter_in_channels (`int`, *optional*):
            Channels of the packed camera map (24); adds ``control_adapter``.  ``None``: no camera control.
        control_adapter_downscale_factor (`int`, defaults to 8):
            Pixel-unshuffle factor of the camera adapter (the VAE's spatial factor).

    Example:
        >>> import torch
        >>> from diffusers_wan_ext import WanFunTransformer3DModel
        >>> model = WanFunTransformer3DModel(num_attention_heads=2, attention_head_dim=24, in_channels=52,
        ...     text_dim=32, freq_dim=32, ffn_dim=96, num_layers=1, ref_conv_in_channels=16)
        >>> x = torch.randn(1, 52, 3, 8, 8)
        >>> out = model(x, torch.tensor([500.0]), torch.randn(1, 512, 32),
        ...             reference_latents=torch.randn(1, 16, 1, 8, 8), return_dict=False)[0]
        >>> tuple(out.shape)
        (1, 16, 3, 8, 8)
    """

    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm", "ref_conv", "control_adapter"]
    _no_split_modules = ["WanTransformerBlock"]
    _repeated_blocks = ["WanTransformerBlock"]
    # stock Wan's plan (inherited) fits: reference tokens are prepended and camera features added before
    # ``blocks.0``, whose tokens -- and the RoPE table built for the same F+1 frames -- are split; the reference
    # tokens are dropped only after ``proj_out``, where the sequence is gathered back
    _cp_plan = WanExtTransformer3DModel._cp_plan
    # sliding windows: the camera map has one entry per latent frame (axis 2) and is sliced with the latents; the
    # reference image (reference_latents) goes whole to every window, as DiffSynth passes it
    _sliding_window_inputs: dict[str, int] = {"control_camera_latents": 2}

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
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        text_len: int = 512,
        ref_conv_in_channels: int | None = None,
        control_adapter_in_channels: int | None = None,
        control_adapter_downscale_factor: int = 8,
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
        inner_dim = num_attention_heads * attention_head_dim
        spatial_patch = tuple(patch_size[1:])
        self.ref_conv = None
        if ref_conv_in_channels:
            self.ref_conv = nn.Conv2d(ref_conv_in_channels, inner_dim, kernel_size=spatial_patch, stride=spatial_patch)
        self.control_adapter = None
        if control_adapter_in_channels:
            self.control_adapter = WanCameraControlAdapter(
                control_adapter_in_channels, inner_dim, spatial_patch, control_adapter_downscale_factor
            )

    # ------------------------------------------------------------------------------------------------------------
    def _check_conditioning(self, hidden_states, timestep, reference_latents, control_camera_latents) -> None:
        cfg = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be [B, {cfg.in_channels}, F, H, W] (noisy latents concatenated with the "
                f"conditioning channels this checkpoint expects), got {tuple(hidden_states.shape)}"
            )
        _, _, f, h, w = hidden_states.shape
        if reference_latents is not None:
            if self.ref_conv is None:
                raise ValueError(
                    "reference_latents given, but this transformer has no ref_conv: reference images need a Fun V1.1 "
                    "Control or Wan2.2-Fun Control checkpoint"
                )
            if reference_latents.ndim not in (4, 5) or tuple(reference_latents.shape[-2:]) != (h, w) or (
                reference_latents.shape[1] != cfg.ref_conv_in_channels
            ):
                raise ValueError(
                    f"reference_latents must be [B, {cfg.ref_conv_in_channels}, 1, {h}, {w}] (the VAE latent of the "
                    f"reference image at the video size), got {tuple(reference_latents.shape)}"
                )
            if timestep.ndim == 2:
                raise ValueError("per-token timesteps (TI2V) cannot be combined with reference_latents")
        if control_camera_latents is not None:
            if self.control_adapter is None:
                raise ValueError(
                    "control_camera_latents given, but this transformer has no control_adapter: camera control needs "
                    "a Fun Control-Camera checkpoint"
                )
            d = cfg.control_adapter_downscale_factor
            want = (cfg.control_adapter_in_channels, f, h * d, w * d)
            if control_camera_latents.ndim != 5 or tuple(control_camera_latents.shape[1:]) != want:
                raise ValueError(
                    f"control_camera_latents must be [B, {want[0]}, {f}, {want[2]}, {want[3]}] (packed Plücker map at "
                    f"pixel resolution, one entry per latent frame), got {tuple(control_camera_latents.shape)}"
                )

    @staticmethod
    def _match_batch(t: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
        if t.shape[0] == batch_size:
            return t
        if t.shape[0] == 1 or batch_size % t.shape[0] == 0:
            return t.repeat(batch_size // t.shape[0], *([1] * (t.ndim - 1)))
        raise ValueError(f"{name} has batch {t.shape[0]}, which does not divide the latent batch {batch_size}")

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.LongTensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        control_camera_latents: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, in_channels, F, H, W)`):
                Noisy latents concatenated (channels) with the pipeline's conditioning latents.
            timestep (`torch.Tensor` of shape `(B,)` or `(B, seq_len)`): diffusion timesteps in [0, 1000].
            encoder_hidden_states (`torch.Tensor` of shape `(B, text_len, text_dim)`): umT5 context.
            encoder_hidden_states_image (`torch.Tensor`, *optional*): CLIP features `(B, 257, image_dim)`.
            reference_latents (`torch.Tensor`, *optional*):
                VAE latent of the reference image `(B, 16, 1, H, W)` (models with ``ref_conv``).
            control_camera_latents (`torch.Tensor`, *optional*):
                Packed Plücker camera map `(B, 24, F, 8H, 8W)` (models with ``control_adapter``).
            return_dict, attention_kwargs: as in :meth:`diffusers.WanTransformer3DModel.forward`.
        """
        self._check_conditioning(hidden_states, timestep, reference_latents, control_camera_latents)
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w

        hidden_states = self.patch_embedding(hidden_states)
        if control_camera_latents is not None:
            camera = self.control_adapter(control_camera_latents.to(self.control_adapter.conv.weight.dtype))
            hidden_states = hidden_states + self._match_batch(camera, batch_size, "control_camera_latents").to(
                hidden_states.dtype
            )
        hidden_states = hidden_states.flatten(2).transpose(1, 2)

        num_ref_tokens = 0
        if reference_latents is not None:
            ref = reference_latents[:, :, 0] if reference_latents.ndim == 5 else reference_latents
            ref = self.ref_conv(ref.to(self.ref_conv.weight.dtype)).flatten(2).transpose(1, 2)
            ref = self._match_batch(ref, batch_size, "reference_latents").to(hidden_states.dtype)
            num_ref_tokens = ref.shape[1]
            hidden_states = torch.cat([ref, hidden_states], dim=1)
        hidden_states = hidden_states.contiguous()

        # reference tokens take RoPE frame 0 and the video frames shift to 1..F: one RoPE grid of F+1 frames
        # (the rope module's input only gives the grid's shape: an expanded scalar on the input's device, so that
        # offload hooks can move it; a meta tensor cannot be moved)
        rope_frames = num_frames + (p_t if num_ref_tokens else 0)
        rotary_emb = self.rope(hidden_states.new_zeros(()).expand(1, 1, rope_frames, height, width))

        if timestep.ndim == 2:  # per-token timesteps (Wan2.2 TI2V layout)
            ts_seq_len = timestep.shape[1]
            timestep = timestep.flatten()
        else:
            ts_seq_len = None
        temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=ts_seq_len
        )
        timestep_proj = timestep_proj.unflatten(2 if ts_seq_len is not None else 1, (6, -1))
        if encoder_hidden_states_image is not None:
            encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb
                )
            else:
                hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)

        output = self._output_projection(hidden_states, temb, batch_size, (ppf, pph, ppw), skip_tokens=num_ref_tokens)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
