"""VRAM management for Wan pipelines: a budget planner on top of Diffusers hooks.

:func:`plan_vram` decides, for every module of a pipeline (``text_encoder``, ``image_encoder``, ``transformer``,
``transformer_2``, ``vae``, ...), how it is placed so that the whole generation stays within a VRAM budget;
:func:`enable_vram_management` applies that plan with Diffusers' own hooks and :func:`disable_vram_management`
removes them again.  Nothing here offloads by itself: the strategies are Diffusers' group offloading
(``diffusers.hooks.apply_group_offloading``, CUDA-stream prefetching, optional disk offload) and layerwise casting
(``apply_layerwise_casting``: weights stored in float8, computed in bf16).

Strategies (:data:`STRATEGIES`):

* ``resident`` -- moved to the device and kept there;
* ``resident_fp8`` -- resident, weights stored in ``float8_e4m3fn`` and up-cast one layer at a time (transformers
  only; changes the output slightly);
* ``group_offload`` -- weights in CPU RAM, streamed block by block (``offload_type="block_level"`` on the module
  that holds the block list, e.g. ``transformer.blocks``, ``text_encoder.encoder.block``); with CUDA streams the
  next block is prefetched while the current one runs, so two blocks are in flight;
* ``group_offload_fp8`` -- both of the above (the stream carries fp8 weights);
* ``leaf_offload`` -- ``offload_type="leaf_level"``, for modules without a block list (the VAE);
* ``disk_offload`` -- group (or leaf) offloading with ``offload_to_disk_path``: weights in safetensors files, read
  back when needed, for when CPU RAM is the limit (``cpu_ram_limit``); only offered when a path is given.

How the plan is made.  A pipeline runs in phases (:data:`PHASES`): encode the prompt (text / image encoder), denoise
(``transformer``, then ``transformer_2`` for Wan2.2 two-expert models), decode (VAE).  The estimated peak of a phase
is the bytes of every resident component plus, for the components of that phase, the streamed bytes in flight and
the activation working set.  A plan fits when ``max(phase peaks) + margin <= vram_limit`` (``margin`` = the larger
of 0.5 GiB and 5 % of the budget) and the CPU-RAM copies of offloaded weights fit ``cpu_ram_limit``.  Among the
plans that fit, the planner takes the one that keeps the most important component at its most preferred strategy
(:data:`ROLE_PRIORITY`: transformers, which run ``2 x steps`` times, then the VAE, then the encoders; per-role
preferences in :data:`ROLE_STRATEGIES`).  The two Wan2.2 experts always share one strategy (same size, run one
after the other).  If nothing fits, :class:`ValueError` says by how much and what to change.

Activation model (documented estimates, calibrated on H100 bf16 measurements; see ``docs/vram.md``):

* transformer, one forward: ``tokens x batch x dim x elem_bytes x 38.2`` where ``tokens = ((F-1)//4+1) *
  (H//(8*p_h)) * (W//(8*p_w))`` (VAE factors from its config), ``dim = heads * head_dim``; ``batch`` doubles with
  batched CFG.  The factor fits the 14B at 1280x720x81 exactly (27.5 GiB) and over-estimates the 1.3B at 480x832x81
  by a third (3.6 vs 2.7 GiB): a term in ``ffn_dim`` would get a negative coefficient from these two points, so it
  is left out.
* VAE decode: per-frame decoder working set ``4.10 GiB x (H*W) / (480*832)`` (bf16, Wan2.1 VAE: causal decoding
  keeps one latent frame in flight) plus two copies of the output video (``3*F*H*W``); scaled by the VAE's dtype and
  channel width.  With ``vae.enable_tiling()`` the per-frame part scales with the tile area instead and four output
  copies are counted (overlapping tiles, blending).  Together: 4.7 GiB at 480x832x81 in bf16 incl. weights, as
  measured.  With :func:`~diffusers_wan_ext.runtime.optimize_vae`'s fast decode installed (untiled): ``2.77 GiB``
  per frame and one output copy, 3.2 GiB in all (measured 3.20 GiB on an H100).  VAE *encode* (I2V / VACE conditioning) is assumed to need no more than decode.
* encoders: ``seq x d_model x elem x 24 + 3 x heads x seq**2 x 4`` bytes (``seq`` 512 text tokens, 257 image
  tokens): 0.28 GiB for umt5-xxl (0.27 GiB measured).

Example:
    >>> from diffusers_wan_ext.hooks import enable_vram_management, disable_vram_management
    >>> plan = enable_vram_management(pipe, "8gb", height=480, width=832, num_frames=81)  # doctest: +SKIP
    >>> print(plan)  # doctest: +SKIP
    >>> video = pipe(prompt="...", height=480, width=832, num_frames=81).frames[0]  # doctest: +SKIP
    >>> disable_vram_management(pipe)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from diffusers.hooks import HookRegistry, ModelHook, apply_group_offloading, apply_layerwise_casting
from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
from diffusers.utils import logging

__all__ = [
    "PHASES",
    "ROLE_PRIORITY",
    "ROLE_STRATEGIES",
    "STRATEGIES",
    "VRAM_PRESETS",
    "ComponentPlan",
    "Strategy",
    "VramPlan",
    "disable_vram_management",
    "enable_vram_management",
    "plan_vram",
    "resolve_vram_limit",
]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

GIB = float(1 << 30)

#: Budgets (GiB) planned for on common cards, leaving headroom for the CUDA context, cuDNN / cuBLAS workspaces and
#: allocator fragmentation (allocated < reserved < card).
VRAM_PRESETS: dict[str, float] = {"8gb": 7.5, "24gb": 22.5, "80gb": 76.0}

FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class Strategy:
    """How one component is placed.

    Args:
        name: key in :data:`STRATEGIES`.
        offload: ``None`` (kept on the device), ``"block_level"`` / ``"leaf_level"`` (Diffusers group offloading), or
            ``"auto"`` (block level where the component has a block list, else leaf level).
        fp8: weights stored in ``float8_e4m3fn`` by layerwise casting.
        disk: offloaded weights kept in safetensors files instead of CPU RAM.
        summary: one line for tables and docs.
    """

    name: str
    offload: str | None
    fp8: bool = False
    disk: bool = False
    summary: str = ""


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("resident", None, summary="on the device for the whole run"),
    Strategy("resident_fp8", None, fp8=True,
             summary="on the device, weights stored in float8 (changes outputs slightly)"),
    Strategy("group_offload", "block_level", summary="CPU RAM, streamed block by block"),
    Strategy("group_offload_fp8", "block_level", fp8=True, summary="CPU RAM in float8, streamed block by block"),
    Strategy("leaf_offload", "leaf_level", summary="CPU RAM, streamed layer by layer"),
    Strategy("disk_offload", "auto", disk=True, summary="safetensors files, streamed block (or layer) by layer"),
)}

#: Strategies each role may get, most preferred first.  Encoders are never stored in fp8: transformers' ``dtype``
#: would then report float8 and the pipelines cast the prompt embeddings to it; streaming them is cheap anyway
#: (they run once per prompt).
ROLE_STRATEGIES: dict[str, tuple[str, ...]] = {
    "transformer": ("resident", "resident_fp8", "group_offload", "group_offload_fp8", "disk_offload"),
    "vae": ("resident", "leaf_offload", "disk_offload"),
    "image_encoder": ("resident", "group_offload", "disk_offload"),
    "text_encoder": ("resident", "group_offload", "disk_offload"),
    "other": ("resident",),
}

#: When not everything fits, earlier roles keep their preferred strategy (the transformers run ``2 x steps`` times,
#: the VAE once per video, the encoders once per prompt).
ROLE_PRIORITY: tuple[str, ...] = ("transformer", "vae", "image_encoder", "text_encoder", "other")

#: Pipeline component name -> role; other ``nn.Module`` components are ``"other"`` (resident, counted in every phase).
COMPONENT_ROLES: dict[str, str] = {
    "transformer": "transformer",
    "transformer_2": "transformer",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "image_encoder": "image_encoder",
}

#: Phases in execution order and the components that run in each.
PHASES: dict[str, tuple[str, ...]] = {
    "encode": ("text_encoder", "image_encoder"),
    "denoise": ("transformer",),
    "denoise_2": ("transformer_2",),
    "decode": ("vae",),
}

#: Where the repeated blocks of a component live (first match wins); group offloading goes on their parent.
BLOCK_LISTS: tuple[str, ...] = ("blocks", "encoder.block", "vision_model.encoder.layers", "encoder.layers", "layers")

_EXPERTS = ("transformer", "transformer_2")
_FP8_ROLES = frozenset({"transformer"})

# ---- calibration (see the module docstring and docs/vram.md)
_DIT_ACT_FACTOR = 38.2  # bytes per token per model channel per element byte, one transformer forward
_VAE_REF_PIXELS = 480 * 832
_VAE_REF_CHANNELS = 96  # Wan2.1 VAE decoder base width
_VAE_FRAME_GIB = 4.10  # per-frame decoder working set at 480x832, bf16, Wan2.1 VAE
# the same for the fast decode of ``optimize_vae`` (one output copy): 3.20 GiB peak at 480x832x81 bf16 on an H100
# (weights 0.24 + video 0.19 + working set 2.77)
_VAE_FAST_FRAME_GIB = 2.77
_VAE_OUTPUT_COPIES = {False: 2, True: 4}  # untiled / tiled
_ENCODER_SEQ = {"text_encoder": 512, "image_encoder": 257}
_MIN_MARGIN_GIB, _MARGIN_FRACTION = 0.5, 0.05

# ---- Diffusers hook names (diffusers.hooks.group_offloading / layerwise_casting)
_GROUP_OFFLOAD_HOOKS = ("lazy_prefetch_group_offloading", "layer_execution_tracker", "group_offloading")
_CASTING_HOOKS = ("peft_autocast_disable", "layerwise_casting")


# ================================================================================================ plan objects
@dataclass
class ComponentPlan:
    """The decision for one component.

    ``block_root`` is the dotted path (``""`` = the component itself) of the module group offloading is applied to;
    tensors of the component outside it stay resident.  Sizes are GiB as stored after the decision.
    """

    name: str
    role: str
    strategy: str
    offload_type: str | None
    num_blocks_per_group: int | None
    block_root: str | None
    weights_gib: float
    resident_gib: float
    in_flight_gib: float
    activations_gib: float
    cpu_ram_gib: float
    storage_dtype: torch.dtype
    compute_dtype: torch.dtype
    phases: tuple[str, ...]

    @property
    def fp8(self) -> bool:
        return STRATEGIES[self.strategy].fp8

    @property
    def disk(self) -> bool:
        return STRATEGIES[self.strategy].disk


@dataclass
class VramPlan:
    """Result of :func:`plan_vram`: one :class:`ComponentPlan` per component and the estimated peak per phase (GiB).

    ``print(plan)`` shows a table.  ``peak_gib + margin_gib <= vram_limit_gib`` always holds.
    """

    vram_limit_gib: float
    margin_gib: float
    components: dict[str, ComponentPlan]
    phase_peaks_gib: dict[str, float]
    cpu_ram_gib: float
    cpu_ram_limit_gib: float | None
    use_stream: bool
    height: int
    width: int
    num_frames: int
    batch_size: int
    cfg_batched: bool
    tokens: int | None
    offload_to_disk_path: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        """Estimated peak allocated VRAM over all phases (without the margin)."""
        return max(self.phase_peaks_gib.values())

    @property
    def strategies(self) -> dict[str, str]:
        """``{component: strategy}``."""
        return {name: c.strategy for name, c in self.components.items()}

    @property
    def fp8_components(self) -> list[str]:
        """Components whose weights are stored in float8 (outputs change slightly)."""
        return [name for name, c in self.components.items() if c.fp8]

    def __str__(self) -> str:
        stream = "CUDA-stream prefetch" if self.use_stream else "no streams"
        tokens = f", {self.tokens} tokens" if self.tokens else ""
        cfg = ", batched CFG" if self.cfg_batched else ""
        lines = [
            f"Wan VRAM plan: budget {self.vram_limit_gib:.2f} GiB (margin {self.margin_gib:.2f}), "
            f"{self.height}x{self.width}x{self.num_frames}, batch {self.batch_size}{cfg}{tokens}, {stream}",
            f"{'component':<14} {'strategy':<18} {'weights':>8} {'resident':>9} {'in flight':>10} "
            f"{'activ.':>7} {'CPU RAM':>8}  groups",
        ]
        for c in self.components.values():
            groups = "-" if c.offload_type is None else (
                f"{c.num_blocks_per_group} block(s) @ {c.block_root or '<root>'}"
                if c.offload_type == "block_level" else "leaf layers")
            lines.append(
                f"{c.name:<14} {c.strategy:<18} {c.weights_gib:>8.2f} {c.resident_gib:>9.2f} {c.in_flight_gib:>10.2f} "
                f"{c.activations_gib:>7.2f} {c.cpu_ram_gib:>8.2f}  {groups}"
            )
        phases = " | ".join(f"{p} {v:.2f}" for p, v in self.phase_peaks_gib.items())
        lines.append(f"phase peaks (GiB): {phases}")
        lines.append(
            f"estimated peak {self.peak_gib:.2f} + margin {self.margin_gib:.2f} <= {self.vram_limit_gib:.2f} GiB; "
            f"CPU RAM for offloaded weights {self.cpu_ram_gib:.2f} GiB"
            + (f" (limit {self.cpu_ram_limit_gib:.2f})" if self.cpu_ram_limit_gib is not None else "")
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ================================================================================================ sizes
def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _tensors(module: nn.Module, recurse: bool = True) -> dict[int, torch.Tensor]:
    return {id(t): t for t in itertools.chain(module.parameters(recurse=recurse), module.buffers(recurse=recurse))}


def _stored_bytes(tensors: Mapping[int, torch.Tensor], fp8_ids: frozenset[int] = frozenset()) -> int:
    return sum(t.numel() * (1 if i in fp8_ids else t.element_size()) for i, t in tensors.items())


def _main_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype holding most of the module's bytes."""
    counts = Counter()
    for t in _tensors(module).values():
        if t.is_floating_point():
            counts[t.dtype] += t.numel() * t.element_size()
    return counts.most_common(1)[0][0] if counts else torch.float32


