"""The VACE family (Wan2.1-VACE 1.3B / 14B, VACE-Wan2.1-1.3B-Preview, Wan2.2-VACE-Fun-A14B): stock Diffusers.

The VACE DiT is a text-to-video DiT plus ``vace_blocks`` (full DiT blocks with hint projections) fed by a
``vace_patch_embedding`` of the control video; stock ``WanVACETransformer3DModel`` / ``WanVACEPipeline`` hold it.
Stock has no context-parallel plan for it: :data:`WAN_VACE_CP_PLAN` is registered for the stock class.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import WanVACEPipeline, WanVACETransformer3DModel
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import StateManager
from diffusers.models.transformers.transformer_wan_vace import WanVACETransformerBlock

from ..conversion.dit import BLOCK_KEY_MAP, DitExtension, DitInfo, DitShape, block_indices
from ..hooks.sliding_window import register_sliding_window_inputs
from ..hooks.teacache import TeaCacheState, register_teacache_side_blocks
from ..parallel.plans import register_cp_plan
from ..utils.io import ConversionError, format_keys
from .base import Conditioning, ExtraInput, ModelFamily, TinyArch, TrainingScope, WanVariant

__all__ = ["TeaCacheVaceHook", "VACE_TRAINING_SCOPE", "VaceFamily", "WAN_VACE_CP_PLAN", "encode_vace_condition"]

# Inside ``vace_blocks.N.``: a full DiT block plus the hint projections (stock ``WanVACETransformerBlock``).
VACE_BLOCK_KEY_MAP = BLOCK_KEY_MAP + (("before_proj", "proj_in"), ("after_proj", "proj_out"))

_TOKENS = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
#: VACE: video tokens at ``blocks.0``, control tokens (and the video tokens block 0 adds to them) at
#: ``vace_blocks.0``; the later VACE blocks take the already-local control stream.
WAN_VACE_CP_PLAN = {
    "rope": {
        0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
        1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
    },
    "vace_blocks.0": {"hidden_states": _TOKENS, "control_hidden_states": _TOKENS},
    "blocks.0": {"hidden_states": _TOKENS},
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}


def _config(shape: DitShape) -> dict[str, Any]:
    sd = shape.sd
    if "vace_patch_embedding.weight" not in sd:
        return {}
    n = block_indices(sd, "vace_blocks")
    if not n or n != list(range(len(n))):
        raise ConversionError(f"VACE blocks are not contiguous (found vace_blocks indices {n})")
    if "vace_blocks.0.before_proj.weight" not in sd:
        raise ConversionError("missing key vace_blocks.0.before_proj.weight (the first VACE block's input projection)")
    missing = [f"vace_blocks.{i}.after_proj.weight" for i in n if f"vace_blocks.{i}.after_proj.weight" not in sd]
    if missing:
        raise ConversionError(f"missing VACE hint projection(s): {format_keys(missing)}")
    num_layers = shape.num_layers
    if "vace_layers" in shape.cfg:
        layers = [int(i) for i in shape.cfg["vace_layers"]]
    else:  # releases: every 2nd (1.3B, 15 of 30) or every 5th block (14B, 8 of 40), starting at 0
        step = math.ceil(num_layers / len(n))
        layers = list(range(0, num_layers, step))
    if len(layers) != len(n) or layers[0] != 0 or max(layers) >= num_layers:
        raise ConversionError(
            f"{len(n)} VACE blocks (vace_blocks.*) but vace_layers {layers} for {num_layers} DiT blocks: give "
            "vace_layers in config.json (the DiT block indices after which each VACE hint is added, starting at 0)"
        )
    return {"vace_layers": layers, "vace_in_channels": int(sd["vace_patch_embedding.weight"].shape[1])}


def _detect(shape: DitShape, ext: dict[str, Any]) -> str | None:
    if "vace_layers" not in ext:
        return None
    if shape.has_img or shape.extra_channels:
        raise ConversionError(
            f"VACE weights (vace_blocks.*) on a DiT with in_dim {shape.in_dim} / img_emb "
            f"{'present' if shape.has_img else 'absent'}: only text-to-video VACE DiTs (in_dim == out_dim, no CLIP "
            "branch) exist"
        )
    return "vace"


class TeaCacheVaceHook(ModelHook):
    """On each VACE block: on skip steps the block is not run and its hint is zero, so the model's hint additions
    between DiT blocks add nothing -- the cached residual (last block out - first block in) already holds them,
    as the reference skips the hint additions with the blocks."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager):
        super().__init__()
        self.state_manager = state_manager

    def new_forward(self, module: torch.nn.Module, hidden_states, encoder_hidden_states, control_hidden_states, *args,
                    **kwargs):
        state: TeaCacheState = self.state_manager.get_state()
        if state.skip:
            hint = torch.zeros_like(hidden_states) if module.proj_out is not None else None
            return hint, control_hidden_states
        return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, control_hidden_states, *args,
                                            **kwargs)

    def reset_state(self, module):
        self.state_manager.reset()
        return module


def _model_class(info: DitInfo) -> type:
    return WanVACETransformer3DModel


