"""Multi-GPU inference: sequence parallel (Ulysses / Ring, Diffusers' context parallelism) plus CFG parallel.

One generation is spread over the ``torch.distributed`` world (launched with ``torchrun``): the ranks form a
device mesh ``cfg x ring x ulysses``.

* **Sequence parallel** is Diffusers' own context parallelism (``ContextParallelConfig`` + the model's CP plan,
  :mod:`diffusers_wan_ext.parallel.plans`), applied to ``transformer`` and ``transformer_2`` over the
  ``ring x ulysses`` sub-mesh.  Token counts that do not divide by the degree are padded exactly
  (:mod:`diffusers_wan_ext.parallel.padding`).
* **CFG parallel** (``cfg`` mesh dimension of size 2): in our pipelines' shared denoising loop, one half of the
  ranks runs the conditional pass and the other half the unconditional one; the two predictions are all-gathered
  once per step.  It needs no communication inside the transformer, so it scales better than a second sequence
  split, and combines with it (e.g. 8 GPUs = CFG 2 x Ulysses 4).
* **Text encoder and VAE**: every rank encodes the prompts (cheap, and keeps the ranks' inputs identical without a
  broadcast); only the first rank of the world decodes the video, the others return the latents
  (``decode_on_all_ranks=True`` to change that).

xfuser (xDiT) is not used: what it adds for Wan here -- CFG parallel and hybrid Ulysses x Ring degrees -- is covered
by this module on top of Diffusers' own context parallelism, which keeps stock weight names, hooks and LoRAs
working and needs no second copy of the model code.  See docs/parallel.md.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks.context_parallel import ContextParallelSplitHook
from diffusers.models._modeling_parallel import ContextParallelConfig
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.utils import logging

from ..runtime.attention import available_attention_backends, set_attention_backend
from .padding import TokenPadState, apply_token_padding, forward_parameters
from .plans import cp_plan_for, self_attention_patterns

__all__ = [
    "ParallelState",
    "choose_degrees",
    "enable_parallelism",
    "init_distributed",
    "supports_cfg_parallel",
    "supports_sequence_parallel",
]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

_TRANSFORMERS = ("transformer", "transformer_2")


def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialize ``torch.distributed`` from the ``torchrun`` environment if it is not yet; ``(rank, world, device)``.

    Uses NCCL and ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on the CPU.  A process started without
    ``torchrun`` (no ``WORLD_SIZE``) becomes a world of one.
    """
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29517")
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def choose_degrees(
    world_size: int,
    num_heads: int,
    *,
    cfg_parallel: bool = False,
    ulysses_degree: int | None = None,
    ring_degree: int | None = None,
) -> tuple[int, int, int]:
    """``(cfg, ulysses, ring)`` degrees for ``world_size`` ranks.

    Without explicit degrees, Ulysses takes the largest divisor of the sequence-parallel size that divides the head
    count (Ulysses splits heads, and its all-to-all is cheaper than ring passes), and Ring takes the rest: 1.3B
    (12 heads) on 8 GPUs -> Ulysses 4 x Ring 2; 14B (40 heads) on 8 GPUs -> Ulysses 8.

    Example:
        >>> from diffusers_wan_ext.parallel import choose_degrees
        >>> choose_degrees(8, 12)
        (1, 4, 2)
        >>> choose_degrees(8, 40, cfg_parallel=True)
        (2, 4, 1)
    """
    cfg = 2 if cfg_parallel else 1
    if world_size % cfg:
        raise ValueError(f"CFG parallel needs an even number of ranks, got {world_size}: pass cfg_parallel=False")
    sp = world_size // cfg
    if ulysses_degree is None and ring_degree is None:
        ulysses_degree = max(d for d in range(1, sp + 1) if sp % d == 0 and num_heads % d == 0)
    if ulysses_degree is None:
        ulysses_degree = sp // ring_degree if ring_degree and sp % ring_degree == 0 else 0
    if ring_degree is None:
        ring_degree = sp // ulysses_degree if ulysses_degree and sp % ulysses_degree == 0 else 0
    if ulysses_degree * ring_degree != sp:
        raise ValueError(
            f"ulysses_degree x ring_degree must equal the sequence-parallel size {sp} (= {world_size} ranks"
            f"{' / 2 for CFG parallel' if cfg == 2 else ''}), got ulysses_degree={ulysses_degree}, "
            f"ring_degree={ring_degree}"
        )
    if num_heads % ulysses_degree:
        raise ValueError(
            f"ulysses_degree={ulysses_degree} must divide the {num_heads} attention heads; use a divisor of "
            f"{num_heads} and put the rest into ring_degree (e.g. ulysses_degree={math.gcd(num_heads, sp)}, "
            f"ring_degree={sp // math.gcd(num_heads, sp)})"
        )
    return cfg, ulysses_degree, ring_degree


