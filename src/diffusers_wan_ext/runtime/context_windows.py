"""Context-window schedules for videos several times longer than the model was trained on.

A Wan DiT is trained on clips of about 81 frames (21 latent frames).  To denoise a longer latent video, every step
runs the transformer on *context windows* -- sets of ``context_frames`` latent frames -- and blends the per-window
predictions with per-frame weights, normalized by the summed weights.  The schedules here follow the context options
of ComfyUI-WanVideoWrapper (themselves from AnimateDiff-Evolved), re-implemented:

* :class:`UniformStandardSchedule` (``uniform_standard``): windows every ``context_frames - context_overlap`` frames,
  shifted by a per-step offset (the bit-reversed step index) so that window seams move from step to step; windows
  that would run past the end are moved back inside the video (a window starting at the wrapped frame is added when
  needed), duplicates dropped.  ``context_stride > 1`` adds coarser levels whose windows take every 2nd, 4th, ...
  frame.
* :class:`UniformLoopedSchedule` (``uniform_looped``): the same windows without moving them back: windows wrap around
  the end, so the last frames are denoised together with the first ones and the video loops seamlessly.
* :class:`StaticStandardSchedule` (``static_standard``): the same windows at every step, ``context_frames -
  context_overlap`` apart, the last one ending on the last frame.

Every length is in **latent** frames (``(frames - 1) // 4 + 1`` for the Wan VAE): 81 video frames are 21 latent
frames, the wrapper's defaults (81 / 4 / 16 video frames) are ``context_frames=21, context_stride=1,
context_overlap=4``.

Each schedule implements the ``WindowSchedule`` protocol of :mod:`diffusers_wan_ext.hooks.sliding_window`
(:meth:`ContextSchedule.windows`, :meth:`ContextSchedule.weights`), so the sliding-window hook runs it::

    from diffusers_wan_ext.hooks.sliding_window import apply_sliding_window
    from diffusers_wan_ext.runtime.context_windows import UniformStandardSchedule, freenoise_latents

    schedule = UniformStandardSchedule(context_frames=21, context_overlap=6)
    apply_sliding_window(pipe.transformer, schedule=schedule)   # and pipe.transformer_2 for two experts
    latents = freenoise_latents((1, 16, 61, 60, 104), 21, 6, generator=torch.Generator().manual_seed(0))
    video = pipe(prompt, num_frames=241, latents=latents).frames[0]

The uniform schedules move their windows with the denoising step: the hook reads the step from the pipeline's
``cache_context(..., step_index=i)`` (our pipelines pass it; stock Diffusers pipelines do not, and there every step
gets the windows of step 0).

Blend weights (``fuse_method``):

* ``"linear"`` (default): 1 inside the window, linear ramps over the ``context_overlap`` frames of every side that
  another window covers too.  The ramp is ``(k + 1) / (context_overlap + 1)``, so two windows overlapping by
  ``context_overlap`` frames cross-fade with weights summing to 1; the wrapper's ``linspace(0, 1, overlap)`` gives the
  outermost frame weight 0 (a 0 / 0 where two such frames meet, e.g. overlap 1), ours is never 0.
* ``"pyramid"``: triangular weights peaking at the window's middle (as the wrapper's), raised to a ramp on the
  sides that touch the start / end of a non-looping video.
* ``"flat"``: every frame weight 1 (plain averaging).

FreeNoise (:func:`freenoise_latents`, :func:`apply_freenoise`): the initial noise of the frames past the first window
repeats the first window's noise, shuffled within chunks of ``context_frames - context_overlap`` frames (the wrapper's
``freenoise`` option), so windows start from correlated noise and the content stays consistent over the video.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..hooks.sliding_window import Window, window_frames

__all__ = [
    "CONTEXT_SCHEDULES",
    "FUSE_METHODS",
    "ContextSchedule",
    "StaticStandardSchedule",
    "UniformLoopedSchedule",
    "UniformStandardSchedule",
    "apply_freenoise",
    "context_schedule",
    "freenoise_latents",
    "latent_frames",
    "ordered_halving",
]

#: Blend weights a schedule can use (see the module docstring).
FUSE_METHODS = ("linear", "pyramid", "flat")


def latent_frames(video_frames: int, temporal_factor: int = 4) -> int:
    """Latent frames of ``video_frames`` video frames (``4n + 1`` for the Wan VAE): 81 -> 21."""
    if video_frames < 1:
        raise ValueError(f"video_frames must be positive, got {video_frames}")
    return (video_frames - 1) // temporal_factor + 1


def ordered_halving(step: int) -> float:
    """``step``'s 64 bits reversed, as a fraction of ``2**64``: 0, 0.5, 0.25, 0.75, 0.125, ... for 0, 1, 2, 3, 4."""
    return int(f"{step:064b}"[::-1], 2) / (1 << 64)


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive number of latent frames, got {value!r}")