def _fp8_skip_patterns(module: nn.Module) -> tuple[str, ...]:
    """Skip patterns of layerwise casting, as ``ModelMixin.enable_layerwise_casting`` builds them."""
    patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN)
    for attr in ("_keep_in_fp32_modules", "_skip_layerwise_casting_patterns"):
        patterns += tuple(getattr(module, attr, None) or ())
    return tuple(dict.fromkeys(patterns))


def _fp8_leaves(module: nn.Module, patterns: tuple[str, ...], prefix: str = "") -> Iterator[nn.Module]:
    """The layers layerwise casting stores in fp8 (mirrors ``diffusers.hooks.layerwise_casting``)."""
    if prefix and any(re.search(p, prefix) for p in patterns):
        return
    if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
        yield module
        return
    for name, child in module.named_children():
        yield from _fp8_leaves(child, patterns, f"{prefix}.{name}" if prefix else name)


def _find_block_root(module: nn.Module) -> str | None:
    for path in BLOCK_LISTS:
        try:
            blocks = module.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
            return path.rpartition(".")[0]
    return None


@dataclass
class _Component:
    """Byte sizes of one component, measured once (works on meta tensors)."""

    name: str
    role: str
    module: nn.Module
    dtype: torch.dtype
    compute_dtype: torch.dtype
    size: tuple[int, int]  # (as stored, with fp8 storage)
    fp8_upcast: int  # largest fp8 layer in the compute dtype (the transient copy of layerwise casting)
    block_root: str | None
    blocks: list[list[tuple[int, int]]]  # per block list of the root: per block (bytes, fp8 bytes)
    unmatched: tuple[int, int]  # root tensors outside its block lists (one extra group, in flight all forward)
    outside: tuple[int, int]  # component tensors outside the root (stay resident)
    leaf_max: int  # largest leaf-level group
    activations: int
    phases: tuple[str, ...]


