"""MOVA's joint denoising forward: the video and the audio tower in lockstep, joined by the dual-tower bridge.

One forward (DiffSynth's ``model_fn_mova_audio_video``):

1. video tokens = ``patch_embedding(cat([video_latents, y]))`` (Wan2.2-I2V without CLIP: stock
   ``WanTransformer3DModel``), audio tokens = the audio DiT's ``Conv1d``; each tower embeds the shared timestep and
   the shared umT5 context with its own layers;
2. for ``i`` in ``0 .. audio_layers - 1``: the bridge updates both streams at its interaction layers, then video block
   ``i`` and audio block ``i`` run;
3. the remaining video blocks run alone; both heads give the video and the audio velocity.

Because the towers' parts are called one by one, the hooks that offloading puts on a tower's ``forward`` would never
run; :func:`run_pre_forward_hooks` / :func:`run_post_forward_hooks` run them around the joint forward (accelerate's
``enable_model_cpu_offload`` / sequential offload hooks, Diffusers' group offloading of the top-level layers), as
Diffusers' ``apply_forward_hook`` does for VAE ``encode`` / ``decode``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from .mova_bridge import MovaDualTowerBridge
from .transformer_mova_audio import MovaAudioTransformer1DModel

__all__ = ["mova_joint_forward", "run_post_forward_hooks", "run_pre_forward_hooks", "wan_video_embed",
           "wan_video_project_out", "wan_video_run_block"]

#: Diffusers' hook registry name of group offloading (``diffusers.hooks.group_offloading``).
GROUP_OFFLOADING_HOOK = "group_offloading"


def _forward_hooks(model: torch.nn.Module) -> list[Any]:
    hooks = []
    accelerate_hook = getattr(model, "_hf_hook", None)
    if accelerate_hook is not None and hasattr(accelerate_hook, "pre_forward"):
        hooks.append(accelerate_hook)
    registry = getattr(model, "_diffusers_hook", None)
    group = registry.get_hook(GROUP_OFFLOADING_HOOK) if registry is not None else None
    if group is not None:
        hooks.append(group)
    return hooks


def run_pre_forward_hooks(model: torch.nn.Module) -> None:
    """What the offloading hooks on ``model.forward`` do before it runs (onload its top-level weights)."""
    for hook in _forward_hooks(model):
        hook.pre_forward(model)


def run_post_forward_hooks(model: torch.nn.Module) -> None:
    """What the offloading hooks on ``model.forward`` do after it ran (offload what they onloaded)."""
    for hook in reversed(_forward_hooks(model)):
        hook.post_forward(model, None)


def wan_video_embed(transformer: WanTransformer3DModel, hidden_states: torch.Tensor, timestep: torch.Tensor,
                    encoder_hidden_states: torch.Tensor):
    """Stock Wan's forward up to the blocks: tokens ``[B, F*h*w, D]``, ``temb``, block modulation ``[B, 6, D]``,
    the embedded context and the RoPE of ``hidden_states`` ``[B, C, F, H, W]`` (scalar timesteps only)."""
    rotary_emb = transformer.rope(hidden_states)
    tokens = transformer.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
    temb, timestep_proj, context, _ = transformer.condition_embedder(timestep, encoder_hidden_states)
    return tokens, temb, timestep_proj.unflatten(1, (6, -1)), context, rotary_emb


def wan_video_run_block(transformer: WanTransformer3DModel, index: int, tokens: torch.Tensor, context: torch.Tensor,
                        timestep_proj: torch.Tensor, rotary_emb) -> torch.Tensor:
    """Video block ``index`` (through gradient checkpointing when enabled and training)."""
    block = transformer.blocks[index]
    if torch.is_grad_enabled() and transformer.gradient_checkpointing:
        return transformer._gradient_checkpointing_func(block, tokens, context, timestep_proj, rotary_emb)
    return block(tokens, context, timestep_proj, rotary_emb)


def wan_video_project_out(transformer: WanTransformer3DModel, tokens: torch.Tensor, temb: torch.Tensor,
                          grid: tuple[int, int, int]) -> torch.Tensor:
    """Stock Wan's head: modulated output norm, projection and unpatchify to ``[B, C_out, F, H, W]``."""
    shift, scale = (transformer.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    shift, scale = shift.to(tokens.device), scale.to(tokens.device)
    tokens = (transformer.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
    tokens = transformer.proj_out(tokens)
    p_t, p_h, p_w = transformer.config.patch_size
    tokens = tokens.reshape(tokens.shape[0], *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return tokens.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def mova_joint_forward(
    video_transformer: WanTransformer3DModel,
    audio_transformer: MovaAudioTransformer1DModel,
    bridge: MovaDualTowerBridge | None,
    video_latents: torch.Tensor,
    audio_latents: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    frame_rate: float,
    image_condition: torch.Tensor | None = None,
    condition_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(video_velocity [B, 16, F, H, W], audio_velocity [B, 128, L])`` of one joint MOVA forward.

    Args:
        video_transformer: the video expert for this timestep (a Wan2.2-I2V DiT without CLIP, 36 input channels).
        audio_transformer: the audio DiT.
        bridge: the dual-tower bridge (``None``: the towers run side by side without interaction).
        video_latents: noisy video latents ``[B, 16, F, H, W]``.
        audio_latents: noisy audio latents ``[B, 128, L]``.
        timestep: ``[B]`` in ``[0, 1000]``, shared by both towers.
        encoder_hidden_states: umT5 context ``[B, S, text_dim]``, shared by both towers.
        frame_rate: video frames per second (sets the bridge's time alignment).
        image_condition: ``y`` ``[B, 20, F, H, W]`` (first-frame mask + image VAE latents), concatenated to the
            video latents.
        condition_scale: multiplies the bridge's updates.
    """
    towers = (video_transformer, audio_transformer)
    for model in towers:
        run_pre_forward_hooks(model)
    try:
        return _joint_blocks(video_transformer, audio_transformer, bridge, video_latents, audio_latents, timestep,
                             encoder_hidden_states, frame_rate, image_condition, condition_scale)
    finally:
        for model in reversed(towers):
            run_post_forward_hooks(model)


def _joint_blocks(video_transformer, audio_transformer, bridge, video_latents, audio_latents, timestep,
                  encoder_hidden_states, frame_rate, image_condition, condition_scale):
    video_in = video_latents if image_condition is None else torch.cat([video_latents, image_condition], dim=1)
    v, v_temb, v_mod, v_ctx, v_rope = wan_video_embed(video_transformer, video_in, timestep, encoder_hidden_states)
    a, a_temb, a_mod, a_ctx, a_rope = audio_transformer.embed(audio_latents, timestep, encoder_hidden_states)
    p_t, p_h, p_w = video_transformer.config.patch_size
    grid = (video_in.shape[2] // p_t, video_in.shape[3] // p_h, video_in.shape[4] // p_w)
    num_video, num_audio = len(video_transformer.blocks), len(audio_transformer.blocks)
    if num_audio > num_video:
        raise ValueError(f"the audio DiT has {num_audio} blocks, more than the video DiT's {num_video}")
    layers = set(bridge.interaction_layers) if bridge is not None else set()
    cross_rope = bridge.rotary(grid, a.shape[1], frame_rate, v.device) if layers else None
    for i in range(num_audio):
        if i in layers:
            v, a = bridge(v, a, layer_index=i, rotary=cross_rope, condition_scale=condition_scale, return_dict=False)
        v = wan_video_run_block(video_transformer, i, v, v_ctx, v_mod, v_rope)
        a = audio_transformer.run_block(i, a, a_ctx, a_mod, a_rope)
    for i in range(num_audio, num_video):
        v = wan_video_run_block(video_transformer, i, v, v_ctx, v_mod, v_rope)
    return wan_video_project_out(video_transformer, v, v_temb, grid), audio_transformer.project_out(a, a_temb)