class ContextSchedule:
    """Base class of the context-window schedules (see the module docstring).

    Args:
        context_frames: latent frames per window (21 for the 81 frames Wan was trained on).
        context_overlap: latent frames two neighbouring windows share (``0 <= context_overlap < context_frames``;
            4 to 8 is usual).
        fuse_method: blend weights, one of :data:`FUSE_METHODS`.
    """

    #: whether windows wrap around the end of the video (the last frames blend into the first ones)
    looped: bool = False

    def __init__(self, context_frames: int, context_overlap: int = 4, fuse_method: str = "linear") -> None:
        _positive("context_frames", context_frames)
        if not isinstance(context_overlap, int) or isinstance(context_overlap, bool) or context_overlap < 0:
            raise ValueError(f"context_overlap must be a number of latent frames >= 0, got {context_overlap!r}")
        if context_overlap >= context_frames:
            raise ValueError(f"context_overlap ({context_overlap}) must be smaller than context_frames "
                             f"({context_frames}): windows would not advance")
        if fuse_method not in FUSE_METHODS:
            raise ValueError(f"fuse_method must be one of {', '.join(FUSE_METHODS)}, got {fuse_method!r}")
        self.context_frames = context_frames
        self.context_overlap = context_overlap
        self.fuse_method = fuse_method

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    # ------------------------------------------------------------------------------------------------ windows
    def frame_windows(self, num_frames: int, step_index: int | None = None) -> list[list[int]]:
        """The windows of denoising step ``step_index`` (``None``: 0) as lists of latent frame indices."""
        _positive("num_frames", num_frames)
        if num_frames <= self.context_frames:
            return [list(range(num_frames))]
        return self._frame_windows(num_frames, step_index or 0)

    def _frame_windows(self, num_frames: int, step: int) -> list[list[int]]:
        raise NotImplementedError

    def windows(self, num_frames: int, step_index: int | None = None) -> list[Window]:
        """``WindowSchedule`` protocol: :meth:`frame_windows`, a run of consecutive frames inside the video as a
        ``range`` (the hook slices it without a copy), a window that wraps around the end or is strided as its frame
        list."""
        out: list[Window] = []
        for frames in self.frame_windows(num_frames, step_index):
            run = range(frames[0], frames[0] + len(frames))
            out.append(run if list(run) == frames else frames)
        return out

    # ------------------------------------------------------------------------------------------------ weights
    def weights(self, num_frames: int, window: Window, step_index: int | None = None) -> torch.Tensor:
        """Blend weights (float32, one per frame of ``window``, all > 0) of a window of a ``num_frames`` video.

        ``window``: a frame list (:meth:`frame_windows`), a ``range`` or a ``(start, end)`` tuple (the hook's
        :data:`~diffusers_wan_ext.hooks.sliding_window.Window`).  ``step_index`` is not used (same weights at every
        step).
        """
        frames = list(window_frames(window, num_frames))
        n = len(frames)
        whole = n >= num_frames  # the only window: no neighbour on either side
        left = not whole and (self.looped or frames[0] > 0)
        right = not whole and (self.looped or frames[-1] < num_frames - 1)
        if self.fuse_method == "flat":
            return torch.ones(n)
        if self.fuse_method == "pyramid":
            return _pyramid(n, self.context_overlap, lift_left=not left, lift_right=not right)
        return _linear(n, self.context_overlap, ramp_left=left, ramp_right=right)


