"""Context-parallel plans (Diffusers ``_cp_plan`` format): read from the model classes.

A plan names, per submodule, the inputs or outputs that Diffusers' context-parallel hooks split along the token
dimension (``ContextParallelInput``) or gather back (``ContextParallelOutput``).  Every transformer class declares
what it supports, as class attributes:

* ``_cp_plan`` -- its plan.  Stock ``WanTransformer3DModel`` carries one; our subclasses (``WanExtTransformer3DModel``,
  ``WanFunTransformer3DModel``) inherit it, because their extra inputs become tokens *before* ``blocks.0``: Fun
  reference-image tokens are prepended and the camera-adapter features are added to the patch embeddings, so
  splitting ``blocks.0``'s ``hidden_states`` and the RoPE table (built for the same ``F+1`` frames) shards them with
  the video tokens.  Per-token timesteps (Wan2.2 TI2V) are split at the model input by the stock entry
  ``"": {"timestep": ...}``.
* ``_cp_plan = None`` with ``_cp_unsupported_reason`` -- why sequence parallel is refused (CFG parallel still works).
* ``_cp_self_attention_modules`` -- the self-attention modules (glob over the module tree, ``*`` = every index) that
  get the key-padding mask when the token count is padded to a multiple of the degree (default ``blocks.*.attn1``).

Stock Diffusers classes that lack a plan get one with :func:`register_cp_plan` (keyed by the class itself).  The
first class along the model's MRO that declares something (or is registered) decides, so a subclass inherits its
parent's plan unless it declares its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_SELF_ATTENTION_MODULES",
    "cp_plan_for",
    "register_cp_plan",
    "self_attention_patterns",
]

#: Self-attention modules of a Wan DiT (every block's ``attn1``): the default of a class that declares none.
DEFAULT_SELF_ATTENTION_MODULES: tuple[str, ...] = ("blocks.*.attn1",)


@dataclass(frozen=True)
class _Registered:
    plan: dict
    self_attention_modules: tuple[str, ...]


#: stock class (the class object, not its name) -> the plan registered for it
_REGISTERED: dict[type, _Registered] = {}


def register_cp_plan(
    cls: type, plan: dict, *, self_attention_modules: tuple[str, ...] = DEFAULT_SELF_ATTENTION_MODULES
) -> None:
    """Give a stock class without a ``_cp_plan`` (e.g. Diffusers' ``WanVACETransformer3DModel``) a context-parallel
    plan and its self-attention modules.  Our own classes declare ``_cp_plan`` instead.

    A family declaration registers the plans of the stock classes it uses
    (``ModelFamily.register_parallel_plans``; e.g. the VACE family's plan for ``WanVACETransformer3DModel``).

    Example:
        >>> from diffusers_wan_ext.parallel import register_cp_plan
        >>> register_cp_plan(MyStockTransformer, {"blocks.0": ..., "proj_out": ...})  # doctest: +SKIP
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_cp_plan takes a class, got {type(cls).__name__}")
    _REGISTERED[cls] = _Registered(dict(plan), tuple(self_attention_modules))


def _declaring_class(model: torch.nn.Module) -> type | None:
    """The first class along ``model``'s MRO that is registered or declares a plan / an unsupported reason."""
    for cls in type(model).__mro__:
        own = cls.__dict__
        if cls in _REGISTERED or own.get("_cp_plan") is not None or own.get("_cp_unsupported_reason"):
            return cls
    return None


def cp_plan_for(model: torch.nn.Module) -> dict:
    """The context-parallel plan of ``model``'s class (its ``_cp_plan``, or one given by :func:`register_cp_plan`).

    Raises:
        ValueError: naming the class when it declares why it cannot be split (``_cp_unsupported_reason``), or when
            no plan is known.

    Example:
        >>> from diffusers import WanVACETransformer3DModel
        >>> from diffusers_wan_ext.parallel import cp_plan_for
        >>> sorted(cp_plan_for(WanVACETransformer3DModel(num_layers=1, vace_layers=[0], num_attention_heads=2,
        ...     attention_head_dim=8, ffn_dim=16, text_dim=16, freq_dim=16, vace_in_channels=8)))
        ['blocks.0', 'proj_out', 'rope', 'vace_blocks.0']
    """
    cls = _declaring_class(model)
    if cls is None:
        raise ValueError(
            f"no context-parallel plan for {type(model).__name__}: give the class a `_cp_plan`, or register one "
            "with diffusers_wan_ext.parallel.register_cp_plan"
        )
    if cls in _REGISTERED:
        return _REGISTERED[cls].plan
    reason = cls.__dict__.get("_cp_unsupported_reason")
    if reason and cls.__dict__.get("_cp_plan") is None:
        raise ValueError(
            f"context (sequence) parallel is not supported for {type(model).__name__}: {reason}; use CFG parallel "
            "only (enable_parallelism(pipe, cfg_parallel=True) on 2 ranks)"
        )
    return cls.__dict__["_cp_plan"]


def self_attention_patterns(model: torch.nn.Module) -> tuple[str, ...]:
    """Module-name patterns of ``model``'s self-attention layers (``blocks.*.attn1`` for Wan)."""
    for cls in type(model).__mro__:
        if cls in _REGISTERED:
            return _REGISTERED[cls].self_attention_modules
        if "_cp_self_attention_modules" in cls.__dict__:
            return tuple(cls.__dict__["_cp_self_attention_modules"])
    return DEFAULT_SELF_ATTENTION_MODULES