def _measure(name: str, role: str, module: nn.Module, shape: "_Shape", dtype: torch.dtype | None) -> _Component:
    main = _main_dtype(module)
    compute = dtype or main
    fp8_ids: frozenset[int] = frozenset()
    fp8_upcast = 0
    if role in _FP8_ROLES:
        leaves = list(_fp8_leaves(module, _fp8_skip_patterns(module)))
        fp8_ids = frozenset(i for leaf in leaves for i, t in _tensors(leaf).items() if t.is_floating_point())
        fp8_upcast = max((sum(t.numel() for t in _tensors(leaf).values()) * _elem(compute) for leaf in leaves),
                         default=0)

    def sizes(tensors):
        return _stored_bytes(tensors), _stored_bytes(tensors, fp8_ids)

    everything = _tensors(module)
    root_path = _find_block_root(module)
    blocks, unmatched, outside = [], (0, 0), (0, 0)
    if root_path is not None:
        root = module.get_submodule(root_path)
        in_root = _tensors(root)
        lists = [c for c in root.children() if isinstance(c, (nn.ModuleList, nn.Sequential))]
        blocks = [[sizes(_tensors(b)) for b in lst] for lst in lists]
        listed = {i for lst in lists for i in _tensors(lst)}
        unmatched = sizes({i: t for i, t in in_root.items() if i not in listed})
        outside = sizes({i: t for i, t in everything.items() if i not in in_root})
    leaf_groups = [
        _stored_bytes(_tensors(m, recurse=isinstance(m, _GO_LC_SUPPORTED_PYTORCH_LAYERS))) for m in module.modules()
    ]
    phases = tuple(p for p, names in PHASES.items() if name in names) or tuple(PHASES)
    return _Component(
        name=name, role=role, module=module, dtype=main, compute_dtype=compute, size=sizes(everything),
        fp8_upcast=fp8_upcast, block_root=root_path, blocks=blocks, unmatched=unmatched, outside=outside,
        leaf_max=max(leaf_groups, default=0), phases=phases,
        activations=_ACTIVATIONS.get(role, _no_activations)(module, compute, shape, name),
    )


