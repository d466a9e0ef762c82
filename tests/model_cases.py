"""The model classes we ship, as tiny cases for the shared model-behaviour tests (``tests/test_model_classes.py``).

A case is a class, its tiny ``__init__`` keywords and a factory of tiny forward inputs; a new class is covered by
adding one case to :func:`model_cases`.  Widths are 48 (2 heads of 24), 2-3 layers, 2 latent frames of 8x8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from diffusers_wan_ext import (
    AutoencoderDac,
    LongCatVideoTransformer3DModel,
    MovaAudioTransformer1DModel,
    MovaDualTowerBridge,
    WanAnimate2ExtTransformer3DModel,
    WanAnimateExtTransformer3DModel,
    WanDancerTransformer3DModel,
    WanExtTransformer3DModel,
    WanFunTransformer3DModel,
    WanMotionControllerModel,
    WanS2VTransformer3DModel,
    WanVideoAsPromptTransformer3DModel,
)

__all__ = ["ModelCase", "model_cases"]

WAN_TINY = dict(num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=96)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class ModelCase:
    """One model class under test.

    Args:
        name: test id.
        model_class: the class.
        init_kwargs: tiny ``__init__`` keywords.
        make_inputs: ``make_inputs(seed)`` -> forward keywords (tensors of batch 1).
        output_field: the output dataclass field holding the result.
        is_transformer: has ``blocks``, step caches (``CacheMixin``) and context-parallel declarations.
        lora_targets: module-name suffixes a PEFT LoRA targets.
        cache_kwargs: step cache (``fbc``, ``mag``, ``taylorseer``, ``pab``) -> config keywords for this class.
        skip: test name -> why the test does not apply to this class.
        block_passes: passes over ``blocks`` per forward (Animate-2's one-call form: the reference pass, then the
            generation pass).
    """

    name: str
    model_class: type
    init_kwargs: dict[str, Any]
    make_inputs: Callable[[int], dict[str, Any]]
    output_field: str = "sample"
    is_transformer: bool = True
    lora_targets: tuple[str, ...] = LORA_TARGETS
    cache_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip: dict[str, str] = field(default_factory=dict)
    block_passes: int = 1

    def build(self, seed: int = 0) -> torch.nn.Module:
        """The model in eval mode, every parameter perturbed (stock inits leave some paths at zero)."""
        torch.manual_seed(seed)
        model = self.model_class(**self.init_kwargs).eval()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.05)
        return model

    def output(self, result) -> torch.Tensor:
        """The result tensor of a forward (``return_dict=True``)."""
        return getattr(result, self.output_field)


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _wan_ext_inputs(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_rand(g, 1, 16, 2, 8, 8), timestep=torch.tensor([700.0]),
                encoder_hidden_states=_rand(g, 1, 8, 32), encoder_hidden_states_image=_rand(g, 1, 4, 40))


def _fun_ref_inputs(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_rand(g, 1, 36, 2, 8, 8), timestep=torch.tensor([700.0]),
                encoder_hidden_states=_rand(g, 1, 8, 32), reference_latents=_rand(g, 1, 16, 1, 8, 8))


def _fun_camera_inputs(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_rand(g, 1, 32, 2, 8, 8), timestep=torch.tensor([700.0]),
                encoder_hidden_states=_rand(g, 1, 8, 32), control_camera_latents=_rand(g, 1, 24, 2, 16, 16))


def _vap_inputs(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_rand(g, 1, 36, 2, 8, 8), timestep=torch.tensor([700.0]),
                encoder_hidden_states=_rand(g, 1, 8, 32), encoder_hidden_states_image=_rand(g, 1, 4, 40),
                vap_hidden_states=_rand(g, 1, 36, 2, 8, 8), vap_encoder_hidden_states=_rand(g, 1, 8, 32),
                vap_encoder_hidden_states_image=_rand(g, 1, 4, 40))


def _s2v_inputs(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_rand(g, 1, 16, 2, 8, 8), timestep=torch.tensor([700.0]),
                encoder_hidden_states=_rand(g, 1, 8, 32), audio_embeds=_rand(g, 1, 3, 32, 8),
                image_latents=_rand(g, 1, 16, 1, 8, 8), pose_latents=_rand(g, 1, 16, 2, 8, 8),
                motion_latents=_rand(g, 1, 16, 3, 8, 8))


def _animate_inputs(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_rand(g, 1, 36, 3, 8, 8), timestep=torch.tensor([700.0]),
                encoder_hidden_states=_rand(g, 1, 8, 32), encoder_hidden_states_image=_rand(g, 1, 4, 40),
                pose_hidden_states=_rand(g, 1, 16, 2, 8, 8), face_pixel_values=_rand(g, 1, 3, 5, 16, 16))


def _animate2_inputs(seed: int) -> dict[str, Any]:
    """The one-call form: the driving video's latents + condition_y fill a fresh K/V cache (``extract``), then the
    generation latents (one frame more: the reference image's slot) attend to it (``cached``)."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_rand(g, 1, 36, 3, 8, 8), timestep=torch.tensor([700.0]),
                encoder_hidden_states=_rand(g, 1, 8, 32), encoder_hidden_states_image=_rand(g, 1, 4, 40),
                reference_hidden_states=_rand(g, 1, 36, 2, 8, 8), reference_encoder_hidden_states=_rand(g, 1, 8, 32),
                reference_image_embeds=_rand(g, 1, 4, 40), log_scale=-1.3)


def _longcat_inputs(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_rand(g, 1, 16, 2, 8, 8), timestep=torch.tensor([700.0]),
                encoder_hidden_states=_rand(g, 1, 8, 32), num_cond_latents=1)


