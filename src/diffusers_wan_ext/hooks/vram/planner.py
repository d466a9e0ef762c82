"""The VRAM plan search: :func:`plan_vram` decides how each component of a Wan pipeline is placed, and
:class:`VramPlan` holds the decision.

A plan fits when ``max(phase peaks) + margin <= vram_limit`` (``margin`` = the larger of 0.5 GiB and 5 % of the
budget; phase peaks from :mod:`.memory`) and the CPU-RAM copies of offloaded weights fit ``cpu_ram_limit``.  Among
the plans that fit, the planner takes the one that keeps the most important component at its most preferred
strategy (:data:`ROLE_PRIORITY`: transformers, which run ``2 x steps`` times, then the VAE, then the encoders;
per-role preferences in :data:`ROLE_STRATEGIES`).  The two Wan2.2 experts always share one strategy (same size, run
one after the other).  If nothing fits, :class:`ValueError` says by how much and what to change.

Batched CFG (cond + uncond in one transformer forward, twice the activations) is a declared capability: our
pipelines set the class attribute ``cfg_batching: bool``; stock Diffusers pipelines have none and run two forwards.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..sliding_window import current_schedule, window_frames
from .memory import (
    ComponentSizes,
    Evaluation,
    GenerationShape,
    config_value,
    evaluate,
    measure_component,
    module_tensors,
    offload_type,
    planning_margin_gib,
)
from .strategies import (
    BLOCK_LISTS,
    COMPONENT_ROLES,
    EXPERTS,
    FP8_DTYPE,
    FP8_ROLES,
    GIB,
    ROLE_PRIORITY,
    ROLE_STRATEGIES,
    STRATEGIES,
    VRAM_PRESETS,
    Strategy,
)

__all__ = ["ComponentPlan", "VramPlan", "pipeline_components", "pipeline_cfg_batching", "plan_vram",
           "resolve_vram_limit", "sliding_window_frames"]


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
    #: GiB of weights already quantized when loaded (GGUF / fp8 layers), part of ``weights_gib``
    quantized_gib: float = 0.0

    @property
    def fp8(self) -> bool:
        return STRATEGIES[self.strategy].fp8

    @property
    def disk(self) -> bool:
        return STRATEGIES[self.strategy].disk

    def groups_summary(self) -> str:
        """How the component is grouped for offloading, for :class:`VramPlan`'s table."""
        if self.offload_type is None:
            return "-"
        if self.offload_type == "block_level":
            return f"{self.num_blocks_per_group} block(s) @ {self.block_root or '<root>'}"
        return "leaf layers"


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
    window_frames: int | None = None

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
        if self.window_frames is not None:
            tokens += f" per {self.window_frames}-latent-frame sliding window"
        cfg = ", batched CFG" if self.cfg_batched else ""
        lines = [
            f"Wan VRAM plan: budget {self.vram_limit_gib:.2f} GiB (margin {self.margin_gib:.2f}), "
            f"{self.height}x{self.width}x{self.num_frames}, batch {self.batch_size}{cfg}{tokens}, {stream}",
            f"{'component':<14} {'strategy':<18} {'weights':>8} {'resident':>9} {'in flight':>10} "
            f"{'activ.':>7} {'CPU RAM':>8}  groups",
        ]
        for c in self.components.values():
            lines.append(
                f"{c.name:<14} {c.strategy:<18} {c.weights_gib:>8.2f} {c.resident_gib:>9.2f} {c.in_flight_gib:>10.2f} "
                f"{c.activations_gib:>7.2f} {c.cpu_ram_gib:>8.2f}  {c.groups_summary()}"
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


# ================================================================================================ inputs
def _presets_text() -> str:
    return ", ".join(map(repr, VRAM_PRESETS))


def _free_cuda_gib(device: torch.device | str | None, components: Mapping[str, Any] | None) -> float:
    """``vram_limit="auto"``: free memory of the CUDA device + unused cache + the components already on it."""
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"vram_limit='auto' reads the free memory of a CUDA device, but the device is {device}: pass a number "
            f"of GiB or one of {_presets_text()}"
        )
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    for module in (components or {}).values():
        if isinstance(module, nn.Module):
            free += sum(t.numel() * t.element_size() for t in module_tensors(module).values()
                        if t.device.type == "cuda" and t.device.index == index)
    return free / GIB


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
                f"unknown vram_limit preset {vram_limit!r}: pass a number of GiB, one of {_presets_text()}, or 'auto'"
            )
        return _free_cuda_gib(device, components)
    if isinstance(vram_limit, bool) or not isinstance(vram_limit, (int, float)):
        raise TypeError(
            f"vram_limit must be a number of GiB, one of {_presets_text()} or 'auto' "
            f"(got {type(vram_limit).__name__})"
        )
    if not math.isfinite(vram_limit) or vram_limit <= 0:
        raise ValueError(f"vram_limit must be a positive number of GiB (got {vram_limit})")
    return float(vram_limit)