# ================================================================================================ activations
@dataclass(frozen=True)
class _Shape:
    height: int
    width: int
    num_frames: int
    batch_size: int
    cfg_batched: bool
    temporal: int = 4
    spatial: int = 8
    vae_tiling: bool = False
    vae_tile: tuple[int, int] = (256, 256)

    def tokens(self, patch_size) -> int:
        pt, ph, pw = (tuple(patch_size) + (1, 1, 1))[:3] if patch_size is not None else (1, 2, 2)
        return ((self.num_frames - 1) // (self.temporal * pt) + 1) * (self.height // (self.spatial * ph)) * (
            self.width // (self.spatial * pw))


def _elem(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _config_value(module: nn.Module, *keys: str, default=None):
    config = getattr(module, "config", None)
    for key in keys:
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if value is not None:
            return value
    return default


def _dit_activations(module: nn.Module, dtype: torch.dtype, shape: _Shape, name: str) -> int:
    heads = _config_value(module, "num_attention_heads")
    head_dim = _config_value(module, "attention_head_dim")
    if heads is None or head_dim is None:
        raise TypeError(
            f"{name} is a {type(module).__name__} without a Wan transformer config (num_attention_heads, "
            "attention_head_dim, patch_size): pass a WanTransformer3DModel-like model, or plan it under another "
            "component name"
        )
    tokens = shape.tokens(_config_value(module, "patch_size"))
    batch = shape.batch_size * (2 if shape.cfg_batched else 1)
    return int(tokens * batch * heads * head_dim * _elem(dtype) * _DIT_ACT_FACTOR)


def _vae_activations(module: nn.Module, dtype: torch.dtype, shape: _Shape, name: str) -> int:
    elem = _elem(_main_dtype(module))
    channels = _config_value(module, "decoder_base_dim", "base_dim", default=_VAE_REF_CHANNELS)
    patch = _config_value(module, "patch_size", default=1) or 1
    pixels = shape.height * shape.width
    area = min(pixels, shape.vae_tile[0] * shape.vae_tile[1]) if shape.vae_tiling else pixels
    # optimize_vae's fast decode runs (untiled) when the decoder stays resident: no hooks on its modules
    fast = hasattr(module, "_wan_fast_decode") and not shape.vae_tiling
    frame_gib = _VAE_FAST_FRAME_GIB if fast else _VAE_FRAME_GIB
    per_frame = frame_gib * GIB * area / _VAE_REF_PIXELS * channels / _VAE_REF_CHANNELS / patch**2 * elem / 2
    output = 3 * shape.num_frames * pixels * elem * (1 if fast else _VAE_OUTPUT_COPIES[shape.vae_tiling])
    return int(shape.batch_size * (per_frame + output))


def _encoder_activations(module: nn.Module, dtype: torch.dtype, shape: _Shape, name: str) -> int:
    config = getattr(module, "config", None)
    config = getattr(config, "vision_config", None) or config
    d = getattr(config, "d_model", None) or getattr(config, "hidden_size", None) or 1024
    heads = getattr(config, "num_heads", None) or getattr(config, "num_attention_heads", None) or 16
    seq = _ENCODER_SEQ.get(name, 512)
    # hidden-state copies + three fp32 score-sized tensors (scores + position bias, softmax, its dropout/cast)
    return int(shape.batch_size * (seq * d * _elem(dtype) * 24 + heads * seq * seq * 4 * 3))


def _no_activations(module, dtype, shape, name) -> int:
    return 0


_ACTIVATIONS = {
    "transformer": _dit_activations,
    "vae": _vae_activations,
    "text_encoder": _encoder_activations,
    "image_encoder": _encoder_activations,
}


# ================================================================================================ footprints
@dataclass(frozen=True)
class _Footprint:
    resident: int
    in_flight: int
    cpu: int
    extra: int  # transient fp8 up-cast copy


def _offload_type(component: _Component, strategy: Strategy) -> str | None:
    if strategy.offload == "auto":
        return "block_level" if component.block_root is not None else "leaf_level"
    return strategy.offload


def _footprint(c: _Component, strategy: Strategy, per_group: int, use_stream: bool) -> _Footprint:
    k = int(strategy.fp8)
    stored = c.size[k]
    extra = c.fp8_upcast if strategy.fp8 else 0
    offload = _offload_type(c, strategy)
    in_flight_groups = 2 if use_stream else 1  # with streams the next group is prefetched
    if offload is None:
        return _Footprint(stored, 0, 0, extra)
    if offload == "block_level":
        n = 1 if use_stream else per_group  # Diffusers forces one block per group with streams
        group = max((sum(b[k] for b in lst[i:i + n]) for lst in c.blocks for i in range(0, len(lst), n)), default=0)
        resident, in_flight = c.outside[k], c.unmatched[k] + in_flight_groups * group
    else:
        resident, in_flight = 0, in_flight_groups * c.leaf_max
    return _Footprint(resident, in_flight, 0 if strategy.disk else stored - resident, extra)


def _applicable(c: _Component, strategy: Strategy, allow_fp8: bool, disk_path: str | None) -> str | None:
    """``None`` if ``strategy`` can be used for ``c``, else the reason."""
    reasons = (
        (strategy.fp8 and c.role not in _FP8_ROLES,
         "fp8 storage is offered for transformers only (an fp8 encoder reports float8 as its dtype and the pipeline "
         "casts its embeddings to it)"),
        (strategy.fp8 and not allow_fp8, "allow_fp8=False"),
        (strategy.disk and not disk_path, "disk offload needs offload_to_disk_path=..."),
        (_offload_type(c, strategy) == "block_level" and c.block_root is None,
         f"no block list found (looked for {', '.join(BLOCK_LISTS)}); use leaf_offload"),
    )
    return next((reason for bad, reason in reasons if bad), None)


@dataclass
class _Evaluation:
    phase_peaks: dict[str, int]
    cpu: int
    footprints: dict[str, _Footprint]

    @property
    def peak(self) -> int:
        return max(self.phase_peaks.values())


def _evaluate(comps: dict[str, _Component], assignment: dict[str, str], per_group: dict[str, int],
              use_stream: bool) -> _Evaluation:
    fps = {n: _footprint(c, STRATEGIES[assignment[n]], per_group.get(n, 1), use_stream) for n, c in comps.items()}
    resident = sum(fp.resident for fp in fps.values())
    peaks = {}
    for phase in PHASES:
        members = [n for n, c in comps.items() if phase in c.phases]
        if any(comps[n].role != "other" for n in members):
            peaks[phase] = resident + sum(fps[n].in_flight + fps[n].extra + comps[n].activations for n in members)
    return _Evaluation(peaks or {"idle": resident}, sum(fp.cpu for fp in fps.values()), fps)


# ================================================================================================ inputs
def resolve_vram_limit(vram_limit: float | int | str, device: torch.device | str | None = None,
                       components: Mapping[str, Any] | None = None) -> float:
    """The budget in GiB for ``vram_limit``: a number of GiB, a key of :data:`VRAM_PRESETS`, or ``"auto"``.

    ``"auto"`` reads ``torch.cuda.mem_get_info`` of ``device`` (default: the current CUDA device) and adds back
    what this process's caching allocator holds unused and the bytes of ``components`` already on that device.
    """
    if isinstance(vram_limit, str):
        key = vram_limit.strip().lower()
        if key in VRAM_PRESETS:
            return VRAM_PRESETS[key]
        if key != "auto":
            raise ValueError(
                f"unknown vram_limit preset {vram_limit!r}: pass a number of GiB, one of "
                f"{', '.join(map(repr, VRAM_PRESETS))}, or 'auto'"
            )
        device = torch.device(device if device is not None else "cuda")
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(
                f"vram_limit='auto' reads the free memory of a CUDA device, but the device is {device}: pass a number "
                f"of GiB or one of {', '.join(map(repr, VRAM_PRESETS))}"
            )
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        for module in (components or {}).values():
            if isinstance(module, nn.Module):
                free += sum(t.numel() * t.element_size() for t in _tensors(module).values()
                            if t.device.type == "cuda" and t.device.index == index)
        return free / GIB
    if isinstance(vram_limit, bool) or not isinstance(vram_limit, (int, float)):
        raise TypeError(
            f"vram_limit must be a number of GiB, one of {', '.join(map(repr, VRAM_PRESETS))} or 'auto' "
            f"(got {type(vram_limit).__name__})"
        )
    if not math.isfinite(vram_limit) or vram_limit <= 0:
        raise ValueError(f"vram_limit must be a positive number of GiB (got {vram_limit})")
    return float(vram_limit)


def _components_of(pipe_or_components: Any) -> dict[str, nn.Module]:
    if isinstance(pipe_or_components, Mapping):
        items = dict(pipe_or_components)
    elif hasattr(pipe_or_components, "components"):
        items = dict(pipe_or_components.components)
    else:
        raise TypeError(
            f"plan_vram takes a Diffusers pipeline or a dict {{component name: nn.Module}}, got "
            f"{type(pipe_or_components).__name__}"
        )
    comps = {}
    for name, value in items.items():
        if value is None or (name not in COMPONENT_ROLES and not isinstance(value, nn.Module)):
            continue  # tokenizers, schedulers, processors, absent optional components
        if not isinstance(value, nn.Module):
            raise TypeError(
                f"component {name!r} must be a torch.nn.Module (got {type(value).__name__}); pass the loaded model, "
                f"e.g. {name}=WanTransformer3DModel.from_pretrained(...), or leave it out"
            )
        comps[name] = value
    if not comps:
        raise ValueError("nothing to plan: the pipeline / dict has no nn.Module components")
    return comps


def _infer_cfg_batched(pipe: Any) -> bool:
    """Our pipelines batch cond + uncond: ``pipe.cfg_batching`` (Fun) or the ``cfg_batching`` call default."""
    value = getattr(pipe, "cfg_batching", None)
    if isinstance(value, bool):
        return value
    call = getattr(type(pipe), "__call__", None)
    try:
        param = inspect.signature(call).parameters.get("cfg_batching") if call is not None else None
    except (TypeError, ValueError):
        param = None
    return bool(param.default) if param is not None and param.default is not inspect.Parameter.empty else False


def _check_positive(**values: Any) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer (got {value!r})")


# ================================================================================================ planner
def plan_vram(
    pipe_or_components: Any,
    vram_limit: float | str,
    *,
    height: int = 480,
    width: int = 832,
    num_frames: int = 81,
    batch_size: int = 1,
    cfg_batched: bool | None = None,
    dtype: torch.dtype | None = None,
    allow_fp8: bool = True,
    offload_to_disk_path: str | os.PathLike | None = None,
    cpu_ram_limit: float | None = None,
    overrides: Mapping[str, str] | None = None,
    use_stream: bool = True,
) -> VramPlan:
    """Decide how each component of a Wan pipeline is placed to stay within ``vram_limit`` (pure: moves nothing).

    Sizes are read from the modules' parameters and buffers as they are stored (meta-device modules work, so release
    sizes can be planned without weights).

    Args:
        pipe_or_components: a pipeline (its ``components``) or ``{name: module}``; known names are ``text_encoder``,
            ``image_encoder``, ``transformer``, ``transformer_2``, ``vae``, other modules are kept resident.
        vram_limit: GiB, a key of :data:`VRAM_PRESETS` (``"8gb"``, ``"24gb"``, ``"80gb"``) or ``"auto"`` (CUDA).
        height, width, num_frames, batch_size: the generation to plan for (``batch_size`` = videos per call).
        cfg_batched: cond and uncond in one transformer forward (doubles its activations).  ``None``: the
            pipeline's ``cfg_batching`` default (our pipelines), else ``False`` (stock: two forwards).
        dtype: compute dtype of the transformers / encoders; ``None``: the dtype of their weights.
        allow_fp8: offer fp8 weight storage (numerics change slightly; the plan's notes say where it is used).
        offload_to_disk_path: a folder for ``disk_offload`` (only offered when given).
        cpu_ram_limit: GiB of CPU RAM the offloaded weights may take (``None``: unlimited).
        overrides: ``{component: strategy}`` forcing strategies (e.g. ``{"text_encoder": "group_offload"}``).
        use_stream: plan for CUDA-stream prefetching (two groups in flight, one block per group).

    Returns:
        :class:`VramPlan`.

    Raises:
        ValueError: bad budget / preset / override, or no placement fits (the message says what to change).
        TypeError: a component is not an ``nn.Module`` or a transformer lacks a Wan config.

    Example:
        >>> with torch.device("meta"):  # doctest: +SKIP
        ...     transformer = WanTransformer3DModel(num_attention_heads=12, ffn_dim=8960, num_layers=30)
        >>> transformer = transformer.to(torch.bfloat16)  # doctest: +SKIP
        >>> plan_vram({"transformer": transformer}, "8gb").strategies  # doctest: +SKIP
        {'transformer': 'resident'}
    """
    comps_in = _components_of(pipe_or_components)
    limit = resolve_vram_limit(vram_limit, components=comps_in)
    _check_positive(height=height, width=width, num_frames=num_frames, batch_size=batch_size)
    if cpu_ram_limit is not None and (isinstance(cpu_ram_limit, bool) or not cpu_ram_limit > 0):
        raise ValueError(f"cpu_ram_limit must be a positive number of GiB or None (got {cpu_ram_limit!r})")
    if cfg_batched is None:
        cfg_batched = not isinstance(pipe_or_components, Mapping) and _infer_cfg_batched(pipe_or_components)
    disk_path = os.fspath(offload_to_disk_path) if offload_to_disk_path is not None else None

    vae = comps_in.get("vae")
    shape = _Shape(
        height, width, num_frames, batch_size, bool(cfg_batched),
        temporal=_config_value(vae, "scale_factor_temporal", default=4) if vae is not None else 4,
        spatial=_config_value(vae, "scale_factor_spatial", default=8) if vae is not None else 8,
        vae_tiling=bool(getattr(vae, "use_tiling", False)),
        vae_tile=(getattr(vae, "tile_sample_min_height", 256), getattr(vae, "tile_sample_min_width", 256)),
    )
    comps = {n: _measure(n, COMPONENT_ROLES.get(n, "other"), m, shape, dtype) for n, m in comps_in.items()}
    order = sorted(comps, key=lambda n: (ROLE_PRIORITY.index(comps[n].role), n))
    candidates = _candidates(comps, overrides or {}, allow_fp8, disk_path)
    tied = [n for n in _EXPERTS if n in comps] if len(set(_EXPERTS) & set(comps)) == 2 and not (
        set(_EXPERTS) & set(overrides or {})) else []
    if tied:
        candidates[tied[1]] = [None]  # follows tied[0]

    def assignments():
        names = list(candidates)
        for combo in itertools.product(*(candidates[n] for n in names)):
            a = dict(zip(names, combo))
            if tied:
                a[tied[1]] = a[tied[0]]
            yield a

    def rank(a):
        return tuple(candidates[n].index(a[n]) if a[n] in candidates[n] else 0 for n in order)

    margin = max(_MIN_MARGIN_GIB, _MARGIN_FRACTION * limit) * GIB
    cpu_limit = cpu_ram_limit * GIB if cpu_ram_limit is not None else math.inf
    evaluated = [(a, _evaluate(comps, a, {}, use_stream)) for a in sorted(assignments(), key=rank)]
    chosen = next(((a, e) for a, e in evaluated if e.peak + margin <= limit * GIB and e.cpu <= cpu_limit), None)
    if chosen is None:
        raise ValueError(_infeasible_message(comps, evaluated, limit, margin, cpu_limit, shape, overrides, allow_fp8))
    assignment, evaluation = chosen

    per_group = _blocks_per_group(comps, assignment, order, limit * GIB - margin, cpu_limit, use_stream)
    evaluation = _evaluate(comps, assignment, per_group, use_stream)
    plans = {}
    for name in order:
        c, s, fp = comps[name], STRATEGIES[assignment[name]], evaluation.footprints[name]
        offload = _offload_type(c, s)
        plans[name] = ComponentPlan(
            name=name, role=c.role, strategy=s.name, offload_type=offload,
            num_blocks_per_group=(1 if use_stream else per_group.get(name, 1)) if offload == "block_level" else None,
            block_root=c.block_root if offload == "block_level" else ("" if offload else None),
            weights_gib=c.size[int(s.fp8)] / GIB, resident_gib=fp.resident / GIB,
            in_flight_gib=(fp.in_flight + fp.extra) / GIB, activations_gib=c.activations / GIB,
            cpu_ram_gib=fp.cpu / GIB, storage_dtype=FP8_DTYPE if s.fp8 else c.dtype,
            compute_dtype=c.compute_dtype, phases=c.phases,
        )
    plan = VramPlan(
        vram_limit_gib=limit, margin_gib=margin / GIB, components=plans,
        phase_peaks_gib={p: v / GIB for p, v in evaluation.phase_peaks.items()}, cpu_ram_gib=evaluation.cpu / GIB,
        cpu_ram_limit_gib=cpu_ram_limit, use_stream=use_stream, height=height, width=width, num_frames=num_frames,
        batch_size=batch_size, cfg_batched=bool(cfg_batched),
        tokens=shape.tokens(_config_value(comps_in[order[0]], "patch_size")) if comps[order[0]].role == "transformer"
        else None, offload_to_disk_path=disk_path,
    )
    plan.notes = _notes(plan, shape)
    return plan


def _candidates(comps: dict[str, _Component], overrides: Mapping[str, str], allow_fp8: bool,
                disk_path: str | None) -> dict[str, list[str]]:
    unknown = set(overrides) - set(comps)
    if unknown:
        raise ValueError(f"overrides name unknown components {sorted(unknown)}; the components are {sorted(comps)}")
    candidates = {}
    for name, c in comps.items():
        if name in overrides:
            strategy = STRATEGIES.get(overrides[name])
            if strategy is None:
                raise ValueError(
                    f"unknown strategy {overrides[name]!r} for {name}; choose one of {', '.join(STRATEGIES)}"
                )
            reason = _applicable(c, strategy, allow_fp8, disk_path)
            if reason:
                raise ValueError(f"strategy {strategy.name!r} cannot be used for {name}: {reason}")
            candidates[name] = [strategy.name]
        else:
            candidates[name] = [s for s in ROLE_STRATEGIES[c.role]
                                if _applicable(c, STRATEGIES[s], allow_fp8, disk_path) is None]
    return candidates


def _blocks_per_group(comps, assignment, order, budget, cpu_limit, use_stream) -> dict[str, int]:
    """Without streams, the largest ``num_blocks_per_group`` that still fits, component by component."""
    per_group: dict[str, int] = {}
    if use_stream:
        return per_group
    for name in order:
        c = comps[name]
        if _offload_type(c, STRATEGIES[assignment[name]]) != "block_level":
            continue
        for n in range(max(map(len, c.blocks)), 0, -1):
            e = _evaluate(comps, assignment, {**per_group, name: n}, use_stream)
            if e.peak <= budget and e.cpu <= cpu_limit:
                per_group[name] = n
                break
    return per_group


def _infeasible_message(comps, evaluated, limit, margin, cpu_limit, shape, overrides, allow_fp8) -> str:
    a, e = min(evaluated, key=lambda item: item[1].peak)
    if e.peak + margin > limit * GIB:
        phase = max(e.phase_peaks, key=e.phase_peaks.get)
        acts = sum(c.activations for c in comps.values() if phase in c.phases and c.role != "other")
        vae = comps.get("vae")
        hints = (
            (True, f"lower height / width / num_frames (now {shape.height}x{shape.width}x{shape.num_frames})"),
            (shape.batch_size > 1 or shape.cfg_batched, "use batch_size 1 and two CFG forwards (cfg_batching=False)"),
            (phase == "decode" and vae is not None and not shape.vae_tiling,
             "enable VAE tiling (pipe.vae.enable_tiling())"),
            (phase == "decode" and vae is not None and vae.dtype == torch.float32,
             "load the VAE in bfloat16 (halves its decode working set)"),
            (not allow_fp8, "allow_fp8=True"),
            (bool(overrides), "drop the overrides"),
            (True, "use a larger vram_limit"),
        )
        return (
            f"no placement fits vram_limit={limit:.2f} GiB: even the leanest one "
            f"({', '.join(f'{n}={s}' for n, s in a.items())}) needs an estimated {e.peak / GIB:.2f} GiB in phase "
            f"{phase!r} ({acts / GIB:.2f} GiB of it activations) + {margin / GIB:.2f} GiB margin. To fit: "
            + "; ".join(text for wanted, text in hints if wanted)
        )
    fitting = [item for item in evaluated if item[1].peak + margin <= limit * GIB]
    e = min((item[1] for item in fitting), key=lambda ev: ev.cpu)
    return (
        f"the offloaded weights need at least {e.cpu / GIB:.2f} GiB of CPU RAM > cpu_ram_limit="
        f"{cpu_limit / GIB:.2f} GiB: pass offload_to_disk_path=... (disk offload), raise cpu_ram_limit, or use a "
        "larger vram_limit so more stays resident"
    )


def _notes(plan: VramPlan, shape: _Shape) -> list[str]:
    notes = []
    for c in plan.components.values():
        if c.fp8:
            notes.append(
                f"{c.name}: weights stored in float8_e4m3fn (computed in "
                f"{str(c.compute_dtype).replace('torch.', '')}); "
                "outputs change slightly -- allow_fp8=False keeps them exact"
            )
        if c.disk:
            notes.append(f"{c.name}: weights read back from {plan.offload_to_disk_path} on every use (slow)")
    if plan.use_stream and any(c.offload_type == "block_level" for c in plan.components.values()):
        notes.append("CUDA streams: one block per group, the next block prefetched while the current one runs")
    peak_phase = max(plan.phase_peaks_gib, key=plan.phase_peaks_gib.get)
    if peak_phase == "decode" and "vae" in plan.components and not shape.vae_tiling:
        notes.append("decode is the peak phase: pipe.vae.enable_tiling() lowers it (re-plan after enabling)")
    if plan.cfg_batched:
        notes.append("planned for batched CFG (cond + uncond in one forward): cfg_batching=False halves activations")
    return notes


# ================================================================================================ apply / remove
def _registries(module: nn.Module) -> Iterator[tuple[nn.Module, HookRegistry]]:
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None:
            yield m, registry


def _check_unmanaged(name: str, module: nn.Module) -> None:
    if any(getattr(m, "_hf_hook", None) is not None for m in module.modules()):
        raise ValueError(
            f"{name} has Accelerate offloading hooks (enable_model_cpu_offload / enable_sequential_cpu_offload): call "
            "pipe.remove_all_hooks() first -- enable_vram_management replaces them"
        )
    for _, registry in _registries(module):
        present = [h for h in (*_GROUP_OFFLOAD_HOOKS, *_CASTING_HOOKS) if registry.get_hook(h) is not None]
        if present:
            raise ValueError(
                f"{name} already has Diffusers {present[0]} hooks (enable_group_offload / enable_layerwise_casting): "
                "reload the component or leave its placement to enable_vram_management, not both"
            )
    if any(t.device.type == "meta" for t in _tensors(module).values()):
        raise ValueError(f"{name} has weights on the meta device: load them first (plan_vram works on meta modules)")


def _disk_dir(root: str, name: str) -> Path:
    return Path(root) / name


def _clear_disk_dir(folder: Path) -> None:
    """Our group files only: Diffusers reuses an existing file of the same name, which would be stale weights."""
    for f in folder.glob("group_*.safetensors"):
        f.unlink()


def _apply_component(module: nn.Module, c: ComponentPlan, device: torch.device, use_stream: bool,
                     disk_path: str | None, low_cpu_mem_usage: bool) -> dict[str, tuple[torch.device, torch.dtype]]:
    record = {n: (t.device, t.dtype) for n, t in _named_tensors(module)}
    if c.fp8:
        if hasattr(module, "enable_layerwise_casting"):
            module.enable_layerwise_casting(storage_dtype=FP8_DTYPE, compute_dtype=c.compute_dtype)
        else:
            apply_layerwise_casting(module, FP8_DTYPE, c.compute_dtype, skip_modules_pattern=_fp8_skip_patterns(module))
    if c.offload_type is None:
        module.to(device)
        return record
    root = module.get_submodule(c.block_root)
    in_root = _tensors(root)
    for t in _tensors(module).values():
        if id(t) not in in_root:
            t.data = t.data.to(device)
    folder = None
    if c.disk:
        folder = _disk_dir(disk_path, c.name)
        folder.mkdir(parents=True, exist_ok=True)
        _clear_disk_dir(folder)
    kwargs = dict(
        onload_device=device, offload_device=torch.device("cpu"), offload_type=c.offload_type,
        num_blocks_per_group=c.num_blocks_per_group, use_stream=use_stream, low_cpu_mem_usage=low_cpu_mem_usage,
        offload_to_disk_path=os.fspath(folder) if folder is not None else None,
    )
    if hasattr(root, "enable_group_offload"):
        root.enable_group_offload(**kwargs)
    else:
        apply_group_offloading(root, **kwargs)
    return record


def _reload_disk_groups(module: nn.Module) -> None:
    """Read disk-offloaded weights back into CPU tensors (after offload they are empty placeholders)."""
    import safetensors.torch

    groups = {}
    for _, registry in _registries(module):
        hook = registry.get_hook("group_offloading")
        if hook is not None and getattr(hook.group, "offload_to_disk_path", None):
            groups[id(hook.group)] = hook.group
    for group in groups.values():
        if getattr(group, "_is_offloaded_to_disk", False) and os.path.exists(group.safetensors_file_path):
            loaded = safetensors.torch.load_file(group.safetensors_file_path, device="cpu")
            for key, tensor in group.key_to_tensor.items():
                tensor.data = loaded[key]


def _drop_empty_registry(module: nn.Module) -> None:
    registry = module._diffusers_hook
    if registry.hooks:
        return
    del module._diffusers_hook
    forward = module.__dict__.get("forward")
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.forward  # the bound class method the registry left behind


def _remove_hooks(module: nn.Module) -> None:
    for m, registry in list(_registries(module)):
        for name in (*_GROUP_OFFLOAD_HOOKS, *_CASTING_HOOKS):
            hook = registry.get_hook(name)
            if hook is None:
                continue
            if name == "layerwise_casting":
                # LayerwiseCastingHook refuses to deinitialize (its cast is lossy); dtypes are restored below
                hook.deinitalize_hook = ModelHook.deinitalize_hook.__get__(hook)
            registry.remove_hook(name, recurse=False)
        _drop_empty_registry(m)
    top = getattr(module, "_diffusers_hook", None)
    if top is not None:
        top.invalidate_child_registries_cache()


def _is_pinned(t: torch.Tensor) -> bool:
    try:
        return t.is_pinned()
    except RuntimeError:
        return False


def _undo_component(module: nn.Module, record: Mapping[str, tuple[torch.device, torch.dtype]],
                    disk_folder: Path | None) -> None:
    _reload_disk_groups(module)
    _remove_hooks(module)
    for name, t in _named_tensors(module):
        if name not in record:
            continue
        device, dtype = record[name]
        data = t.data
        if data.device != device or data.dtype != dtype:
            data = data.to(device=device, dtype=dtype)
        if device.type == "cpu" and _is_pinned(data):
            data = data.clone()  # drop the page-locked staging copy of streamed offloading
        t.data = data
    if disk_folder is not None and disk_folder.exists():
        _clear_disk_dir(disk_folder)
        if not any(disk_folder.iterdir()):
            disk_folder.rmdir()


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def enable_vram_management(
    pipe: Any,
    vram_limit: float | str = "auto",
    *,
    device: torch.device | str | None = None,
    height: int = 480,
    width: int = 832,
    num_frames: int = 81,
    batch_size: int = 1,
    cfg_batched: bool | None = None,
    dtype: torch.dtype | None = None,
    allow_fp8: bool = True,
    offload_to_disk_path: str | os.PathLike | None = None,
    cpu_ram_limit: float | None = None,
    overrides: Mapping[str, str] | None = None,
    verbose: bool = True,
) -> VramPlan:
    """Plan (:func:`plan_vram`) and apply VRAM management to a Wan pipeline; returns the plan.

    Resident components are moved to ``device``; the others get Diffusers group offloading (block level on their
    block list, leaf level for the VAE; CUDA-stream prefetching on CUDA, none elsewhere) and/or fp8 layerwise
    casting.  ``pipe._execution_device`` stays ``device``.  Calling it again re-plans (the previous plan is undone
    first); :func:`disable_vram_management` undoes it.  The plan is kept as ``pipe._wan_vram_plan``.

    Args:
        pipe: a Wan pipeline (stock ``WanPipeline`` / ``WanImageToVideoPipeline`` / ``WanVACEPipeline`` or ours).
        vram_limit: GiB, ``"8gb"`` / ``"24gb"`` / ``"80gb"`` (:data:`VRAM_PRESETS`) or ``"auto"`` (free CUDA memory).
        device: where to compute (default: the current CUDA device, else CPU).
        height, width, num_frames, batch_size, cfg_batched, dtype, allow_fp8, offload_to_disk_path, cpu_ram_limit,
            overrides: see :func:`plan_vram`; plan for the largest generation you will run.
        verbose: log the plan table as a warning (else at debug level).

    Example:
        >>> plan = enable_vram_management(pipe, "8gb")  # doctest: +SKIP
        >>> plan.strategies  # doctest: +SKIP
        {'transformer': 'resident_fp8', 'vae': 'resident', 'text_encoder': 'group_offload'}
        >>> plan = enable_vram_management(pipe, 24, overrides={"transformer": "group_offload"})  # doctest: +SKIP
    """
    if not hasattr(pipe, "components"):
        raise TypeError(f"enable_vram_management takes a Diffusers pipeline, got {type(pipe).__name__}")
    if getattr(pipe, "_wan_vram_plan", None) is not None:
        disable_vram_management(pipe)
    device = _default_device(device)
    use_stream = device.type == "cuda"
    modules = _components_of(pipe)
    for name, module in modules.items():
        _check_unmanaged(name, module)
    limit = resolve_vram_limit(vram_limit, device, modules)
    plan = plan_vram(
        pipe, limit, height=height, width=width, num_frames=num_frames, batch_size=batch_size,
        cfg_batched=cfg_batched, dtype=dtype, allow_fp8=allow_fp8, offload_to_disk_path=offload_to_disk_path,
        cpu_ram_limit=cpu_ram_limit, overrides=overrides, use_stream=use_stream,
    )
    undo: dict[str, dict] = {}
    # offloaded components first: they leave the device before resident ones arrive
    for name in sorted(plan.components, key=lambda n: plan.components[n].offload_type is None):
        c = plan.components[name]
        try:
            undo[name] = _apply_component(modules[name], c, device, use_stream, plan.offload_to_disk_path,
                                          low_cpu_mem_usage=cpu_ram_limit is not None)
        except Exception:
            undo[name] = {}
            _undo_all(pipe, plan, undo)
            raise
    pipe._wan_vram_plan = plan
    pipe._wan_vram_undo = undo
    (logger.warning if verbose else logger.debug)(f"diffusers_wan_ext: VRAM management\n{plan}")
    return plan


def _undo_all(pipe: Any, plan: VramPlan, undo: Mapping[str, Mapping]) -> None:
    for name, record in undo.items():
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            c = plan.components[name]
            folder = _disk_dir(plan.offload_to_disk_path, name) if c.disk else None
            _undo_component(module, record, folder)


def disable_vram_management(pipe: Any) -> None:
    """Undo :func:`enable_vram_management`: remove its group-offloading and layerwise-casting hooks, read
    disk-offloaded weights back (and delete their files), and put every tensor back on its previous device and dtype.

    fp8 storage is lossy: after ``resident_fp8`` / ``group_offload_fp8`` the weights are back in their dtype but keep
    the fp8 rounding (reload the component for the original values).  A no-op if VRAM management is not enabled.
    """
    plan = getattr(pipe, "_wan_vram_plan", None)
    if plan is None:
        return
    _undo_all(pipe, plan, getattr(pipe, "_wan_vram_undo", None) or {})
    for attr in ("_wan_vram_plan", "_wan_vram_undo"):
        if attr in vars(pipe):
            delattr(pipe, attr)