@dataclass
class ParallelState:
    """How a pipeline is spread over the ranks (returned by :func:`enable_parallelism`, kept as
    ``pipe._wan_parallel``)."""

    rank: int
    world_size: int
    device: torch.device
    cfg_degree: int
    ulysses_degree: int
    ring_degree: int
    mesh: Any = None
    cfg_group: Any = None
    decode_on_all_ranks: bool = False
    pad_states: dict[str, TokenPadState] = field(default_factory=dict)

    @property
    def cfg_rank(self) -> int:
        """0: this rank runs the conditional pass; 1: the unconditional one."""
        return self.mesh.get_local_rank("cfg") if self.cfg_degree > 1 else 0

    @property
    def decodes(self) -> bool:
        """Whether this rank decodes the video (the first rank, or all with ``decode_on_all_ranks``)."""
        return self.decode_on_all_ranks or self.rank == 0

    def gather_cfg(self, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All-gather this rank's CFG-branch prediction; ``(cond, uncond)`` on every rank."""
        parts = [torch.empty_like(prediction) for _ in range(self.cfg_degree)]
        dist.all_gather(parts, prediction.contiguous(), group=self.cfg_group)
        return parts[0], parts[1]

    def describe(self) -> str:
        return (
            f"{self.world_size} ranks = CFG {self.cfg_degree} x Ulysses {self.ulysses_degree} x Ring "
            f"{self.ring_degree}"
        )


def _cp_capable_backend(model: torch.nn.Module, device: torch.device) -> str | None:
    """The model's attention backend if Diffusers' context parallelism supports it, else the fastest one that does
    (and can run here); None when the model uses no dispatch backend."""
    current = None
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            current = processor._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
            break
    if current is None:
        return None
    if _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(current)):
        return None
    dtype = next(model.parameters()).dtype
    for name in available_attention_backends(device, dtype):
        if _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(name)):
            return name
    return "native"


@contextlib.contextmanager
def _cpu_device_count():
    """Diffusers 0.42 picks the rank's device as ``rank % torch.accelerator.device_count()``, which divides by zero
    on a CPU-only machine (gloo world); report one device there while it does."""
    original = torch.accelerator.device_count
    if original() == 0:
        torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def _prime_split_hooks(model: torch.nn.Module) -> None:
    """Resolve the argument positions of Diffusers' context-parallel split hooks now.

    Diffusers 0.42 looks them up with ``inspect.signature`` on the first call, which torch.compile cannot trace when
    the hooked module (``blocks.0``) is inside a regionally compiled block; the cache it fills is primed here.
    """
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in (registry.hooks.values() if registry is not None else ()):
            meta = getattr(hook, "module_forward_metadata", None)
            if isinstance(hook, ContextParallelSplitHook) and meta is not None and meta._cls is not None:
                meta.cached_parameter_indices = {n: i for i, n in enumerate(forward_parameters(meta._cls))}


def _transformers(pipe_or_model: Any) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(pipe_or_model, torch.nn.Module):
        return [("transformer", pipe_or_model)]
    found = [(n, getattr(pipe_or_model, n, None)) for n in _TRANSFORMERS]
    found = [(n, m) for n, m in found if m is not None]
    if not found:
        raise ValueError(f"{type(pipe_or_model).__name__} has no `transformer` to parallelize")
    return found


def supports_cfg_parallel(pipe_or_model: Any) -> bool:
    """Whether ``pipe_or_model`` can run CFG parallel: its class declares ``supports_cfg_parallel = True`` (our
    pipelines' shared denoising loop does, except where there is no classifier-free guidance).  Stock Diffusers
    pipelines and single models lack the attribute: sequence parallel only."""
    return bool(getattr(type(pipe_or_model), "supports_cfg_parallel", False))


def supports_sequence_parallel(pipe_or_model: Any) -> bool:
    """Whether ``pipe_or_model`` can run sequence parallel: true unless its class declares
    ``supports_sequence_parallel = False`` (a pipeline whose own attention cannot run under context parallelism, e.g.
    streaming's block-causal KV cache).  Whether the transformer can be split is its class's own declaration
    (:func:`~diffusers_wan_ext.parallel.plans.cp_plan_for`)."""
    return bool(getattr(type(pipe_or_model), "supports_sequence_parallel", True))


def _resolve_cfg_parallel(pipe_or_model: Any, cfg_parallel: bool | None, world: int) -> bool:
    """``cfg_parallel`` as asked, defaulting to the class's declaration on an even world; refused where undeclared."""
    supported = supports_cfg_parallel(pipe_or_model)
    if cfg_parallel is None:
        return supported and world % 2 == 0
    if cfg_parallel and not supported:
        raise ValueError(
            f"CFG parallel is not supported by {type(pipe_or_model).__name__} (its class does not declare "
            "supports_cfg_parallel = True): pass cfg_parallel=False for sequence parallel only"
        )
    return cfg_parallel