def _linear(n: int, overlap: int, ramp_left: bool, ramp_right: bool) -> torch.Tensor:
    w = torch.ones(n)
    width = min(overlap, n)
    ramp = torch.arange(1, width + 1, dtype=torch.float32) / (overlap + 1)
    if ramp_left and width:
        w[:width] = torch.minimum(w[:width], ramp)
    if ramp_right and width:
        w[n - width:] = torch.minimum(w[n - width:], ramp.flip(0))
    return w


def _pyramid(n: int, overlap: int, lift_left: bool, lift_right: bool) -> torch.Tensor:
    half = (n + 1) // 2
    w = torch.tensor([min(i + 1, n - i) for i in range(n)], dtype=torch.float32) / half
    width = min(overlap, n)
    if width:
        ramp = torch.linspace(0, 1, width)
        if lift_left:  # nothing before the window: its first frames need not fade out
            w[:width] = torch.maximum(w[:width], ramp)
        if lift_right:
            w[n - width:] = torch.maximum(w[n - width:], ramp.flip(0))
    return w


class StaticStandardSchedule(ContextSchedule):
    """``static_standard``: the same windows at every step, ``context_frames - context_overlap`` frames apart; the
    last window is moved back to end on the last frame.  Arguments: :class:`ContextSchedule`."""

    def _frame_windows(self, num_frames: int, step: int) -> list[list[int]]:
        f, delta = self.context_frames, self.context_frames - self.context_overlap
        out = []
        for start in range(0, num_frames, delta):
            if start + f >= num_frames:
                out.append(list(range(num_frames - f, num_frames)))
                break
            out.append(list(range(start, start + f)))
        return out


class UniformLoopedSchedule(ContextSchedule):
    """``uniform_looped``: windows ``context_frames - context_overlap`` apart from a per-step offset, wrapping around
    the end of the video (the video loops: its last frames are denoised with its first ones).

    Args:
        context_frames, context_overlap, fuse_method: see :class:`ContextSchedule`.
        context_stride: levels of strided windows: level ``k`` (``k < context_stride``) takes every ``2**k``-th frame;
            levels whose window would span more than the video are left out.  1 (default): contiguous windows only.
        closed_loop: windows also cover the seam between the last and first frame (``False``: the last window
            stops ``context_overlap`` frames earlier).
    """

    looped = True

    def __init__(self, context_frames: int, context_overlap: int = 4, context_stride: int = 1,
                 closed_loop: bool = True, fuse_method: str = "linear") -> None:
        super().__init__(context_frames, context_overlap, fuse_method)
        _positive("context_stride", context_stride)
        self.context_stride = context_stride
        self.closed_loop = closed_loop

    def _frame_windows(self, num_frames: int, step: int) -> list[list[int]]:
        f, overlap = self.context_frames, self.context_overlap
        levels = min(self.context_stride, math.ceil(math.log2(num_frames / f)) + 1)
        offset = ordered_halving(step)
        pad = int(round(num_frames * offset))
        out = []
        for level in range(levels):
            jump = 1 << level
            if f * jump > num_frames:  # the window would wrap onto itself
                break
            first = int(offset * jump) + pad
            stop = num_frames + pad - (0 if self.closed_loop else overlap)
            for j in range(first, stop, f * jump - overlap):
                out.append([e % num_frames for e in range(j, j + f * jump, jump)])
        return out


class UniformStandardSchedule(UniformLoopedSchedule):
    """``uniform_standard``: the windows of :class:`UniformLoopedSchedule`, but a window that would wrap around the
    end is moved back to end on the last frame (and a window starting at its first wrapped frame is added where the
    next window does not cover it); duplicates are dropped.  The video does not loop.  Arguments:
    :class:`UniformLoopedSchedule` (``closed_loop=True`` as the wrapper passes it: the offset windows reach around
    to the start, and are then moved back).
    """

    looped = False

    def _frame_windows(self, num_frames: int, step: int) -> list[list[int]]:
        windows = super()._frame_windows(num_frames, step)
        i = 0
        while i < len(windows):
            window = windows[i]
            wrap = next((k for k in range(1, len(window)) if window[k] < window[k - 1]), None)
            if wrap is not None:
                wrapped_frame = window[wrap]
                span = (window[-1] - window[0]) % num_frames  # moved back so that the last frame is the video's
                windows[i] = [(f - window[0]) % num_frames + num_frames - 1 - span for f in window]
                if wrapped_frame not in windows[(i + 1) % len(windows)]:
                    windows.insert(i + 1, list(range(wrapped_frame, wrapped_frame + self.context_frames)))
            i += 1
        unique = []
        for window in windows:
            if window not in unique:
                unique.append(window)
        return unique


