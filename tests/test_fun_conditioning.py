"""Fast unit tests of the Wan-Fun conditioning helpers and the camera (Plücker) utilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_wan_ext.pipelines.fun_conditioning import (
    fun_camera_condition,
    fun_control_condition,
    i2v_condition,
    i2v_mask,
)
from diffusers_wan_ext.utils.media import encode_video, load_image, load_video_frames
from diffusers_wan_ext.utils.camera import (
    CAMERA_DIRECTIONS,
    DEFAULT_CAMERA_ORIGIN,
    DEFAULT_CAMERA_SPEED,
    camera_control_latents,
    camera_plucker_embedding,
    generate_camera_coordinates,
    pack_camera_latents,
)

F, H, W = 5, 32, 48


@pytest.fixture(scope="module")
def frames_uint8() -> np.ndarray:
    """Smooth, distinct frames [F, H, W, 3] (survive lossy video coding)."""
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for i in range(F):
        r = (xx * 255 // (W - 1) + 40 * i) % 256
        g = yy * 255 // (H - 1)
        b = np.full_like(xx, 30 + 50 * i)
        out.append(np.stack([r, g, b], -1))
    return np.stack(out).astype(np.uint8)


@pytest.fixture(scope="module")
def expected(frames_uint8) -> torch.Tensor:
    return torch.from_numpy(frames_uint8).float().permute(3, 0, 1, 2)[None] * (2 / 255) - 1


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()


# ------------------------------------------------------------------------------------------------ load_video_frames


def test_video_from_pil_list(frames_uint8, expected):
    got = load_video_frames([Image.fromarray(f) for f in frames_uint8], F, H, W)
    assert got.shape == (1, 3, F, H, W) and got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_video_from_numpy_uint8_and_float(frames_uint8, expected):
    assert torch.equal(load_video_frames(frames_uint8, F, H, W), expected)
    got = load_video_frames(frames_uint8.astype(np.float32) / 255, F, H, W)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_video_from_torch_layouts(expected):
    assert torch.equal(load_video_frames(expected, F, H, W), expected)  # [1, 3, F, H, W]
    assert torch.equal(load_video_frames(expected[0], F, H, W), expected)  # [3, F, H, W]
    assert torch.equal(load_video_frames(expected[0].permute(1, 0, 2, 3), F, H, W), expected)  # [F, 3, H, W]
    assert torch.equal(load_video_frames(expected.double(), F, H, W), expected)


def test_video_from_mp4_file(tmp_path, frames_uint8, expected):
    import imageio

    path = tmp_path / "control.mp4"
    imageio.mimwrite(str(path), list(frames_uint8), fps=8, quality=10)
    got = load_video_frames(path, F, H, W)  # PathLike
    assert got.shape == expected.shape
    assert (got - expected).abs().mean() < 0.05, "decoded frames should be close to what we wrote"
    assert torch.equal(load_video_frames(str(path), F, H, W), got)


def test_video_wrong_frame_count(frames_uint8):
    seven = np.concatenate([frames_uint8, frames_uint8[:2]])
    with pytest.raises(ValueError) as e:
        load_video_frames(seven, 9, H, W)
    msg = str(e.value)
    assert "control_video has 7 frames but num_frames=9" in msg
    assert "a video of 9 frames" in msg and "4n+1" in msg
    assert "trim the video to 5 frames" in msg  # 7 itself is not 4n+1
    with pytest.raises(ValueError, match="has 5 frames but num_frames=9: pass num_frames=5"):
        load_video_frames(frames_uint8, 9, H, W, name="control_video")


def test_video_num_frames_not_4n1(frames_uint8):
    with pytest.raises(ValueError, match=r"num_frames=6 is not 4n\+1.*pass 5 or 9"):
        load_video_frames(frames_uint8, 6, H, W)


def test_video_wrong_size(frames_uint8):
    with pytest.raises(ValueError) as e:
        load_video_frames(frames_uint8, F, 64, W, name="ref_video")
    msg = str(e.value)
    assert "ref_video frames are 32x48" in msg and "height=64, width=48" in msg
    assert "resize the video" in msg and "pass height=32, width=48" in msg


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (torch.full((F, 3, H, W), 255.0), "[-1, 1]"),
        (np.full((F, H, W, 3), 2.0, np.float32), "[0, 1]"),
        (np.zeros((F, H, W), np.uint8), "[F, H, W, 3]"),
        (torch.zeros(F, 4, H, W), "[F, 3, H, W]"),
        (torch.zeros(F, 3, H, W, dtype=torch.uint8), "float in [-1, 1]"),
        (Image.new("RGB", (W, H)), "list of PIL images"),
        ([], "empty list"),
        ([Image.new("RGB", (W, H)), "x"], "must hold PIL images"),
        ([Image.new("RGB", (W, H)), Image.new("RGB", (W + 16, H))], "different sizes"),
        ("/nonexistent/video.mp4", "no video file"),
        (3.0, "unsupported type"),
    ],
)
def test_video_bad_inputs(bad, fragment):
    with pytest.raises(ValueError) as e:
        load_video_frames(bad, F, H, W)
    assert fragment in str(e.value)


# --------------------------------------------------------------------------------------------------------- load_image


def test_load_image_mapping_and_resize():
    px = np.array([[[0, 128, 255]]], np.uint8).repeat(H, 0).repeat(W, 1)
    got = load_image(Image.fromarray(px), H, W)
    assert got.shape == (1, 3, H, W)
    assert got[0, :, 0, 0].tolist() == [-1.0, float(np.float32(128) * np.float32(2 / 255) - 1), 1.0]
    assert torch.equal(load_image(px, H, W), got)  # numpy uint8
    assert torch.equal(load_image(got[0], H, W), got)  # torch [3, H, W]
    small = Image.fromarray(px[:8, :8])
    assert load_image(small, H, W).shape == (1, 3, H, W)  # PIL is resized like the reference
    assert torch.equal(load_image(small, H, W), load_image(small.convert("RGB").resize((W, H)), H, W))


def test_load_image_wrong_size_not_resized():
    with pytest.raises(ValueError, match=r"end_image is 16x16 .*height=32, width=48.*resize it"):
        load_image(np.zeros((16, 16, 3), np.uint8), H, W, name="end_image")
    with pytest.raises(ValueError, match=r"\[3, H, W\] or \[1, 3, H, W\]"):
        load_image(torch.zeros(2, 3, H, W), H, W)


# ------------------------------------------------------------------------------------------------------------- camera


def test_generate_camera_coordinates_as_coded():
    rows = generate_camera_coordinates("Left", 4, speed=0.25)
    assert len(rows) == 4 and all(len(r) == 19 for r in rows)
    assert rows[0] == [float(v) for v in DEFAULT_CAMERA_ORIGIN]
    assert [r[9] for r in rows] == [0.0, 0.25, 0.5, 0.75]  # index 9 = w2c[0][2], as the reference codes it
    lu = generate_camera_coordinates("LeftUp", 3, speed=0.5)
    assert [r[9] for r in lu] == [0.0, 0.5, 1.0] and [r[13] for r in lu] == [0.0, 0.5, 1.0]
    rd = generate_camera_coordinates("RightDown", 2, speed=0.5)
    assert rd[1][9] == -0.5 and rd[1][13] == -0.5
    assert [r[18] for r in generate_camera_coordinates("In", 3, speed=0.5)] == [0.0, -0.5, -1.0]
    assert [r[18] for r in generate_camera_coordinates("Out", 2, speed=0.5)] == [0.0, 0.5]
    # repeated additions, like the reference (not i * speed)
    acc = 0.0
    for r in generate_camera_coordinates("Left", 9)[1:]:
        acc += DEFAULT_CAMERA_SPEED
        assert r[9] == acc


def test_camera_bad_direction_and_origin():
    with pytest.raises(ValueError) as e:
        generate_camera_coordinates("left", 5)
    assert "'left'" in str(e.value) and all(d in str(e.value) for d in CAMERA_DIRECTIONS)
    with pytest.raises(ValueError, match="origin must have 19 numbers .* but has 3"):
        generate_camera_coordinates("Left", 5, origin=[0, 1, 2])
    with pytest.raises(ValueError, match="unknown camera direction"):
        camera_control_latents(5, 16, 16, direction="Sideways")


def test_camera_direction_xor_poses():
    poses = generate_camera_coordinates("Up", 5)
    with pytest.raises(ValueError, match="exactly one of direction= .* or poses=.*got both"):
        camera_control_latents(5, 16, 16, direction="Up", poses=poses)
    with pytest.raises(ValueError, match="exactly one of .*got neither"):
        camera_control_latents(5, 16, 16)
    with pytest.raises(ValueError, match="poses has 5 rows but num_frames=9"):
        camera_control_latents(9, 16, 16, poses=poses)
    with pytest.raises(ValueError, match=r"poses must be \[F, 19\]"):
        camera_plucker_embedding([[0.0] * 18], 16, 16)


def test_camera_frames_not_4n1():
    with pytest.raises(ValueError, match=r"num_frames=8 is not 4n\+1.*pass 5 or 9"):
        camera_control_latents(8, 16, 16, direction="Left")
    with pytest.raises(ValueError, match=r"8 frames, which is not 4n\+1.*pass 5 or 9"):
        pack_camera_latents(torch.zeros(8, 16, 16, 6))


def test_explicit_poses_equal_direction():
    rows = generate_camera_coordinates("RightUp", 9, speed=0.05)
    a = camera_control_latents(9, 32, 64, direction="RightUp", speed=0.05)
    assert torch.equal(a, camera_control_latents(9, 32, 64, poses=rows))
    assert torch.equal(a, camera_control_latents(9, 32, 64, poses=np.asarray(rows)))
    assert torch.equal(a, pack_camera_latents(camera_plucker_embedding(rows, 32, 64)))
    assert a.shape == (1, 24, 3, 32, 64) and a.dtype == torch.float32


def test_plucker_properties():
    emb = camera_plucker_embedding(generate_camera_coordinates("In", 5, speed=0.3), 16, 24)
    assert emb.shape == (5, 16, 24, 6) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[..., 3:].norm(dim=-1), torch.ones(5, 16, 24))  # unit directions
    assert torch.equal(emb[0, ..., :3], torch.zeros(16, 24, 3))  # first camera at the origin: o x d = 0
    # o x d is orthogonal to d
    torch.testing.assert_close((emb[..., :3] * emb[..., 3:]).sum(-1), torch.zeros(5, 16, 24), atol=1e-6, rtol=0)
    # the pixel-centre ray through the principal point (cx = cy = 0.5) points straight ahead for frame 0
    even = camera_plucker_embedding([DEFAULT_CAMERA_ORIGIN], 2, 2)
    assert torch.allclose(even[0, ..., 3:].mean((0, 1)), torch.tensor([0.0, 0.0, even[0, 0, 0, 5].item()]),
                          atol=1e-7)


def test_pack_layout():
    f, h, w = 9, 2, 3
    # value = 10 * frame + channel
    plucker = (torch.arange(f).view(f, 1, 1, 1) * 10 + torch.arange(6).view(1, 1, 1, 6)).float().expand(f, h, w, 6)
    packed = pack_camera_latents(plucker)
    assert packed.shape == (1, 24, 3, h, w)
    for t in range(3):
        for c in range(6):
            for k in range(4):
                frame = 0 if t == 0 else 4 * (t - 1) + 1 + k  # frame 0 repeated 4x, then groups of 4
                assert packed[0, c * 4 + k, t, 0, 0].item() == 10 * frame + c


# ------------------------------------------------------------------------------------------------------- conditioning


def test_i2v_mask():
    m = i2v_mask(9, 2, 3)
    assert m.shape == (1, 4, 3, 2, 3) and m.dtype == torch.float32
    assert m[0, :, :, 0, 0].tolist() == [[1, 0, 0]] * 4
    m = i2v_mask(9, 2, 3, last_frame=True)
    assert m[0, :, :, 1, 2].tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1]]
    assert i2v_mask(1, 1, 1).shape == (1, 4, 1, 1, 1)
    with pytest.raises(ValueError, match=r"4n\+1"):
        i2v_mask(7, 2, 2)


def test_i2v_condition_matches_stock_diffusers(tiny_vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler())
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    end = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        for last in (None, end):
            _, want = pipe.prepare_latents(image, 1, 16, 32, 32, 9, dtype=torch.float32, device=torch.device("cpu"),
                                           generator=torch.Generator().manual_seed(0), last_image=last)
            got = i2v_condition(tiny_vae, image, 9, end_image=last)
            assert got.shape == (1, 20, 3, 4, 4)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fun_control_and_camera_condition(tiny_vae):
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    video = torch.rand(1, 3, 9, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        control = encode_video(tiny_vae, video)
        y_i2v = i2v_condition(tiny_vae, image, 9)
        y48 = fun_control_condition(control, 16, y_i2v)
        y52 = fun_control_condition(control, 20, y_i2v)
        y48_none = fun_control_condition(control, 16)
        y32 = fun_camera_condition(tiny_vae, image, 9, y_channels=16)
        y36 = fun_camera_condition(tiny_vae, image, 9, y_channels=20)
        first = encode_video(tiny_vae, image[:, :, None])
    assert control.shape == (1, 16, 3, 4, 4)
    assert torch.equal(y48, torch.cat([control, y_i2v[:, 4:]], 1))
    assert torch.equal(y52, torch.cat([control, y_i2v], 1))
    assert torch.equal(y48_none[:, 16:], torch.zeros(1, 16, 3, 4, 4))
    assert y32.shape == (1, 16, 3, 4, 4) and torch.equal(y32[:, :, :1], first) and not y32[:, :, 1:].any()
    assert torch.equal(y36, y_i2v)
    with pytest.raises(ValueError, match="y_channels=24 is not a Fun-Camera layout: pass 16 .* or 20"):
        fun_camera_condition(tiny_vae, image, 9, y_channels=24)
    with pytest.raises(ValueError, match="fewer than y_channels=24"):
        fun_control_condition(control, 24, y_i2v)
    with pytest.raises(ValueError, match="same frames and size"):
        fun_control_condition(control, 16, y_i2v[:, :, :2])
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        encode_video(tiny_vae, image)