def _mova_audio_inputs(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_rand(g, 1, 128, 19), timestep=torch.tensor([700.0]),
                encoder_hidden_states=_rand(g, 1, 8, 32))


def _mova_bridge_inputs(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(visual_hidden_states=_rand(g, 1, 32, 48), audio_hidden_states=_rand(g, 1, 19, 36), layer_index=1,
                video_grid_size=(2, 4, 4), frame_rate=24.0)


def _dancer_inputs(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_rand(g, 1, 36, 2, 8, 8), timestep=torch.tensor([700.0]),
                encoder_hidden_states=_rand(g, 1, 8, 32), encoder_hidden_states_image=_rand(g, 1, 257, 40),
                reference_image_embeds=_rand(g, 1, 257, 40), music_features=_rand(g, 24, 35), fps=7.5)


def _dac_inputs(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=_rand(g, 1, 1, 48))


def _motion_controller_inputs(seed: int) -> dict[str, Any]:
    return dict(motion_bucket_id=torch.tensor([10.0 + 7 * seed]))


def model_cases() -> list[ModelCase]:
    """Every model class we ship, one tiny case each (the Fun transformer twice: reference image and camera)."""
    return [
        ModelCase("wan_ext", WanExtTransformer3DModel,
                  dict(WAN_TINY, num_layers=2, image_dim=40, added_kv_proj_dim=48, text_len=8), _wan_ext_inputs),
        ModelCase("fun_ref", WanFunTransformer3DModel,
                  dict(WAN_TINY, num_layers=2, in_channels=36, ref_conv_in_channels=16), _fun_ref_inputs),
        ModelCase("fun_camera", WanFunTransformer3DModel,
                  dict(WAN_TINY, num_layers=2, in_channels=32, control_adapter_in_channels=24,
                       control_adapter_downscale_factor=2), _fun_camera_inputs),
        ModelCase("vap", WanVideoAsPromptTransformer3DModel,
                  dict(WAN_TINY, num_layers=3, in_channels=36, image_dim=40, added_kv_proj_dim=48, text_len=8,
                       vap_layers=[0]), _vap_inputs,
                  # the reference blocks' attention must run whenever its MoT layer's does: cache the main blocks
                  cache_kwargs={"pab": dict(spatial_attention_block_identifiers=("^blocks",))}),
        ModelCase("s2v", WanS2VTransformer3DModel,
                  dict(WAN_TINY, num_layers=2, audio_dim=32, audio_num_layers=3, audio_inject_layers=[0, 1]),
                  _s2v_inputs),
        ModelCase("animate", WanAnimateExtTransformer3DModel,
                  dict(WAN_TINY, num_layers=2, image_dim=40, added_kv_proj_dim=48, text_len=8,
                       motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 8}, motion_encoder_size=16,
                       motion_style_dim=16, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
                       face_encoder_num_heads=2, inject_face_latents_blocks=2), _animate_inputs),
        ModelCase("animate2", WanAnimate2ExtTransformer3DModel,
                  dict(text_len=8, dim=48, ffn_dim=96, freq_dim=32, text_dim=32, num_heads=2, num_layers=2, clip_dim=40),
                  _animate2_inputs, block_passes=2,
                  skip={"caches": "one forward runs the reference pass and the generation pass through the same blocks "
                                  "(a step cache would serve one from the other); TeaCache is refused for the same "
                                  "reason",
                        "compile": "the token grids are tensors read on the host (stock's forward and its per-frame "
                                   "masks too): data-dependent shapes, no full graph; stock compiles only its flex "
                                   "attention"}),
        ModelCase("longcat", LongCatVideoTransformer3DModel,
                  dict(num_attention_heads=2, attention_head_dim=24, num_layers=2, text_dim=32, freq_dim=32,
                       time_embed_dim=32, ffn_dim=64), _longcat_inputs),
        ModelCase("mova_audio", MovaAudioTransformer1DModel,
                  dict(num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=96,
                       num_layers=2, rope_max_seq_len=64), _mova_audio_inputs),
        ModelCase("mova_bridge", MovaDualTowerBridge,
                  dict(visual_layers=3, audio_layers=2, visual_hidden_dim=48, audio_hidden_dim=36, head_dim=12),
                  _mova_bridge_inputs, output_field="visual_hidden_states", is_transformer=False,
                  skip={"gradient_checkpointing": "cross-attention pairs called per layer by the joint forward: no "
                                                  "block loop of its own to checkpoint",
                        "caches": "not a transformer: no blocks for step caches"}),
        ModelCase("dancer", WanDancerTransformer3DModel,
                  dict(WAN_TINY, num_layers=2, in_channels=36, image_dim=40, added_kv_proj_dim=48, text_len=8,
                       music_latent_dim=16, music_ff_size=32, music_inject_layers=[1]), _dancer_inputs),
        ModelCase("audio_vae_dac", AutoencoderDac,
                  dict(encoder_dim=4, encoder_rates=(2, 3), latent_dim=8, decoder_dim=16, decoder_rates=(3, 2),
                       sample_rate=600), _dac_inputs, is_transformer=False, lora_targets=("post_quant_conv",),
                  skip={"caches": "an audio VAE: no blocks for step caches"}),
        ModelCase("motion_controller", WanMotionControllerModel, dict(freq_dim=32, dim=48),
                  _motion_controller_inputs, output_field="offset", is_transformer=False,
                  lora_targets=("linear.0", "linear.2", "linear.4"),
                  skip={"gradient_checkpointing": "a 3-layer MLP: it declares no gradient checkpointing",
                        "caches": "not a transformer: no blocks for step caches"}),
    ]
