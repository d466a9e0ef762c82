"""Sliding-window DiT forwards (DiffSynth-Studio's ``sliding_window_size`` / ``sliding_window_stride``), on CPU.

The window enumeration against the golden manifests and hand-derived lists; the hook against an explicit per-window
loop (windows of the enumeration, DiffSynth's blend masks) on tiny models of every family that supports windows; the
pipelines' ``sliding_window_size`` / ``sliding_window_stride`` against the hook applied by hand; the families that
cannot be windowed refuse with their reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from diffusers_wan_ext.hooks.sliding_window import (
    SlidingWindowSchedule,
    WindowSchedule,
    apply_sliding_window,
    blend_weights,
    check_sliding_window,
    remove_sliding_window,
    skipped_window_starts,
    sliding_windows,
)

GOLDENS = Path(__file__).parent / "goldens"
TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ enumeration
@pytest.mark.parametrize("case", ["dit_sliding_window", "dit_sliding_window_i2v"])
def test_enumeration_matches_golden_manifest(case):
    spec = json.loads((GOLDENS / case / "manifest.json").read_text())["sliding_window"]
    t, size, stride = spec["latent_frames"], spec["size"], spec["stride"]
    assert [list(w) for w in sliding_windows(t, size, stride)] == spec["windows"]
    assert skipped_window_starts(t, size, stride) == spec["skipped_window_starts"]
    masks = [blend_weights(t, a, b, spec["border_width"]).tolist() for a, b in spec["windows"]]
    assert masks == spec["masks"]


@pytest.mark.parametrize("frames, size, stride, windows, skipped", [
    (7, 4, 2, [(0, 4), (2, 6), (4, 7)], [6]),
    (8, 4, 2, [(0, 4), (2, 6), (4, 8)], [6]),
    (3, 4, 2, [(0, 3)], [2]),                       # S >= T: one window of every frame
    (4, 4, 1, [(0, 4)], [1, 2, 3]),                 # S == T
    (9, 3, 3, [(0, 3), (3, 6), (6, 9)], []),        # s == S: no overlap, no ramps
    (10, 4, 3, [(0, 4), (3, 7), (6, 10)], [9]),     # T reached exactly
    (11, 4, 3, [(0, 4), (3, 7), (6, 10), (9, 11)], []),  # T not reached by the stride: a short last window
    (21, 8, 4, [(0, 8), (4, 12), (8, 16), (12, 20), (16, 21)], [20]),
    (1, 2, 1, [(0, 1)], []),
])
def test_enumeration_hand_derived(frames, size, stride, windows, skipped):
    assert sliding_windows(frames, size, stride) == windows
    assert skipped_window_starts(frames, size, stride) == skipped


def test_blend_weights():
    assert blend_weights(11, 9, 11, 1).tolist() == [0.5, 1.0]
    assert blend_weights(9, 0, 3, 0).tolist() == [1.0, 1.0, 1.0]
    # both ramps wider than half the window: the falling one is written last (DiffSynth's order)
    assert blend_weights(9, 1, 5, 3).tolist() == pytest.approx([1 / 6, 5 / 6, 0.5, 1 / 6])


@pytest.mark.parametrize("size, stride, message", [
    (4, None, "give both"), (0, 1, "sliding_window_size must be a positive integer"),
    (4, 5, "must not exceed"), (4.0, 2, "positive integer"), (True, 1, "positive integer"),
])
def test_check_sliding_window(size, stride, message):
    with pytest.raises(ValueError, match=message):
        check_sliding_window(size, stride)


def test_schedule_is_a_window_schedule():
    assert isinstance(SlidingWindowSchedule(4, 2), WindowSchedule)
    with pytest.raises(ValueError, match="stride"):
        SlidingWindowSchedule(2, 3)
