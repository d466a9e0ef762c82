"""Temporal sliding windows for Wan transformers (DiffSynth-Studio's ``sliding_window_size`` / ``_stride``).

A long video's latent frames are cut into overlapping windows; each window is an independent transformer forward on
latent frames ``[t, min(t + S, T))`` (so the RoPE frame positions restart at 0 in every window, and attention never
spans more than ``S`` frames), and the window outputs are blended with linear ramps over the overlaps.  This is
DiffSynth-Studio 2.1.12's ``TemporalTiler_BCTHW`` (``model_fn_wan_video(..., sliding_window_size=S,
sliding_window_stride=s)``), re-implemented:

* windows (:func:`sliding_windows`): starts ``t = 0, s, 2s, ...`` below ``T``; a start is skipped when the previous
  window already reached frame ``T`` (``t - s >= 0 and t - s + S >= T``, :func:`skipped_window_starts`);
* weights (:func:`blend_weights`): ones, with a ramp ``(arange(b) + 0.5) / b`` of width ``b = S - s`` on each side
  of the window that is not the video's first / last frame (the right ramp written after the left one);
* blend: ``value[t:t_] += out_window * mask``, ``weight[t:t_] += mask``, ``result = value / weight`` (accumulated in
  float32, returned in the transformer's output dtype).

What is sliced per window: ``hidden_states`` along its frame axis (stock I2V / Fun already concatenate ``y`` into
its channels), per-token timesteps ``[B, seq_len]`` (Wan2.2 TI2V: the tokens of the window's frames), and the inputs
a model class declares.  A class declares, as class attributes:

* ``_sliding_window_inputs: dict[str, int]`` -- further forward arguments that carry latent frames, with their frame
  axis (e.g. Fun's ``control_camera_latents``); everything else (text, CLIP features, reference images, scalars) is
  passed unchanged to every window;
* ``_sliding_window_unsupported_reason: str`` -- why the model cannot be windowed (:func:`apply_sliding_window`
  raises it).

Stock classes get their declaration from :func:`register_sliding_window_inputs` (called by the family modules, e.g.
VACE's ``control_hidden_states``).  A class without any declaration is windowed only if its ``forward`` takes no
arguments beyond stock ``WanTransformer3DModel.forward``'s.

Which windows run, and their weights, come from a :class:`WindowSchedule` (default :class:`SlidingWindowSchedule`);
another schedule (context windows for very long videos) plugs into the same hook.  When the model runs inside
``cache_context(name, ...)`` (our pipelines, stock Wan pipelines), each window runs under its own cache context
``f"{name}/window{k}"`` (outside one: ``f"window{k}"``), so step-caching hooks keep one state per window and per CFG
branch; a window that covers other frames than at the previous step (schedules that move) starts a fresh state
(:func:`drop_cache_state`).

Example:
    >>> from diffusers_wan_ext.hooks.sliding_window import apply_sliding_window, remove_sliding_window
    >>> apply_sliding_window(pipe.transformer, 4, 2)  # also stock WanPipeline  # doctest: +SKIP
    >>> video = pipe(prompt="...", num_frames=161).frames[0]  # doctest: +SKIP
    >>> remove_sliding_window(pipe.transformer)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import nn

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.hooks.hooks import _set_cache_context as set_cache_context

__all__ = [
    "SLIDING_WINDOW_HOOK",
    "SlidingWindowHook",
    "SlidingWindowSchedule",
    "Window",
    "WindowSchedule",
    "apply_sliding_window",
    "blend_weights",
    "check_sliding_window",
    "current_schedule",
    "drop_cache_state",
    "register_sliding_window_inputs",
    "remove_sliding_window",
    "skipped_window_starts",
    "sliding_window_inputs",
    "sliding_window_unsupported_reason",
    "sliding_windows",
    "window_frames",
    "windowed",
]

SLIDING_WINDOW_HOOK = "wan_sliding_window"

#: A window: ``(start, end)`` latent frames ``[start, end)`` (``end > T`` wraps around modulo ``T``), a ``range`` (may
#: be strided), or a list of frame indices.
Window = Union[tuple[int, int], range, Sequence[int]]

#: ``forward`` arguments of stock ``WanTransformer3DModel``: a class taking no others needs no declaration.
STOCK_FORWARD_ARGUMENTS = frozenset(
    {"self", "hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image", "return_dict",
     "attention_kwargs"}
)


# ------------------------------------------------------------------------------------------ enumeration
def check_sliding_window(size: Any, stride: Any, *, names: tuple[str, str] = ("sliding_window_size",
                                                                               "sliding_window_stride")) -> None:
    """Validate a window size / stride pair (latent frames); ``None, None`` (off) passes.

    Raises:
        ValueError: one line naming the argument: only one of the two given, not a positive integer, or a stride
            larger than the size (frames between windows would get no weight).
    """
    if size is None and stride is None:
        return
    if size is None or stride is None:
        raise ValueError(f"give both {names[0]} and {names[1]} (latent frames), or neither")
    for name, value in zip(names, (size, stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer (latent frames), got {value!r}")
    if stride > size:
        raise ValueError(
            f"{names[1]} ({stride}) must not exceed {names[0]} ({size}): frames between two windows would be skipped"
        )


def sliding_windows(num_frames: int, size: int, stride: int) -> list[tuple[int, int]]:
    """DiffSynth's windows ``[(t, min(t + size, T)), ...]`` over ``T = num_frames`` latent frames.

    Example:
        >>> sliding_windows(7, 4, 2)
        [(0, 4), (2, 6), (4, 7)]
    """
    check_sliding_window(size, stride, names=("size", "stride"))
    return [(t, min(t + size, num_frames)) for t in range(0, num_frames, stride)
            if not (t - stride >= 0 and t - stride + size >= num_frames)]


def skipped_window_starts(num_frames: int, size: int, stride: int) -> list[int]:
    """The starts ``t`` (multiples of ``stride`` below ``T``) that :func:`sliding_windows` skips because the previous
    window already reached frame ``T``.

    Example:
        >>> skipped_window_starts(7, 4, 2)
        [6]
    """
    check_sliding_window(size, stride, names=("size", "stride"))
    return [t for t in range(0, num_frames, stride) if t - stride >= 0 and t - stride + size >= num_frames]


def blend_weights(num_frames: int, start: int, end: int, border_width: int) -> torch.Tensor:
    """DiffSynth's float32 blend mask of the window ``[start, end)``: ones, with a ramp ``(arange(b) + 0.5) / b``
    rising over the first ``b`` frames unless ``start == 0``, and falling over the last ``b`` unless
    ``end == num_frames`` (written after the rising one, so it wins where they overlap).

    Example:
        >>> blend_weights(7, 2, 6, 2).tolist()
        [0.25, 0.75, 0.75, 0.25]
    """
    length = end - start
    mask = torch.ones(length)
    if border_width <= 0:
        return mask
    ramp = (torch.arange(border_width) + 0.5) / border_width
    n = min(border_width, length)  # a window shorter than the ramp (not produced by sliding_windows) gets its part
    if start != 0:
        mask[:n] = ramp[:n]
    if end != num_frames:
        mask[length - n:] = torch.flip(ramp, dims=(0,))[border_width - n:]
    return mask


def window_frames(window: Window, num_frames: int) -> range | list[int]:
    """The latent frame indices of ``window``: a ``range`` inside ``[0, T)`` when it is contiguous, else a list
    (indices taken modulo ``T``)."""
    if isinstance(window, tuple) and len(window) == 2:
        window = range(int(window[0]), int(window[1]))
    if isinstance(window, range) and window.step == 1 and 0 <= window.start < window.stop <= num_frames:
        return window
    frames = [int(i) % num_frames for i in window]
    if not frames:
        raise ValueError(f"empty window {window!r}")
    return frames


@runtime_checkable
class WindowSchedule(Protocol):
    """What the sliding-window hook asks of a schedule: the windows of a forward over ``num_frames`` latent frames
    at denoising step ``step_index`` (``None`` outside a pipeline's ``cache_context``), and each window's blend
    weights (a 1-D tensor, one weight per frame of the window, in the window's frame order).  Every frame must get
    a positive total weight."""

    def windows(self, num_frames: int, step_index: int | None) -> list[Window]:
        ...

    def weights(self, num_frames: int, window: Window, step_index: int | None) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class SlidingWindowSchedule:
    """DiffSynth-Studio's sliding windows (:func:`sliding_windows`, :func:`blend_weights`): the same windows at every
    step.

    Args:
        size: window length ``S`` in latent frames.
        stride: distance ``s`` between window starts (``1 <= s <= S``); the ramps are ``S - s`` frames wide.
    """

    size: int
    stride: int

    def __post_init__(self):
        check_sliding_window(self.size, self.stride, names=("size", "stride"))

    def windows(self, num_frames: int, step_index: int | None = None) -> list[Window]:
        return list(sliding_windows(num_frames, self.size, self.stride))

    def weights(self, num_frames: int, window: Window, step_index: int | None = None) -> torch.Tensor:
        start, end = window
        return blend_weights(num_frames, start, end, self.size - self.stride)


# ------------------------------------------------------------------------------------------ declarations
#: stock class (the class object) -> its frame-carrying forward arguments and their frame axes
_REGISTERED: dict[type, dict[str, int]] = {}


def register_sliding_window_inputs(cls: type, inputs: Mapping[str, int]) -> None:
    """Declare the frame-carrying ``forward`` arguments (name -> frame axis) of a stock class we do not own, e.g.
    ``register_sliding_window_inputs(WanVACETransformer3DModel, {"control_hidden_states": 2})``.  Our own classes
    set ``_sliding_window_inputs`` / ``_sliding_window_unsupported_reason`` instead."""
    if not isinstance(cls, type):
        raise TypeError(f"register_sliding_window_inputs takes a class, got {type(cls).__name__}")
    _REGISTERED[cls] = {str(k): int(v) for k, v in inputs.items()}


def sliding_window_unsupported_reason(model: nn.Module | type) -> str | None:
    """Why ``model``'s class (or the class ``model``) cannot be windowed (its ``_sliding_window_unsupported_reason``),
    or ``None``."""
    for cls in (model if isinstance(model, type) else type(model)).__mro__:
        if cls in _REGISTERED or cls.__dict__.get("_sliding_window_inputs") is not None:
            return None
        reason = cls.__dict__.get("_sliding_window_unsupported_reason")
        if reason:
            return str(reason)
    return None


def sliding_window_inputs(model: nn.Module) -> dict[str, int]:
    """The frame-carrying inputs of ``model`` besides ``hidden_states`` and per-token timesteps (name -> frame axis).

    The first class along the MRO that declares something decides (a subclass inherits its parent's declaration),
    unless a subclass below it overrides ``forward`` with new arguments: then, as for a class without any
    declaration, only stock ``WanTransformer3DModel.forward``'s arguments are accepted.

    Raises:
        ValueError: the class declares why it cannot be windowed, or its ``forward`` takes undeclared arguments
            that might carry frames.
    """
    name = type(model).__name__
    mro = type(model).__mro__
    forward_owner = next((i for i, cls in enumerate(mro) if "forward" in cls.__dict__), len(mro))
    for i, cls in enumerate(mro):
        declared = _REGISTERED.get(cls, cls.__dict__.get("_sliding_window_inputs"))
        reason = cls.__dict__.get("_sliding_window_unsupported_reason")
        if declared is None and reason:
            raise ValueError(f"sliding windows are not supported for {name}: {reason}")
        if declared is not None and i <= forward_owner:
            return dict(declared)
        if declared is not None:
            break
    parameters = inspect.signature(type(model).forward).parameters
    extra = [p for p, v in parameters.items() if p not in STOCK_FORWARD_ARGUMENTS
             and v.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if extra:
        raise ValueError(
            f"sliding windows: {name}.forward takes {', '.join(extra)}, which may carry latent frames; declare "
            "_sliding_window_inputs (argument -> frame axis) or _sliding_window_unsupported_reason on the class, or "
            "call register_sliding_window_inputs"
        )
    return {}


# ------------------------------------------------------------------------------------------------ hook
class _WindowState(BaseState):
    def reset(self, *args, **kwargs):
        pass


def _take(tensor: torch.Tensor, axis: int, frames: range | list[int]) -> torch.Tensor:
    if isinstance(frames, range):
        return tensor.narrow(axis, frames.start, len(frames))
    return tensor.index_select(axis, torch.tensor(frames, device=tensor.device))


def _take_tokens(timestep: torch.Tensor, num_frames: int, frames: range | list[int]) -> torch.Tensor:
    """Per-token timesteps ``[B, T * n]`` (frame-major tokens) -> those of ``frames``."""
    if timestep.shape[1] % num_frames:
        raise ValueError(
            f"sliding windows: per-token timestep has {timestep.shape[1]} tokens, not a multiple of the "
            f"{num_frames} latent frames"
        )
    per_frame = timestep.unflatten(1, (num_frames, -1))
    return _take(per_frame, 1, frames).flatten(1, 2)


def _sample_of(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    if torch.is_tensor(output):
        return sample
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return type(output)(**{**output, "sample": sample})


class SlidingWindowHook(ModelHook):
    """Runs the transformer's ``forward`` once per window of a :class:`WindowSchedule` and blends the outputs."""

    _is_stateful = True  # receives the pipeline's cache context (the step index) like the cache hooks

    def __init__(self, schedule: WindowSchedule, inputs: Mapping[str, int], parameters: Sequence[str]):
        super().__init__()
        self.schedule = schedule
        self.inputs = {"hidden_states": 2, **dict(inputs)}
        self.parameters = list(parameters)  # positional order of forward's arguments
        self.state_manager = StateManager(_WindowState)
        self.frames_of_context: dict[str, tuple[int, ...]] = {}  # window cache context -> its frames last time

    def _context(self):
        try:
            return self.state_manager.context
        except ValueError:
            return None

    def new_forward(self, module: nn.Module, *args, **kwargs):
        kwargs = {**dict(zip(self.parameters, args)), **kwargs}
        hidden_states = kwargs["hidden_states"]
        num_frames = hidden_states.shape[self.inputs["hidden_states"]]
        context = self._context()
        step = context.step_index if context is not None else None
        windows = list(self.schedule.windows(num_frames, step))
        frames_of = [window_frames(w, num_frames) for w in windows]
        if len(frames_of) == 1 and frames_of[0] == range(num_frames):
            return self.fn_ref.original_forward(**kwargs)  # one window of all frames: weight 1 everywhere
        for name, axis in self.inputs.items():
            value = kwargs.get(name)
            if torch.is_tensor(value) and value.shape[axis] != num_frames:
                raise ValueError(
                    f"sliding windows: {name} has {value.shape[axis]} frames on axis {axis}, hidden_states has "
                    f"{num_frames}"
                )
        value = weight = output = None
        for k, (window, frames) in enumerate(zip(windows, frames_of)):
            window_kwargs = self._window_inputs(kwargs, num_frames, frames)
            with self._window_context(module, context, k, frames):
                output = self.fn_ref.original_forward(**window_kwargs)
            sample = _sample_of(output)
            if sample.shape[2] != len(frames):
                raise ValueError(f"sliding windows: the output has {sample.shape[2]} frames for a {len(frames)}-frame "
                                 "window")
            mask = torch.as_tensor(self.schedule.weights(num_frames, window, step)).to(sample.device, torch.float32)
            if value is None:
                value = sample.new_zeros((*sample.shape[:2], num_frames, *sample.shape[3:]), dtype=torch.float32)
                weight = torch.zeros(num_frames, device=sample.device, dtype=torch.float32)
            contribution = sample.float() * mask.view(1, 1, -1, *([1] * (sample.ndim - 3)))
            if isinstance(frames, range):
                value[:, :, frames.start:frames.stop] += contribution
                weight[frames.start:frames.stop] += mask
            else:
                index = torch.tensor(frames, device=sample.device)
                value.index_add_(2, index, contribution)
                weight.index_add_(0, index, mask)
        if context is not None:
            set_cache_context(module, context)
        if not bool((weight > 0).all()):
            missing = torch.nonzero(weight <= 0).flatten().tolist()
            raise ValueError(f"sliding windows: latent frame(s) {missing} are in no window (or have zero weight)")
        blended = value / weight.view(1, 1, -1, *([1] * (value.ndim - 3)))
        return _with_sample(output, blended.to(_sample_of(output).dtype))

    def _window_inputs(self, kwargs: dict[str, Any], num_frames: int, frames) -> dict[str, Any]:
        window_kwargs = dict(kwargs)
        for name, axis in self.inputs.items():
            if torch.is_tensor(kwargs.get(name)):
                window_kwargs[name] = _take(kwargs[name], axis, frames)
        timestep = kwargs.get("timestep")
        if torch.is_tensor(timestep) and timestep.ndim == 2:  # Wan2.2 TI2V: [B, seq_len] per-token timesteps
            window_kwargs["timestep"] = _take_tokens(timestep, num_frames, frames)
        return window_kwargs

    def _window_context(self, module: nn.Module, context, k: int, frames: range | list[int]):
        """Window ``k`` under its own cache context (step caches keep one state per window and CFG branch); when
        window ``k`` covers other frames than last time (schedules that move with the step), its state starts over."""
        if not hasattr(module, "cache_context"):
            return contextlib.nullcontext()
        # (a call outside cache_context still gets one state per window: MagCache's fallback state is shared)
        name = f"window{k}" if context is None else f"{context.name}/window{k}"
        if self.frames_of_context.get(name, tuple(frames)) != tuple(frames):
            drop_cache_state(module, name)
        self.frames_of_context[name] = tuple(frames)
        if context is None:
            return module.cache_context(name)
        fields = {f.name: getattr(context, f.name) for f in dataclasses.fields(context) if f.name != "name"}
        return module.cache_context(name, **fields)

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.state_manager.reset()
        self.frames_of_context.clear()
        return module


def drop_cache_state(module: nn.Module, name: str) -> None:
    """Forget the state every stateful hook under ``module`` keeps for cache context ``name`` (a fresh one is made
    on its next use)."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    for child in (registry, *registry._get_child_registries()):
        for hook in child.hooks.values():
            for attr in vars(hook).values() if hook._is_stateful else ():
                if isinstance(attr, StateManager) and name in attr._state_cache:
                    attr._state_cache.pop(name).reset()


def _forward_parameters(model: nn.Module) -> list[str]:
    parameters = inspect.signature(type(model).forward).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in kinds][1:]  # without self


def apply_sliding_window(
    transformer: nn.Module, size: int | None = None, stride: int | None = None, schedule: WindowSchedule | None = None
) -> None:
    """Run ``transformer``'s forward per temporal window and blend (DiffSynth's sliding windows by default).

    Args:
        transformer: a Wan transformer (stock ``WanTransformer3DModel`` / ``WanVACETransformer3DModel`` or ours).
        size, stride: window length and stride in latent frames (:class:`SlidingWindowSchedule`).
        schedule: any :class:`WindowSchedule` instead of ``size`` / ``stride``.

    Raises:
        ValueError: bad size / stride, or the model's class cannot be windowed (its declared reason).
    """
    if schedule is None:
        check_sliding_window(size, stride, names=("size", "stride"))
        if size is None:
            raise ValueError("apply_sliding_window needs size and stride (latent frames) or a schedule")
        schedule = SlidingWindowSchedule(size, stride)
    elif size is not None or stride is not None:
        raise ValueError("pass either size / stride or schedule to apply_sliding_window, not both")
    if not isinstance(schedule, WindowSchedule):
        raise TypeError(f"schedule must implement windows() and weights(), got {type(schedule).__name__}")
    inputs = sliding_window_inputs(transformer)
    remove_sliding_window(transformer)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(SlidingWindowHook(schedule, inputs, _forward_parameters(transformer)), SLIDING_WINDOW_HOOK)


def remove_sliding_window(transformer: nn.Module) -> None:
    """Remove the hook of :func:`apply_sliding_window` (no-op without one)."""
    if not hasattr(transformer, "_diffusers_hook"):
        return
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(SLIDING_WINDOW_HOOK) is not None:
        registry.remove_hook(SLIDING_WINDOW_HOOK, recurse=False)


def current_schedule(transformer: nn.Module) -> WindowSchedule | None:
    """The schedule of ``transformer``'s sliding-window hook, or ``None``."""
    if not hasattr(transformer, "_diffusers_hook"):
        return None
    hook = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(SLIDING_WINDOW_HOOK)
    return None if hook is None else hook.schedule


@contextlib.contextmanager
def windowed(
    transformers: Iterable[nn.Module | None],
    size: int | None = None,
    stride: int | None = None,
    schedule: WindowSchedule | None = None,
) -> Iterator[None]:
    """Sliding windows on every given transformer (``None`` entries skipped) for the ``with`` body, removed after
    (also on errors); a hook applied before is put back.  Nothing happens when neither ``size`` / ``stride`` nor
    ``schedule`` is given."""
    models = [m for m in transformers if m is not None]
    if schedule is None and size is None and stride is None:
        yield
        return
    previous = [current_schedule(m) for m in models]
    try:
        for model in models:
            apply_sliding_window(model, size, stride, schedule)
        yield
    finally:
        for model, before in zip(models, previous):
            remove_sliding_window(model)
            if before is not None:
                apply_sliding_window(model, schedule=before)