def _sequence_plans(pipe_or_model: Any, models: list[tuple[str, torch.nn.Module]]) -> dict[str, dict]:
    """Each transformer's context-parallel plan; raises where the pipeline or a transformer class refuses."""
    if not supports_sequence_parallel(pipe_or_model):
        raise ValueError(
            f"sequence parallel is not supported by {type(pipe_or_model).__name__} (it declares "
            "supports_sequence_parallel = False): "
            + ("use CFG parallel only (cfg_parallel=True on 2 ranks)" if supports_cfg_parallel(pipe_or_model)
               else "run it on one rank")
        )
    return {name: cp_plan_for(model) for name, model in models}


def _apply_context_parallel(
    name: str, model: torch.nn.Module, plan: dict, cp_config: ContextParallelConfig, device: torch.device
) -> TokenPadState:
    """Diffusers' context parallelism on ``model`` with our padding hooks around it; the padding state."""
    backend = _cp_capable_backend(model, device)
    if backend is not None:
        logger.warning(f"diffusers_wan_ext: {name}'s attention backend cannot run context parallel; using {backend!r}")
        set_attention_backend(model, backend, verbose=False)
    pad = TokenPadState(cp_config, model, self_attention_patterns(model))
    apply_token_padding(model, plan, pad, stage="inner")
    with _cpu_device_count():
        model.enable_parallelism(config=cp_config, cp_plan=plan)
    apply_token_padding(model, plan, pad, stage="outer")
    _prime_split_hooks(model)
    return pad


def enable_parallelism(
    pipe_or_model: Any,
    *,
    ulysses_degree: int | None = None,
    ring_degree: int | None = None,
    cfg_parallel: bool | None = None,
    decode_on_all_ranks: bool = False,
) -> ParallelState:
    """Spread a Wan pipeline (or one transformer) over all ranks of the ``torch.distributed`` world.

    Call it in every rank after moving the pipeline to ``device`` (see :func:`init_distributed`); then call the
    pipeline as usual in every rank with the same arguments and seed.

    Args:
        pipe_or_model: a Wan pipeline (``transformer`` and, for Wan2.2 A14B, ``transformer_2`` are parallelized) or
            one transformer.
        ulysses_degree, ring_degree: sequence-parallel degrees (default: :func:`choose_degrees`).  Their product is
            the world size (half of it with CFG parallel).
        cfg_parallel: run the conditional and unconditional passes on different halves of the ranks.  Default:
            on when the world size is even and the pipeline's class declares ``supports_cfg_parallel`` (our
            pipelines with classifier-free guidance); stock Diffusers pipelines get sequence parallel only, and
            asking for CFG parallel on a pipeline that does not declare it raises ``ValueError``.
        decode_on_all_ranks: every rank VAE-decodes (default: only rank 0; the others return latents).

    Returns:
        The :class:`ParallelState`, also stored as ``pipe._wan_parallel``.

    Example:
        >>> # torchrun --nproc_per_node=4 examples/parallel/generate.py
        >>> rank, world, device = init_distributed()  # doctest: +SKIP
        >>> pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.bfloat16).to(device)  # doctest: +SKIP
        >>> enable_parallelism(pipe).describe()  # doctest: +SKIP
        '4 ranks = CFG 2 x Ulysses 2 x Ring 1'
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: launch with torchrun and call "
            "diffusers_wan_ext.parallel.init_distributed() first"
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    models = _transformers(pipe_or_model)
    is_pipeline = not isinstance(pipe_or_model, torch.nn.Module)
    cfg_parallel = _resolve_cfg_parallel(pipe_or_model, cfg_parallel, world)
    heads = models[0][1].config.num_attention_heads
    cfg, ulysses, ring = choose_degrees(
        world, heads, cfg_parallel=cfg_parallel, ulysses_degree=ulysses_degree, ring_degree=ring_degree
    )
    # refusals before any collective: the pipeline's and each transformer class's declarations
    plans = _sequence_plans(pipe_or_model, models) if ulysses * ring > 1 else {}
    device = next(models[0][1].parameters()).device
    mesh = dist.device_mesh.init_device_mesh(
        device.type, (cfg, ring, ulysses), mesh_dim_names=("cfg", "ring", "ulysses")
    )
    state = ParallelState(
        rank=rank, world_size=world, device=device, cfg_degree=cfg, ulysses_degree=ulysses, ring_degree=ring,
        mesh=mesh, cfg_group=mesh.get_group("cfg") if cfg > 1 else None, decode_on_all_ranks=decode_on_all_ranks,
    )
    for name, model in models:
        if name in plans:
            cp_config = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses, mesh=mesh["ring", "ulysses"])
            state.pad_states[name] = _apply_context_parallel(name, model, plans[name], cp_config, device)
    if is_pipeline:
        pipe_or_model._wan_parallel = state
    if rank == 0:
        logger.warning(f"diffusers_wan_ext: parallel inference on {state.describe()}")
    return state
