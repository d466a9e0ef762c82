"""The tile layout and blend masks of DiffSynth-Studio's tiled Wan VAE encode / decode, as plain data.

DiffSynth-Studio 2.1.12 (``WanVideoVAE.tiled_encode`` / ``tiled_decode`` in ``diffsynth/models/wan_video_vae.py``;
the Wan2.2 class ``WanVideoVAE38`` inherits both, so the two VAEs share one tiler) enumerates tiles the same way in
both directions, on the *input* grid (pixels for encode, latents for decode):

* tile size and stride are given in latent units; encode multiplies both by the spatial factor ``f`` (8 for Wan2.1,
  16 for Wan2.2), decode uses them as they are;
* along each axis a tile starts at every multiple of the stride below the length, except that a start is skipped
  when the tile of the previous start already reaches the end (``start - stride >= 0`` and
  ``start - stride + size >= length``); tiles are visited row-major (height outer, width inner);
* a tile is listed as ``(start, start + size)`` even when ``start + size`` passes the border; the slice actually run
  is ``[start, min(start + size, length))`` (``end`` and ``stop`` below), and the "on the far border" test uses the
  listed end (``start + size >= length``);
* the tile's output lands at ``start // f`` (encode) or ``start * f`` (decode) and covers what the model returns
  for the slice: ``(stop - start) // f`` latents (the Wan encoders floor odd sizes) or ``(stop - start) * f`` pixels;
* its blend mask is ``min(h_ramp, w_ramp)`` over the output tile; a 1-D ramp is ones, with
  ``(arange(b) + 1) / b`` written over its first ``b`` values unless the tile is on the near border and then the
  flipped ramp written over its last ``b`` values unless it is on the far border (the second write wins where they
  overlap); ``b = size - stride`` in latent units converted to output units (pixels ``* f`` for decode).

Where the reference raises instead of blending we define the result: ``stride == size`` (no overlap) blends with
all-ones masks, and a stride larger than the tile, which leaves pixels no tile covers, is a ``ValueError`` (the
reference fails in its mask ramp).  With ``stride <= size`` every ramp fits its tile, so the masks are the
reference's for every size.

Example (Wan2.2 VAE, 64 x 64 pixels, 48-pixel tiles at stride 32: the second column is listed as 32..80, runs on
pixels 32..64 and lands on latents 2..4):
    >>> tiles = tile_grid(64, 64, tile_size=(3, 3), tile_stride=(2, 2), factor=16, direction="encode")
    >>> [(t.w.start, t.w.end, t.w.stop, t.w.out_start, t.w.out_stop, t.w.at_end) for t in tiles[:2]]
    [(0, 48, 48, 0, 3, False), (32, 80, 64, 2, 4, True)]
    >>> len(tiles), tiles[0].border
    (4, (1, 1))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

__all__ = ["TileSpan", "VAETile", "blend_mask", "blend_ramp", "tile_grid", "tile_layout", "tile_starts"]


@dataclass(frozen=True)
class TileSpan:
    """One tile along one axis, in input units (``start`` .. ``stop``) and output units (``out_start`` .. ``out_stop``).

    Attributes:
        start: first input index of the tile.
        end: ``start + size`` as the reference lists it; may pass the input's length.
        stop: ``min(end, length)``, the end of the slice that is actually run.
        out_start: where the tile's output starts (``start // f`` for encode, ``start * f`` for decode).
        out_stop: where it ends (``out_start + (stop - start) // f`` for encode, ``+ (stop - start) * f`` for decode).
        at_start: the tile is on the near border (``start == 0``): no ramp at its start.
        at_end: the tile is on the far border (``end >= length``): no ramp at its end.
    """

    start: int
    end: int
    stop: int
    out_start: int
    out_stop: int
    at_start: bool
    at_end: bool


@dataclass(frozen=True)
class VAETile:
    """One tile of a tiled VAE pass: its height and width spans and the blend border in output units."""

    h: TileSpan
    w: TileSpan
    border: tuple[int, int]

    @property
    def in_slice(self) -> tuple[slice, slice]:
        """``(h, w)`` slices of the input that the tile runs on."""
        return slice(self.h.start, self.h.stop), slice(self.w.start, self.w.stop)

    @property
    def out_slice(self) -> tuple[slice, slice]:
        """``(h, w)`` slices of the output that the tile's result is blended into."""
        return slice(self.h.out_start, self.h.out_stop), slice(self.w.out_start, self.w.out_stop)


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Start indices of the tiles along one axis of ``length`` (the reference's rule, see the module docstring)."""
    if size <= 0 or stride <= 0:
        raise ValueError(f"tile size and stride must be positive, got size {size}, stride {stride}")
    if stride > size and length > size:
        raise ValueError(f"tile_stride {stride} is larger than tile_size {size}: input indices between tiles would "
                         f"not be covered (length {length}); use a stride <= the tile size")
    return [s for s in range(0, length, stride) if not (s - stride >= 0 and s - stride + size >= length)]


def tile_layout(height: int, width: int, tile_size: Sequence[int], tile_stride: Sequence[int]
                ) -> list[tuple[int, int, int, int]]:
    """The reference's task list ``(h0, h0 + size_h, w0, w0 + size_w)`` (row-major; ends may pass the border).

    Sizes and strides are in the units of ``height`` / ``width``; :func:`tile_grid` gives the clamped slices and the
    output positions as well.
    """
    (size_h, size_w), (stride_h, stride_w) = tile_size, tile_stride
    return [(h, h + size_h, w, w + size_w)
            for h in tile_starts(height, size_h, stride_h) for w in tile_starts(width, size_w, stride_w)]


def _spans(length: int, size: int, stride: int, factor: int, direction: str) -> list[TileSpan]:
    spans = []
    for s in tile_starts(length, size, stride):
        stop = min(s + size, length)
        if direction == "encode":
            out_start, out_len = s // factor, (stop - s) // factor
        else:
            out_start, out_len = s * factor, (stop - s) * factor
        spans.append(TileSpan(s, s + size, stop, out_start, out_start + out_len, s == 0, s + size >= length))
    return spans


def tile_grid(height: int, width: int, tile_size: Sequence[int], tile_stride: Sequence[int], factor: int,
              direction: Literal["encode", "decode"]) -> list[VAETile]:
    """Every tile of a DiffSynth-Studio tiled encode / decode, row-major.

    Args:
        height, width: input size (pixels for ``"encode"``, latents for ``"decode"``).
        tile_size, tile_stride: ``(h, w)`` in latent units (the pipeline's ``tile_size`` / ``tile_stride``).
        factor: the VAE's spatial factor (``vae.config.scale_factor_spatial``).
        direction: ``"encode"`` (pixel tiles ``size * factor``, output ``// factor``) or ``"decode"``.
    """
    if direction not in ("encode", "decode"):
        raise ValueError(f"direction must be 'encode' or 'decode', got {direction!r}")
    for name, value in (("tile_size", tile_size), ("tile_stride", tile_stride)):
        if len(value) != 2 or any(int(v) != v for v in value):
            raise ValueError(f"{name} must be two integers (height, width) in latent units, got {tuple(value)!r}")
    unit = factor if direction == "encode" else 1
    size = [int(v) * unit for v in tile_size]
    stride = [int(v) * unit for v in tile_stride]
    border_lat = [int(a) - int(b) for a, b in zip(tile_size, tile_stride)]
    border = tuple(b * factor if direction == "decode" else b for b in border_lat)
    hs = _spans(height, size[0], stride[0], factor, direction)
    ws = _spans(width, size[1], stride[1], factor, direction)
    return [VAETile(h, w, border) for h in hs for w in ws]


def blend_ramp(length: int, at_start: bool, at_end: bool, border: int) -> torch.Tensor:
    """The reference's 1-D blend weights of a tile of ``length`` output values (see the module docstring)."""
    x = torch.ones(length)
    if border <= 0:  # stride == size: nothing overlaps (the reference raises here)
        return x
    ramp = (torch.arange(border) + 1) / border
    n = min(border, length)  # == border whenever the ramp is written (stride <= size)
    if not at_start:
        x[:n] = ramp[:n]
    if not at_end:
        x[length - n:] = torch.flip(ramp, dims=(0,))[border - n:]
    return x


def blend_mask(tile: VAETile, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """``[1, 1, 1, h, w]`` blend mask of ``tile`` (``min`` of the two ramps) over its output extent.

    ``height`` / ``width`` override the extent (the size the model actually returned for the tile).
    """
    h = tile.h.out_stop - tile.h.out_start if height is None else height
    w = tile.w.out_stop - tile.w.out_start if width is None else width
    mh = blend_ramp(h, tile.h.at_start, tile.h.at_end, tile.border[0])[:, None].expand(h, w)
    mw = blend_ramp(w, tile.w.at_start, tile.w.at_end, tile.border[1])[None, :].expand(h, w)
    return torch.minimum(mh, mw).view(1, 1, 1, h, w)