#: ComfyUI-WanVideoWrapper's ``context_schedule`` names -> schedule classes.
CONTEXT_SCHEDULES: dict[str, type[ContextSchedule]] = {
    "uniform_standard": UniformStandardSchedule,
    "uniform_looped": UniformLoopedSchedule,
    "static_standard": StaticStandardSchedule,
}


def context_schedule(name: str, context_frames: int, context_overlap: int = 4, context_stride: int = 1,
                     closed_loop: bool = True, fuse_method: str = "linear") -> ContextSchedule:
    """A schedule by its ComfyUI-WanVideoWrapper name (``uniform_standard``, ``uniform_looped``,
    ``static_standard``), all lengths in latent frames.  ``context_stride`` / ``closed_loop`` apply to the uniform
    schedules (a static schedule refuses ``context_stride > 1``)."""
    if name not in CONTEXT_SCHEDULES:
        raise ValueError(f"unknown context schedule {name!r}: one of {', '.join(CONTEXT_SCHEDULES)}")
    cls = CONTEXT_SCHEDULES[name]
    if cls is StaticStandardSchedule:
        if context_stride != 1:
            raise ValueError(f"context_stride={context_stride}: static_standard has contiguous windows only")
        return cls(context_frames, context_overlap, fuse_method=fuse_method)
    return cls(context_frames, context_overlap, context_stride, closed_loop=closed_loop, fuse_method=fuse_method)


# ------------------------------------------------------------------------------------------------------ FreeNoise
def apply_freenoise(
    noise: torch.Tensor,
    context_frames: int,
    context_overlap: int,
    generator: torch.Generator | None = None,
    frame_dim: int = 2,
) -> torch.Tensor:
    """FreeNoise: a copy of ``noise`` whose frames past the first window repeat earlier noise.

    With ``delta = context_frames - context_overlap``: for ``start = 0, delta, 2 delta, ...`` (while ``start +
    context_frames < T``), the up to ``delta`` frames from ``start + context_frames`` on become the frames from
    ``start`` on, shuffled (``torch.randperm`` with ``generator``).  Every frame is thus a copy of one of the first
    ``context_frames`` frames, and each window starts from a reordering of the first window's noise.
    """
    _positive("context_frames", context_frames)
    if context_overlap < 0 or context_overlap >= context_frames:
        raise ValueError(f"context_overlap ({context_overlap}) must be >= 0 and smaller than context_frames "
                         f"({context_frames})")
    noise = noise.clone()
    num_frames = noise.shape[frame_dim]
    delta = context_frames - context_overlap
    device = generator.device if generator is not None else torch.device("cpu")
    for start in range(0, num_frames - context_frames, delta):
        place = start + context_frames
        n = min(delta, num_frames - place)
        source = start + torch.randperm(n, generator=generator, device=device).to(noise.device)
        dest = noise.narrow(frame_dim, place, n)
        dest.copy_(noise.index_select(frame_dim, source))
    return noise


def freenoise_latents(
    shape: Sequence[int],
    context_frames: int,
    context_overlap: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    frame_dim: int = 2,
) -> torch.Tensor:
    """Initial latents of ``shape`` (``[B, C, T, H, W]`` by default) drawn like Diffusers' ``randn_tensor`` with
    ``generator``, then :func:`apply_freenoise` (permutations from the same generator; the first one of a list).

    Pass the result as ``latents=`` to a pipeline that runs context windows of ``context_frames`` latent frames
    overlapping by ``context_overlap``.
    """
    if len(shape) <= frame_dim or shape[frame_dim] < 1:
        raise ValueError(f"shape {tuple(shape)} has no frames along dimension {frame_dim}")
    noise = randn_tensor(tuple(shape), generator=generator, device=torch.device(device or "cpu"), dtype=dtype)
    first = generator[0] if isinstance(generator, list) else generator
    return apply_freenoise(noise, context_frames, context_overlap, first, frame_dim)