def encode_vace_condition(builder, sample: dict, inputs, num_frames: int, height: int, width: int) -> None:
    """Training inputs of a VACE model through stock ``WanVACEPipeline``'s control encoding."""
    pipe = builder.pipe
    if "vace_video" in builder.extra_inputs:
        control = builder.video(sample, "vace_video")
    else:
        control = torch.zeros(1, 3, num_frames, height, width)
    if "vace_video_mask" in builder.extra_inputs:
        mask = builder.video(sample, "vace_video_mask").add(1).div(2).clamp(0, 1)  # [-1, 1] -> [0, 1]
    else:
        mask = torch.ones(1, 3, num_frames, height, width)
    references = None
    if "vace_reference_image" in builder.extra_inputs:
        references = [[builder.image(sample, "vace_reference_image")[0].to(builder.device)]]
    control, mask = control.to(builder.device), mask.to(builder.device)
    context = pipe.prepare_video_latents(control, mask, references, device=builder.device)
    mask_latents = pipe.prepare_masks(mask, references)
    inputs.transformer_kwargs = {"control_hidden_states": torch.cat([context, mask_latents.to(context)], dim=1)}
    if references is not None:
        # the references' latents come first in time, as in DiffSynth-Studio's training (and stock inference)
        ref = builder.encode_latents(references[0][0][None, :, None])
        inputs.latents = torch.cat([ref.to(inputs.latents), inputs.latents], dim=2)


#: DiffSynth-Studio's ``vace`` / ``vace2`` models are the VACE blocks of our (stock) VACE transformer /
#: transformer_2: ``--trainable_models vace`` trains the ``vace_*`` parameters, ``--lora_base_model vace`` puts the LoRA
#: on ``vace_blocks`` (its ``dit`` LoRA then goes on the main ``blocks``).
VACE_TRAINING_SCOPE = TrainingScope(
    name="vace", aliases={"vace": "transformer", "vace2": "transformer_2"}, blocks="vace_blocks",
    parameter_prefix="vace_", help="vace / vace2 (only the VACE blocks of a VACE transformer / transformer_2)",
)


class VaceFamily(ModelFamily):
    name = "vace"
    title = "VACE (stock WanVACEPipeline)"
    variants = (
        WanVariant(
            "wan2.1-vace-1.3b", "vace", "Wan-AI/Wan2.1-VACE-1.3B", dim=1536, num_layers=30,
            pipeline="WanVACEPipeline", aliases=("vace-wan2.1-1.3b-preview",),
            notes="iic/VACE-Wan2.1-1.3B-Preview has the same layout",
        ),
        WanVariant(
            "wan2.1-vace-14b", "vace", "Wan-AI/Wan2.1-VACE-14B", dim=5120, num_layers=40, pipeline="WanVACEPipeline",
            height=720, width=1280,
        ),
        WanVariant(
            "wan2.2-vace-fun-a14b", "vace", "PAI/Wan2.2-VACE-Fun-A14B", dim=5120, num_layers=40, experts=2,
            pipeline="WanVACEPipeline", boundary_ratio=0.875, flow_shift=5.0, guidance_scale=5.0,
        ),
    )
    dit = DitExtension(
        name="vace", arches=("vace",), layouts="VACE 16/16 + vace_blocks.*",
        top_level_keys=(("vace_patch_embedding", "vace_patch_embedding"),),
        block_tables={"vace_blocks": VACE_BLOCK_KEY_MAP}, config=_config, detect=_detect, model_class=_model_class,
        priority=20,
    )
    # stock has no entry: the VACE block returns (hint, control_hidden_states) and carries its stream in
    # control_hidden_states
    hook_block_metadata = {WanVACETransformerBlock: dict(return_hidden_states_index=1,
                                                          return_encoder_hidden_states_index=None,
                                                          hidden_states_argument_name="control_hidden_states")}
    tiny_arches = {"vace": TinyArch("vace", 16, 16)}
    conditionings = (
        Conditioning("VACE", WanVACEPipeline, optional=("vace_video", "vace_video_mask", "vace_reference_image"),
                     encode=encode_vace_condition),
    )
    training_scopes = (VACE_TRAINING_SCOPE,)
    dataset_inputs = {"vace_video": ExtraInput("video"), "vace_video_mask": ExtraInput("video"),
                      "vace_reference_image": ExtraInput("image")}

    def tiny_dit_model(self, arch: str, experts: int, kwargs: dict[str, Any]):
        layers = list(range(kwargs["num_layers"]))
        model = WanVACETransformer3DModel(**kwargs, vace_layers=layers, vace_in_channels=96)
        return model, {"vace_layers": layers, "vace_in_dim": 96}

    def register_parallel_plans(self) -> None:
        register_cp_plan(WanVACETransformer3DModel, WAN_VACE_CP_PLAN,
                         self_attention_modules=("blocks.*.attn1", "vace_blocks.*.attn1"))

    def register_runtime_hooks(self) -> None:
        register_teacache_side_blocks(WanVACETransformer3DModel, "vace_blocks", TeaCacheVaceHook)
        # the control video (and its reference frames, prepended like the latents') is sliced with the latents;
        # DiffSynth passes vace_context whole to every window instead (its hints then do not fit the window's tokens)
        register_sliding_window_inputs(WanVACETransformer3DModel, {"control_hidden_states": 2})

    def claims_config(self, config: Any) -> bool:
        return bool(getattr(config, "vace_layers", None))

    def training_conditioning(self, config: Any, expand_timesteps: bool) -> Conditioning | None:
        return self.conditionings[0] if self.claims_config(config) else None