def pipeline_components(pipe_or_components: Any) -> dict[str, nn.Module]:
    """The ``nn.Module`` components of a pipeline or of a dict ``{name: module}`` (tokenizers, schedulers and absent
    optional components left out)."""
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


def pipeline_cfg_batching(pipe: Any) -> bool:
    """Whether ``pipe`` runs cond + uncond in one transformer forward: the ``cfg_batching`` attribute every pipeline
    of ours declares; a stock Diffusers pipeline has none and runs two forwards (``False``)."""
    return bool(getattr(pipe, "cfg_batching", False))


def sliding_window_frames(pipe_or_components: Any, sliding_window_size: int | None, latent_frames: int) -> int | None:
    """Latent frames of the largest window a transformer forward will see: ``sliding_window_size`` when given, else
    the largest window of the sliding-window hook already on a transformer (``apply_sliding_window``; at step 0 for
    schedules that change over the steps), else ``None`` (the whole video)."""
    if sliding_window_size is not None:
        _check_positive(sliding_window_size=sliding_window_size)
        return sliding_window_size
    for name, module in pipeline_components(pipe_or_components).items():
        schedule = current_schedule(module) if COMPONENT_ROLES.get(name) == "transformer" else None
        if schedule is not None:
            return max(len(window_frames(w, latent_frames)) for w in schedule.windows(latent_frames, 0))
    return None


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
    sliding_window_size: int | None = None,
) -> VramPlan:
    """Decide how each component of a Wan pipeline is placed to stay within ``vram_limit`` (pure: moves nothing).

    Sizes are read from the modules' parameters and buffers as they are stored (meta-device modules work, so release
    sizes can be planned without weights); a transformer loaded quantized (``load_quantized_dit``: GGUF / fp8
    layers) counts its packed bytes, and the fp8 strategies are not offered for it.

    Args:
        pipe_or_components: a pipeline (its ``components``) or ``{name: module}``; known names are ``text_encoder``,
            ``image_encoder``, ``transformer``, ``transformer_2``, ``vae``, other modules are kept resident.
        vram_limit: GiB, a key of :data:`VRAM_PRESETS` (``"8gb"``, ``"24gb"``, ``"80gb"``) or ``"auto"`` (CUDA).
        height, width, num_frames, batch_size: the generation to plan for (``batch_size`` = videos per call).
        cfg_batched: cond and uncond in one transformer forward (doubles its activations).  ``None``: the
            pipeline's declared ``cfg_batching`` attribute (our pipelines), else ``False`` (stock pipelines and
            dicts: two forwards).
        dtype: compute dtype of the transformers / encoders; ``None``: the dtype of their weights.
        allow_fp8: offer fp8 weight storage (numerics change slightly; the plan's notes say where it is used).
        offload_to_disk_path: a folder for ``disk_offload`` (only offered when given).
        cpu_ram_limit: GiB of CPU RAM the offloaded weights may take (``None``: unlimited).
        overrides: ``{component: strategy}`` forcing strategies (e.g. ``{"text_encoder": "group_offload"}``).
        use_stream: plan for CUDA-stream prefetching (two groups in flight, one block per group).
        sliding_window_size: the pipeline call's ``sliding_window_size`` (latent frames): the transformers run one
            forward per window, so their activations are planned for the window's tokens, not the video's.
            ``None``: the largest window of a sliding-window hook already on a transformer, else the whole video.

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
    comps_in = pipeline_components(pipe_or_components)
    limit = resolve_vram_limit(vram_limit, components=comps_in)
    _check_positive(height=height, width=width, num_frames=num_frames, batch_size=batch_size)
    if cpu_ram_limit is not None and (isinstance(cpu_ram_limit, bool) or not cpu_ram_limit > 0):
        raise ValueError(f"cpu_ram_limit must be a positive number of GiB or None (got {cpu_ram_limit!r})")
    if cfg_batched is None:
        cfg_batched = not isinstance(pipe_or_components, Mapping) and pipeline_cfg_batching(pipe_or_components)
    disk_path = os.fspath(offload_to_disk_path) if offload_to_disk_path is not None else None

    shape = GenerationShape.for_vae(comps_in.get("vae"), height, width, num_frames, batch_size, bool(cfg_batched))
    shape = replace(shape, window_frames=sliding_window_frames(comps_in, sliding_window_size, shape.latent_frames))
    comps = {n: measure_component(n, COMPONENT_ROLES.get(n, "other"), m, shape, dtype) for n, m in comps_in.items()}
    order = sorted(comps, key=lambda n: (ROLE_PRIORITY.index(comps[n].role), n))
    margin = planning_margin_gib(limit) * GIB
    cpu_limit = cpu_ram_limit * GIB if cpu_ram_limit is not None else math.inf
    assignment = _search(comps, order, overrides or {}, allow_fp8, disk_path, limit, margin, cpu_limit, shape,
                         use_stream)
    per_group = _blocks_per_group(comps, assignment, order, limit * GIB - margin, cpu_limit, use_stream)
    evaluation = evaluate(comps, assignment, per_group, use_stream)
    first = order[0]
    plan = VramPlan(
        vram_limit_gib=limit, margin_gib=margin / GIB,
        components=_component_plans(comps, order, assignment, evaluation, per_group, use_stream),
        phase_peaks_gib={p: v / GIB for p, v in evaluation.phase_peaks.items()}, cpu_ram_gib=evaluation.cpu / GIB,
        cpu_ram_limit_gib=cpu_ram_limit, use_stream=use_stream, height=height, width=width, num_frames=num_frames,
        batch_size=batch_size, cfg_batched=bool(cfg_batched),
        tokens=shape.tokens(config_value(comps_in[first], "patch_size")) if comps[first].role == "transformer"
        else None, offload_to_disk_path=disk_path, window_frames=shape.window_frames,
    )
    plan.notes = _notes(plan, shape)
    return plan


def _tied_experts(comps: Mapping[str, ComponentSizes], overrides: Mapping[str, str]) -> list[str]:
    """Both Wan2.2 experts when present and not overridden (the second follows the first), else ``[]``."""
    if len(set(EXPERTS) & set(comps)) == 2 and not (set(EXPERTS) & set(overrides)):
        return [n for n in EXPERTS if n in comps]
    return []


def _assignments(candidates: Mapping[str, list], tied: list[str]) -> Iterator[dict[str, str]]:
    names = list(candidates)
    for combo in itertools.product(*(candidates[n] for n in names)):
        a = dict(zip(names, combo))
        if tied:
            a[tied[1]] = a[tied[0]]
        yield a


def _search(comps: dict[str, ComponentSizes], order: list[str], overrides: Mapping[str, str], allow_fp8: bool,
            disk_path: str | None, limit: float, margin: float, cpu_limit: float, shape: GenerationShape,
            use_stream: bool) -> dict[str, str]:
    """The most preferred assignment ``{component: strategy}`` that fits (``limit`` GiB; ``margin`` and
    ``cpu_limit`` bytes), else :class:`ValueError` saying what to change."""
    candidates = _candidates(comps, overrides, allow_fp8, disk_path)
    tied = _tied_experts(comps, overrides)
    if tied:
        candidates[tied[1]] = [None]  # follows tied[0]

    def rank(a):
        return tuple(candidates[n].index(a[n]) if a[n] in candidates[n] else 0 for n in order)

    evaluated = [(a, evaluate(comps, a, {}, use_stream)) for a in sorted(_assignments(candidates, tied), key=rank)]
    chosen = next((a for a, e in evaluated if e.peak + margin <= limit * GIB and e.cpu <= cpu_limit), None)
    if chosen is None:
        raise ValueError(_infeasible_message(comps, evaluated, limit, margin, cpu_limit, shape, overrides, allow_fp8))
    return chosen


def _component_plans(comps: dict[str, ComponentSizes], order: list[str], assignment: Mapping[str, str],
                     evaluation: Evaluation, per_group: Mapping[str, int],
                     use_stream: bool) -> dict[str, ComponentPlan]:
    plans = {}
    for name in order:
        c, s, fp = comps[name], STRATEGIES[assignment[name]], evaluation.footprints[name]
        offload = offload_type(c, s)
        plans[name] = ComponentPlan(
            name=name, role=c.role, strategy=s.name, offload_type=offload,
            num_blocks_per_group=(1 if use_stream else per_group.get(name, 1)) if offload == "block_level" else None,
            block_root=c.block_root if offload == "block_level" else ("" if offload else None),
            weights_gib=c.size[int(s.fp8)] / GIB, resident_gib=fp.resident / GIB,
            in_flight_gib=(fp.in_flight + fp.extra) / GIB, activations_gib=c.activations / GIB,
            cpu_ram_gib=fp.cpu / GIB, storage_dtype=FP8_DTYPE if s.fp8 else c.dtype,
            compute_dtype=c.compute_dtype, phases=c.phases, quantized_gib=c.quantized / GIB,
        )
    return plans


def _applicable(c: ComponentSizes, strategy: Strategy, allow_fp8: bool, disk_path: str | None) -> str | None:
    """``None`` if ``strategy`` can be used for ``c``, else the reason."""
    reasons = (
        (strategy.fp8 and c.role not in FP8_ROLES,
         "fp8 storage is offered for transformers only (an fp8 encoder reports float8 as its dtype and the pipeline "
         "casts its embeddings to it)"),
        (strategy.fp8 and c.quantized > 0,
         "its weights are already quantized (GGUF / fp8 layers, counted as stored): fp8 layerwise casting would not "
         "shrink them and must not wrap GGUFLinear / Fp8Linear"),
        (strategy.fp8 and not allow_fp8, "allow_fp8=False"),
        (strategy.disk and not disk_path, "disk offload needs offload_to_disk_path=..."),
        (offload_type(c, strategy) == "block_level" and c.block_root is None,
         f"no block list found (looked for {', '.join(BLOCK_LISTS)}); use leaf_offload"),
    )
    return next((reason for bad, reason in reasons if bad), None)


def _candidates(comps: dict[str, ComponentSizes], overrides: Mapping[str, str], allow_fp8: bool,
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
        if offload_type(c, STRATEGIES[assignment[name]]) != "block_level":
            continue
        for n in range(max(map(len, c.blocks)), 0, -1):
            e = evaluate(comps, assignment, {**per_group, name: n}, use_stream)
            if e.peak <= budget and e.cpu <= cpu_limit:
                per_group[name] = n
                break
    return per_group


# ================================================================================================ messages
def _over_budget_message(comps, assignment, e: Evaluation, limit, margin, shape: GenerationShape, overrides,
                         allow_fp8) -> str:
    phase = max(e.phase_peaks, key=e.phase_peaks.get)
    acts = sum(c.activations for c in comps.values() if phase in c.phases and c.role != "other")
    vae = comps.get("vae")
    hints = (
        (True, f"lower height / width / num_frames (now {shape.height}x{shape.width}x{shape.num_frames})"),
        (phase.startswith("denoise") and shape.window_frames is None and shape.latent_frames > 1,
         "use sliding windows (sliding_window_size= / sliding_window_stride=, latent frames; plan with "
         "sliding_window_size=)"),
        (phase.startswith("denoise") and shape.window_frames is not None and shape.window_frames > 1,
         f"a smaller sliding_window_size (now {shape.window_frames} latent frames)"),
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
        f"({', '.join(f'{n}={s}' for n, s in assignment.items())}) needs an estimated {e.peak / GIB:.2f} GiB in phase "
        f"{phase!r} ({acts / GIB:.2f} GiB of it activations) + {margin / GIB:.2f} GiB margin. To fit: "
        + "; ".join(text for wanted, text in hints if wanted)
    )


def _infeasible_message(comps, evaluated, limit, margin, cpu_limit, shape, overrides, allow_fp8) -> str:
    a, e = min(evaluated, key=lambda item: item[1].peak)
    if e.peak + margin > limit * GIB:
        return _over_budget_message(comps, a, e, limit, margin, shape, overrides, allow_fp8)
    fitting = [item for item in evaluated if item[1].peak + margin <= limit * GIB]
    e = min((item[1] for item in fitting), key=lambda ev: ev.cpu)
    return (
        f"the offloaded weights need at least {e.cpu / GIB:.2f} GiB of CPU RAM > cpu_ram_limit="
        f"{cpu_limit / GIB:.2f} GiB: pass offload_to_disk_path=... (disk offload), raise cpu_ram_limit, or use a "
        "larger vram_limit so more stays resident"
    )


def _notes(plan: VramPlan, shape: GenerationShape) -> list[str]:
    notes = []
    for c in plan.components.values():
        if c.fp8:
            notes.append(
                f"{c.name}: weights stored in float8_e4m3fn (computed in "
                f"{str(c.compute_dtype).replace('torch.', '')}); "
                "outputs change slightly -- allow_fp8=False keeps them exact"
            )
        if c.quantized_gib > 0:
            notes.append(f"{c.name}: {c.quantized_gib:.2f} GiB of weights already quantized (GGUF / fp8), planned "
                         "as stored; no fp8 casting offered")
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
