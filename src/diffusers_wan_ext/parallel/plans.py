"""Context-parallel plans (Diffusers ``_cp_plan`` format) for every Wan transformer class we ship or load.

A plan names, per submodule, the inputs or outputs that Diffusers' context-parallel hooks split along the token
dimension (``ContextParallelInput``) or gather back (``ContextParallelOutput``).  Stock ``WanTransformer3DModel``
carries one; our subclasses (``WanExtTransformer3DModel``, ``WanFunTransformer3DModel``) inherit it, because their
extra inputs become tokens *before* ``blocks.0``: Fun reference-image tokens are prepended and the camera-adapter
features are added to the patch embeddings, so splitting ``blocks.0``'s ``hidden_states`` and the RoPE table (built
for the same ``F+1`` frames) shards them with the video tokens.  Per-token timesteps (Wan2.2 TI2V) are split at the
model input by the stock entry ``"": {"timestep": ...}``.

Stock ``WanVACETransformer3DModel`` has no plan: :data:`WAN_VACE_CP_PLAN` adds the control tokens, which enter at
``vace_blocks.0`` beside the video tokens, and whose hints are added back to the (then local) video tokens.

Plans are looked up by class name along the MRO (:func:`cp_plan_for`), so a subclass of a listed class gets its
parent's plan unless it defines its own ``_cp_plan``.
"""

from __future__ import annotations

import torch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

__all__ = ["CP_PLANS", "CP_UNSUPPORTED", "SELF_ATTENTION_MODULES", "WAN_VACE_CP_PLAN", "cp_plan_for", "self_attention_patterns"]

_TOKENS = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
_ROPE = {
    0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
    1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
}
_GATHER_TOKENS = ContextParallelOutput(gather_dim=1, expected_dims=3)

#: VACE: video tokens at ``blocks.0``, control tokens (and the video tokens block 0 adds to them) at
#: ``vace_blocks.0``; the later VACE blocks take the already-local control stream.
WAN_VACE_CP_PLAN = {
    "rope": _ROPE,
    "vace_blocks.0": {"hidden_states": _TOKENS, "control_hidden_states": _TOKENS},
    "blocks.0": {"hidden_states": _TOKENS},
    "proj_out": _GATHER_TOKENS,
}

#: class name -> plan.  ``None``: the class's own ``_cp_plan`` (stock Wan and its subclasses).
CP_PLANS: dict[str, dict | None] = {
    "WanTransformer3DModel": None,
    "WanVACETransformer3DModel": WAN_VACE_CP_PLAN,
}

#: class name -> why sequence parallel is refused (CFG parallel still works): checked before any plan.
CP_UNSUPPORTED: dict[str, str] = {
    "WanVideoAsPromptTransformer3DModel": "its joint attention between the reference and the main stream needs "
    "both streams' full token sequences",
    "WanS2VTransformer3DModel": "its audio injection and FramePack motion tokens need the full token sequence",
}

#: class name -> the self-attention modules (glob over the module tree, ``*`` = every index), which get the
#: key-padding mask when the token count is padded to a multiple of the degree.
SELF_ATTENTION_MODULES: dict[str, tuple[str, ...]] = {
    "WanTransformer3DModel": ("blocks.*.attn1",),
    # its own _cp_plan splits the tokens within each frame; a padded frame is refused by its processor
    "LongCatVideoTransformer3DModel": ("blocks.*.attn1",),
    "WanVACETransformer3DModel": ("blocks.*.attn1", "vace_blocks.*.attn1"),
}


def _lookup(model: torch.nn.Module, table: dict):
    for cls in type(model).__mro__:
        if cls.__name__ in table:
            return cls.__name__, table[cls.__name__]
    return None, None


def cp_plan_for(model: torch.nn.Module) -> dict:
    """The context-parallel plan for ``model`` (its class's own ``_cp_plan`` first, then :data:`CP_PLANS`).

    Raises:
        ValueError: naming the class when no plan is known, or why it cannot be split (:data:`CP_UNSUPPORTED`).

    Example:
        >>> from diffusers import WanVACETransformer3DModel
        >>> from diffusers_wan_ext.parallel import cp_plan_for
        >>> sorted(cp_plan_for(WanVACETransformer3DModel(num_layers=1, vace_layers=[0], num_attention_heads=2,
        ...     attention_head_dim=8, ffn_dim=16, text_dim=16, freq_dim=16, vace_in_channels=8)))
        ['blocks.0', 'proj_out', 'rope', 'vace_blocks.0']
    """
    name, reason = _lookup(model, CP_UNSUPPORTED)
    if name is not None:
        raise ValueError(
            f"context (sequence) parallel is not supported for {type(model).__name__}: {reason}; use CFG parallel "
            "only (enable_parallelism(pipe, cfg_parallel=True) on 2 ranks)"
        )
    own = type(model).__dict__.get("_cp_plan")
    if own is not None:
        return own
    name, plan = _lookup(model, CP_PLANS)
    if name is None:
        plan = getattr(model, "_cp_plan", None)
        if plan is None:
            raise ValueError(
                f"no context-parallel plan for {type(model).__name__}: add it to "
                "diffusers_wan_ext.parallel.plans.CP_PLANS or give the class a `_cp_plan`"
            )
        return plan
    return plan if plan is not None else model._cp_plan


def self_attention_patterns(model: torch.nn.Module) -> tuple[str, ...]:
    """Module-name patterns of ``model``'s self-attention layers (``blocks.*.attn1`` for Wan)."""
    _, patterns = _lookup(model, SELF_ATTENTION_MODULES)
    return patterns or ("blocks.*.attn1",)

