"""Tiled VAE encode / decode follow DiffSynth-Studio 2.1.12's tiler on every shape (fast, CPU).

The reference (``WanVideoVAE.tiled_encode`` / ``tiled_decode`` / ``build_1d_mask`` / ``build_mask`` in
``diffsynth/models/wan_video_vae.py``; the Wan2.2 class inherits them) is re-derived here on its own terms -- its task
list, its ramps, its accumulation -- without :mod:`diffusers_wan_ext.vae.tile_enumeration`, and compared with ours:
the enumeration over many sizes (divisible and not, smaller than one tile, exactly one tile, one more than a tile,
the 64 px / 48 px tile / 32 px stride case), the masks, and tiled encode / decode end to end on tiny Wan2.1 and
Wan2.2 VAEs against a per-tile computation with the stock model.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from diffusers_wan_ext.conversion.vae import LATENTS_MEAN_STD
from diffusers_wan_ext.vae import (
    blend_mask,
    blend_ramp,
    check_encode_size,
    decode_unclamped,
    denormalize_latents,
    encode_mean,
    normalize_latents,
    tile_grid,
    tile_layout,
    tiled_decode,
    tiled_encode,
)

# ------------------------------------------------------------------------------------------ the reference, re-derived


def ref_tasks(height: int, width: int, size: tuple[int, int], stride: tuple[int, int]
              ) -> list[tuple[int, int, int, int]]:
    """The reference's task list: nested loops over ``range(0, L, stride)``, a start skipped when the previous
    start's tile already reaches the end; entries ``(h, h + size_h, w, w + size_w)``, never clamped."""
    tasks = []
    for h in range(0, height, stride[0]):
        if h - stride[0] >= 0 and h - stride[0] + size[0] >= height:
            continue
        for w in range(0, width, stride[1]):
            if w - stride[1] >= 0 and w - stride[1] + size[1] >= width:
                continue
            tasks.append((h, h + size[0], w, w + size[1]))
    return tasks


def ref_ramp(length: int, left_bound: bool, right_bound: bool, border: int) -> torch.Tensor:
    """The reference's ``build_1d_mask``."""
    x = torch.ones((length,))
    if not left_bound:
        x[:border] = (torch.arange(border) + 1) / border
    if not right_bound:
        x[-border:] = torch.flip((torch.arange(border) + 1) / border, dims=(0,))
    return x


def ref_mask(h: int, w: int, is_bound: tuple[bool, bool, bool, bool], border: tuple[int, int]) -> torch.Tensor:
    """The reference's ``build_mask`` over an output tile of ``h x w``."""
    mh = ref_ramp(h, is_bound[0], is_bound[1], border[0])[:, None].repeat(1, w)
    mw = ref_ramp(w, is_bound[2], is_bound[3], border[1])[None, :].repeat(h, 1)
    return torch.stack([mh, mw]).min(dim=0).values.reshape(1, 1, 1, h, w)


