"""TeaCache for Wan transformers as Diffusers hooks.

TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model") skips all transformer
blocks on steps where the timestep modulation changed little since the last computed step, reusing that step's
block residual.  This is the Wan rule of DiffSynth-Studio / ali-vilab TeaCache4Wan2.1:

* indicator: ``t_mod`` = the block modulation input (``condition_embedder``'s ``timestep_proj``);
  ``rel_l1 = mean|t_mod - t_mod_prev| / mean|t_mod_prev|``, rescaled by a per-model polynomial
  (:data:`TEACACHE_COEFFICIENTS`) and accumulated;
* the first and the last step always compute (accumulator reset); otherwise skip while the accumulator stays below
  ``threshold``, compute (and reset it) when it reaches it;
* computing stores ``residual = x_after_blocks - x_before_blocks``; skipping sets ``x = x + residual``; the output
  head always runs.

State is kept per cache context (the stock pipelines run ``cache_context("cond")`` / ``("uncond")``), so the cond and
uncond branches have separate caches as in the reference.  Each transformer has its own hooks: when a Wan2.2
pipeline switches to ``transformer_2`` its cache starts empty and that step computes (no residual of the other
expert is ever reused).  The step index comes from the cache context (``step_index`` / ``num_inference_steps``,
which stock pipelines pass) or, if absent, from a per-context counter that wraps at ``num_inference_steps``.
Under sliding windows (:mod:`diffusers_wan_ext.hooks.sliding_window`) each window runs in a cache context of its own
(``"cond/window0"``, ...), so every window and CFG branch has its own cache (``teacache_log(model, "cond/window0")``).

Example:
    >>> from diffusers_wan_ext.hooks import TeaCacheConfig, enable_teacache
    >>> enable_teacache(pipe, TeaCacheConfig(threshold=0.05, model_id="Wan2.1-T2V-1.3B"))  # doctest: +SKIP
    >>> video = pipe(prompt="...", num_inference_steps=50).frames[0]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

__all__ = [
    "TEACACHE_COEFFICIENTS",
    "TeaCacheConfig",
    "TeaCacheState",
    "apply_teacache",
    "enable_teacache",
    "register_teacache_side_blocks",
    "remove_teacache",
    "teacache_log",
]

# Rescale polynomials (highest power first) of the reference, per model id.
TEACACHE_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "Wan2.1-T2V-1.3B": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    "Wan2.1-T2V-14B": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    "Wan2.1-I2V-14B-480P": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    "Wan2.1-I2V-14B-720P": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
}
INDICATOR_HOOK = "wan_teacache_indicator"
BLOCK_HOOK = "wan_teacache_block"


@dataclass
class TeaCacheConfig:
    """TeaCache settings.

    Args:
        threshold: accumulated rescaled distance below which a step is skipped (reference: 0.05-0.08 for 1.3B,
            0.14-0.2 for 14B; larger = faster, lower quality).
        model_id: key of :data:`TEACACHE_COEFFICIENTS` selecting the rescale polynomial.
        coefficients: explicit polynomial (highest power first); overrides ``model_id``.
        num_inference_steps: steps per generation, used only when the pipeline's cache context does not say.
        record: keep a per-step log (:func:`teacache_log`) of distances and decisions, and the indicator tensors.
    """

    threshold: float = 0.05
    model_id: str | None = "Wan2.1-T2V-1.3B"
    coefficients: tuple[float, ...] | None = None
    num_inference_steps: int | None = None
    record: bool = False

    def polynomial(self) -> tuple[float, ...]:
        if self.coefficients is not None:
            return tuple(float(c) for c in self.coefficients)
        if self.model_id not in TEACACHE_COEFFICIENTS:
            raise ValueError(
                f"unknown TeaCache model_id {self.model_id!r}; choose one of {', '.join(TEACACHE_COEFFICIENTS)} or "
                "pass coefficients=[...]"
            )
        return TEACACHE_COEFFICIENTS[self.model_id]


class TeaCacheState(BaseState):
    def __init__(self):
        self.reset()

    def reset(self, *args, **kwargs):
        self.counter = 0
        self.accumulated = 0.0
        self.previous_indicator: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.x_before: torch.Tensor | None = None
        self.skip = False


def _poly(coefficients: tuple[float, ...], x: float) -> float:
    out = 0.0
    for c in coefficients:
        out = out * x + c
    return out


class _TeaCacheIndicatorHook(ModelHook):
    """On ``condition_embedder``: read ``timestep_proj`` and decide whether this step computes the blocks."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, config: TeaCacheConfig):
        super().__init__()
        self.state_manager = state_manager
        self.config = config
        self.coefficients = config.polynomial()
        # per-context records of the latest generation; outside the state, which pipelines reset when they finish
        self.logs: dict[str, list[dict[str, Any]]] = {}

    def post_forward(self, module: nn.Module, output):
        indicator = output[1]
        state: TeaCacheState = self.state_manager.get_state()
        ctx = self.state_manager.context
        total = ctx.num_inference_steps or self.config.num_inference_steps
        step = ctx.step_index if ctx.step_index is not None else state.counter
        if step == 0:
            state.previous_indicator = None
        rel = rescaled = None
        if state.previous_indicator is not None and state.previous_indicator.shape == indicator.shape:
            prev = state.previous_indicator
            rel = ((indicator - prev).abs().mean() / prev.abs().mean()).item()
            rescaled = _poly(self.coefficients, rel)
        forced = (
            step == 0 or (total is not None and step == total - 1) or state.residual is None or rescaled is None
        )
        if forced:
            compute = True
            state.accumulated = 0.0
        else:
            state.accumulated += rescaled
            compute = state.accumulated >= self.config.threshold
            if compute:
                state.accumulated = 0.0
        state.skip = not compute
        state.previous_indicator = indicator.detach().clone()
        if self.config.record:
            log = self.logs.setdefault(ctx.name, [])
            if step == 0:
                log.clear()
            log.append(dict(step=step, rel_l1=rel, rescaled=rescaled, accumulated=state.accumulated,
                                  decision="compute" if compute else "skip", indicator=state.previous_indicator))
        state.counter = step + 1
        if total is not None and state.counter >= total:
            state.counter = 0
        return output

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class _TeaCacheBlockHook(ModelHook):
    """On each transformer block: pass through on skip steps (first block adds the cached residual); on compute
    steps the first block remembers its input and the last block stores the residual."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, first: bool, last: bool):
        super().__init__()
        self.state_manager = state_manager
        self.first, self.last = first, last

    def new_forward(self, module: nn.Module, hidden_states, *args, **kwargs):
        state: TeaCacheState = self.state_manager.get_state()
        if state.skip:
            return hidden_states + state.residual.to(hidden_states) if self.first else hidden_states
        if self.first:
            state.x_before = hidden_states
        out = self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        if self.last:
            state.residual = (out - state.x_before).detach()
            state.x_before = None
        return out

    def reset_state(self, module):
        self.state_manager.reset()
        return module


#: transformer class -> (attribute holding its side blocks, factory of the hook that skips them with the main blocks)
_SIDE_BLOCKS: dict[type, tuple[str, Callable[[StateManager], ModelHook]]] = {}


def register_teacache_side_blocks(cls: type, attribute: str, hook_factory: Callable[[StateManager], ModelHook]) -> None:
    """Declare blocks beside ``blocks`` that a TeaCache skip step must skip too (their outputs enter between the
    DiT blocks, so the cached residual already holds them), e.g. the VACE family's ``vace_blocks``.  ``hook_factory``
    builds the block hook from the TeaCache state manager (``state.skip`` tells a skip step)."""
    _SIDE_BLOCKS[cls] = (attribute, hook_factory)


def _side_blocks(transformer: nn.Module) -> tuple[list[nn.Module], Callable[[StateManager], ModelHook] | None]:
    for cls in type(transformer).__mro__:
        if cls in _SIDE_BLOCKS:
            attribute, factory = _SIDE_BLOCKS[cls]
            return list(getattr(transformer, attribute, [])), factory
    return [], None


def apply_teacache(transformer: nn.Module, config: TeaCacheConfig | None = None) -> None:
    """Register TeaCache hooks on one Wan transformer (stock ``WanTransformer3DModel``, ``WanVACETransformer3DModel``
    or ours).

    The denoiser calls must run inside ``transformer.cache_context(name, ...)`` (stock Wan pipelines and ours do).
    A skip step also skips the side blocks a family declares (:func:`register_teacache_side_blocks`; VACE's blocks
    and their hints).
    """
    config = config or TeaCacheConfig()
    config.polynomial()  # validate early
    if not hasattr(transformer, "condition_embedder") or not hasattr(transformer, "blocks"):
        raise TypeError(f"{type(transformer).__name__} is not a Wan transformer (needs condition_embedder and blocks)")
    remove_teacache(transformer)
    manager = StateManager(TeaCacheState)
    HookRegistry.check_if_exists_or_initialize(transformer.condition_embedder).register_hook(
        _TeaCacheIndicatorHook(manager, config), INDICATOR_HOOK
    )
    n = len(transformer.blocks)
    for i, block in enumerate(transformer.blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(
            _TeaCacheBlockHook(manager, first=i == 0, last=i == n - 1), BLOCK_HOOK
        )
    side, hook_factory = _side_blocks(transformer)
    for block in side:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook_factory(manager), BLOCK_HOOK)
    transformer._teacache_state_manager = manager
    # cache_context() reaches stateful hooks through a cached list of child registries: refresh it
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer._teacache_indicator = HookRegistry.check_if_exists_or_initialize(
        transformer.condition_embedder
    ).get_hook(INDICATOR_HOOK)


def remove_teacache(transformer: nn.Module) -> None:
    """Remove the TeaCache hooks of :func:`apply_teacache` (no-op if there are none)."""
    for module in [getattr(transformer, "condition_embedder", None), *getattr(transformer, "blocks", []),
                   *_side_blocks(transformer)[0]]:
        if module is None or not hasattr(module, "_diffusers_hook"):
            continue
        registry = HookRegistry.check_if_exists_or_initialize(module)
        for name in (INDICATOR_HOOK, BLOCK_HOOK):
            if registry.get_hook(name) is not None:
                registry.remove_hook(name, recurse=False)
    if hasattr(transformer, "_diffusers_hook"):
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    for attr in ("_teacache_state_manager", "_teacache_indicator"):
        if hasattr(transformer, attr):
            delattr(transformer, attr)


def enable_teacache(pipe, config: TeaCacheConfig | None = None) -> None:
    """TeaCache on a pipeline's ``transformer`` and, for Wan2.2 two-expert pipelines, ``transformer_2`` (each expert
    keeps its own cache, so the switch starts a fresh one)."""
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            apply_teacache(model, config)


def teacache_log(transformer: nn.Module, context: str = "cond") -> list[dict[str, Any]]:
    """The per-step records of one cache context of the latest generation (``TeaCacheConfig(record=True)``): dicts
    with ``step``, ``rel_l1``, ``rescaled``, ``accumulated`` (after the check), ``decision`` and ``indicator``."""
    hook = getattr(transformer, "_teacache_indicator", None)
    return list(hook.logs.get(context, [])) if hook is not None else []