def ref_tiled(fn, x: torch.Tensor, size_lat, stride_lat, f: int, encode: bool) -> torch.Tensor:
    """The reference's tiled pass (without decode's final clamp): tiles in input units, ``fn`` per tile, masks, sums."""
    _, _, _, H, W = x.shape
    unit = f if encode else 1
    size = (size_lat[0] * unit, size_lat[1] * unit)
    stride = (stride_lat[0] * unit, stride_lat[1] * unit)
    border = tuple((a - b) // f if encode else (a - b) * f for a, b in zip(size, stride))
    out_h, out_w = (H // f, W // f) if encode else (H * f, W * f)
    values = weight = None
    for h, h_, w, w_ in ref_tasks(H, W, size, stride):
        y = fn(x[:, :, :, h:h_, w:w_])
        if values is None:
            values = torch.zeros((y.shape[0], y.shape[1], y.shape[2], out_h, out_w), dtype=x.dtype)
            weight = torch.zeros((1, 1, y.shape[2], out_h, out_w), dtype=x.dtype)
        mask = ref_mask(y.shape[3], y.shape[4], (h == 0, h_ >= H, w == 0, w_ >= W), border)
        th, tw = (h // f, w // f) if encode else (h * f, w * f)
        values[:, :, :, th:th + y.shape[3], tw:tw + y.shape[4]] += y * mask
        weight[:, :, :, th:th + y.shape[3], tw:tw + y.shape[4]] += mask
    return values / weight


# ------------------------------------------------------------------------------------------ enumeration


@pytest.mark.parametrize("direction", ["encode", "decode"])
@pytest.mark.parametrize("f", [8, 16])
def test_tile_grid_matches_reference_on_every_size(direction, f):
    unit = f if direction == "encode" else 1
    lengths = (range(1, 6 * unit + 2) if direction == "decode"
               else sorted({*range(1, 3 * f + 2), *range(f, 7 * f + 2, f // 2)}))
    for size_lat in range(1, 6):
        for stride_lat in range(1, size_lat + 1):
            size, stride = size_lat * unit, stride_lat * unit
            border = (size_lat - stride_lat) * (f if direction == "decode" else 1)
            for length in lengths:
                tasks = ref_tasks(length, 1, (size, 1), (stride, 1))
                tiles = tile_grid(length, 1, (size_lat, 1), (stride_lat, 1), f, direction)
                ctx = f"{direction} f={f} length={length} size={size} stride={stride}"
                assert [(t.h.start, t.h.end) for t in tiles] == [(h, h_) for h, h_, _, _ in tasks], ctx
                assert tile_layout(length, 1, (size, 1), (stride, 1)) == tasks, ctx
                canvas = length // f if direction == "encode" else length * f
                cover = torch.zeros(canvas)
                for t, (h, h_, _, _) in zip(tiles, tasks):
                    assert t.h.stop == min(h_, length) and (t.h.at_start, t.h.at_end) == (h == 0, h_ >= length), ctx
                    assert t.border[0] == border, ctx
                    n = (t.h.stop - h) // f if direction == "encode" else (t.h.stop - h) * f
                    assert (t.h.out_start, t.h.out_stop) == ((h // f, h // f + n) if direction == "encode"
                                                             else (h * f, h * f + n)), ctx
                    if border > 0 and n > 0:  # the reference's ramp (it raises for border 0: no overlap)
                        assert torch.equal(blend_ramp(n, t.h.at_start, t.h.at_end, border),
                                           ref_ramp(n, h == 0, h_ >= length, border)), ctx
                    cover[t.h.out_start:t.h.out_stop] += blend_ramp(n, t.h.at_start, t.h.at_end, border)
                assert bool((cover > 0).all()), f"{ctx}: an output position no tile covers"


def test_named_border_cases():
    # Wan2.2 VAE, 64 px, 48 px tiles (3 latents) at stride 32 (2 latents): listed 32..80, run on 32..64, latents 2..4
    w = [t.w for t in tile_grid(16, 64, (3, 3), (2, 2), 16, "encode")]
    assert [(s.start, s.end, s.stop, s.out_start, s.out_stop, s.at_start, s.at_end) for s in w] == [
        (0, 48, 48, 0, 3, True, False), (32, 80, 64, 2, 4, False, True)]
    enc = lambda length: [(s.start, s.end, s.stop, s.out_start, s.out_stop) for s in  # noqa: E731
                          (t.h for t in tile_grid(length, 8, (3, 1), (2, 1), 8, "encode"))]
    assert enc(20) == [(0, 24, 20, 0, 2)]  # smaller than one tile: one clamped tile
    assert enc(24) == [(0, 24, 24, 0, 3)]  # exactly one tile
    assert enc(25) == [(0, 24, 24, 0, 3), (16, 40, 25, 2, 3)]  # one pixel more: a second, clamped tile
    assert enc(40) == [(0, 24, 24, 0, 3), (16, 40, 40, 2, 5)]  # divisible: the start at 32 is skipped
    dec = lambda length: [(s.start, s.end, s.stop, s.out_start, s.out_stop) for s in  # noqa: E731
                          (t.h for t in tile_grid(length, 1, (3, 1), (1, 1), 16, "decode"))]
    assert dec(2) == [(0, 3, 2, 0, 32)]
    assert dec(3) == [(0, 3, 3, 0, 48)]
    assert dec(4) == [(0, 3, 3, 0, 48), (1, 4, 4, 16, 64)]  # the golden fixtures' decode layout
    assert dec(5) == [(0, 3, 3, 0, 48), (1, 4, 4, 16, 64), (2, 5, 5, 32, 80)]


def test_masks_match_reference_2d():
    grids = [("encode", 16, (64, 64), (3, 3), (2, 2)), ("encode", 8, (25, 70), (3, 4), (1, 2)),
             ("decode", 8, (5, 7), (3, 3), (1, 2)), ("decode", 16, (4, 9), (4, 5), (2, 2))]
    for direction, f, (H, W), size, stride in grids:
        for t in tile_grid(H, W, size, stride, f, direction):
            h, w = t.h.out_stop - t.h.out_start, t.w.out_stop - t.w.out_start
            expected = ref_mask(h, w, (t.h.start == 0, t.h.end >= H, t.w.start == 0, t.w.end >= W), t.border)
            assert torch.equal(blend_mask(t), expected), (direction, H, W, t)


def test_no_overlap_and_bad_tiles():
    # stride == size: tiles abut, all-ones masks (the reference raises in its ramp there)
    tiles = tile_grid(6, 4, (2, 2), (2, 2), 8, "decode")
    assert [(t.h.start, t.w.start) for t in tiles] == [(0, 0), (0, 2), (2, 0), (2, 2), (4, 0), (4, 2)]
    assert all(torch.equal(blend_mask(t), torch.ones(1, 1, 1, 16, 16)) for t in tiles)
    with pytest.raises(ValueError, match="tile_stride 3 is larger than tile_size 2"):
        tile_grid(6, 4, (2, 2), (3, 2), 8, "decode")
    tile_grid(2, 4, (2, 2), (3, 2), 8, "decode")  # one tile along that axis: nothing left uncovered
    with pytest.raises(ValueError, match="tile_size must be two integers"):
        tile_grid(6, 4, (2, 2, 2), (1, 1), 8, "decode")
    with pytest.raises(ValueError, match="positive"):
        tile_grid(6, 4, (2, 0), (1, 1), 8, "decode")


# ------------------------------------------------------------------------------------------ end to end


TINY = {
    "wan2.1": dict(base_dim=4, z_dim=16),
    "wan2.2": dict(base_dim=4, decoder_base_dim=6, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                   patch_size=2, scale_factor_spatial=16, latents_mean=list(LATENTS_MEAN_STD["wan2.2"][0]),
                   latents_std=list(LATENTS_MEAN_STD["wan2.2"][1])),
}
# (video H, W and frames for encode; latent h, w and frames for decode; tile size / stride in latent units)
CASES = {
    "wan2.1": [((16, 24), 1, (2, 3), 1, (3, 3), (2, 2)),   # smaller than one tile (H), exactly one tile (W)
               ((25, 33), 6, (4, 4), 1, (3, 3), (2, 2)),   # one pixel more than a tile; W % 8 != 0; T not 4n+1
               ((40, 36), 1, (4, 5), 1, (3, 4), (2, 2))],  # divisible H, non-divisible W; several tiles
    "wan2.2": [((64, 64), 1, (4, 4), 1, (3, 3), (2, 2)),   # 64 px, 48 px tiles at stride 32
               ((32, 80), 2, (2, 5), 2, (2, 3), (1, 2)),   # T not 4n+1
               ((48, 48), 1, (3, 3), 1, (3, 3), (2, 2))],  # exactly one tile
}


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request):
    torch.manual_seed(0)
    model = AutoencoderKLWan(**TINY[request.param]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return request.param, model


def test_tiled_encode_decode_match_per_tile_reference(tiny):
    name, vae = tiny
    f = vae.config.scale_factor_spatial
    torch.manual_seed(2)
    for (H, W), frames, (h, w), lat_frames, size, stride in CASES[name]:
        video = torch.rand(1, 3, frames, H, W) * 2 - 1
        with torch.no_grad():
            stock = lambda x: normalize_latents(vae, vae.encode(x).latent_dist.mode())  # noqa: E731
            expected = ref_tiled(stock, video, size, stride, f, encode=True)
            got = tiled_encode(vae, video, size, stride)
            assert got.shape == (1, vae.config.z_dim, 1 + (frames - 1) // 4, H // f, W // f)
            assert torch.equal(got, expected), (name, H, W, (got - expected).abs().max())
            z = torch.randn(1, vae.config.z_dim, lat_frames, h, w)
            run = lambda x: decode_unclamped(vae, denormalize_latents(vae, x))  # noqa: E731
            expected = ref_tiled(run, z, size, stride, f, encode=False).clamp_(-1, 1)
            got = tiled_decode(vae, z, size, stride)
            assert got.shape == (1, 3, 4 * lat_frames - 3, h * f, w * f)
            assert torch.equal(got, expected), (name, h, w, (got - expected).abs().max())


def test_frames_not_4n_plus_1_are_dropped_like_the_reference(tiny):
    _, vae = tiny
    f = vae.config.scale_factor_spatial
    torch.manual_seed(3)
    video = torch.rand(1, 3, 8, f, f) * 2 - 1
    with torch.no_grad():
        five = encode_mean(vae, video[:, :, :5])
        for frames in (6, 8):  # frames after the last full chunk of 4 are not encoded (tiled: CASES)
            assert torch.equal(encode_mean(vae, video[:, :, :frames]), five)


def test_encode_size_errors(tiny):
    name, vae = tiny
    if name == "wan2.2":  # average-pool shortcuts need multiples of 16; one clear error before any tile runs
        for shape in [(1, 3, 5, 40, 48), (1, 3, 5, 48, 56), (1, 3, 5, 33, 64)]:
            video = torch.zeros(shape)
            with pytest.raises(ValueError, match=f"height {shape[3]} and width {shape[4]} must be multiples of 16"):
                encode_mean(vae, video)
            with pytest.raises(ValueError, match="must be multiples of 16"):
                tiled_encode(vae, video, (3, 3), (2, 2))
    else:
        check_encode_size(vae, torch.zeros(1, 3, 5, 25, 33))  # the Wan2.1 encoder floors odd sizes
    with pytest.raises(ValueError, match=r"video must be \[B, C, frames >= 1, H, W\]"):
        encode_mean(vae, torch.zeros(1, 3, 0, 32, 32))
