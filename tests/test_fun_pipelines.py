"""Wan-Fun pipelines (InP, Control, Control-Camera) end to end on tiny random components (CPU).

Each variant runs through its pipeline; a forward pre-hook on the transformer checks that what reaches the model is
what the reference builds (``y`` channels, reference latents, camera map, CLIP features), computed independently with
the :mod:`diffusers_wan_ext.pipelines.fun_conditioning` helpers.  Also: save/load round trips, a stock-format LoRA,
and the input errors.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from PIL import Image

from diffusers_wan_ext import (
    WanFunCameraControlPipeline,
    WanFunControlPipeline,
    WanFunInpaintPipeline,
    WanFunTransformer3DModel,
)
from diffusers_wan_ext.conversion.image_encoder import clip_image_features, wan_clip_preprocess
from diffusers_wan_ext.pipelines.fun_conditioning import fun_camera_condition, fun_control_condition, i2v_condition
from diffusers_wan_ext.utils.media import encode_video, load_image, load_video_frames
from diffusers_wan_ext.utils.camera import camera_control_latents, generate_camera_coordinates
from helpers import latents_of

H = W = 32
F = 5
T_LAT = (F - 1) // 4 + 1
STEPS = 2
CLIP_DIM = 32


# ----------------------------------------------------------------------------------------------- tiny components
def make_text_parts(folder):
    """Tiny umT5 tokenizer (trained offline) + encoder."""
    from transformers import UMT5Config, UMT5EncoderModel

    from diffusers_wan_ext.conversion.tokenizer import make_tiny_umt5_tokenizer

    tokenizer = make_tiny_umt5_tokenizer(folder, vocab_size=256)
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=256, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
        is_gated_act=True, tie_word_embeddings=False,
    )).eval()
    return tokenizer, text_encoder


def make_vae():
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
    ).eval()


def make_scheduler():
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def make_transformer(in_channels, clip=True, ref_conv=False, camera=False, seed=0, stock=False):
    torch.manual_seed(seed)
    kwargs = dict(
        num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2,
        in_channels=in_channels, image_dim=CLIP_DIM if clip else None, added_kv_proj_dim=48 if clip else None,
    )
    if stock:
        return WanTransformer3DModel(**kwargs).eval()
    return WanFunTransformer3DModel(
        text_len=512, ref_conv_in_channels=16 if ref_conv else None,
        control_adapter_in_channels=24 if camera else None, **kwargs,
    ).eval()


def make_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from diffusers_wan_ext.conversion.image_encoder import make_clip_image_processor

    torch.manual_seed(0)
    encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=CLIP_DIM, intermediate_size=4 * CLIP_DIM, num_hidden_layers=3, num_attention_heads=2,
        image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=16,
    )).eval()
    return make_clip_image_processor(224), encoder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tokenizer, text_encoder = make_text_parts(tmp_path_factory.mktemp("tok") / "umt5")
    processor, clip = make_clip()
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=make_vae(), image_processor=processor,
                image_encoder=clip)


def build(cls, parts, transformer, clip=True, transformer_2=None, boundary_ratio=None):
    return cls(
        tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
        scheduler=make_scheduler(),
        image_processor=parts["image_processor"] if clip else None,
        image_encoder=parts["image_encoder"] if clip else None,
        transformer=transformer, transformer_2=transformer_2, boundary_ratio=boundary_ratio,
    )


def picture(seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def control_frames(n=F, h=H, w=W, seed=7):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


class Spy:
    """Records the keyword arguments of every forward of a module.

    With ``cfg_batch=B``, a batched cond + uncond forward (``hidden_states`` of batch ``2 x B``, CFG batching) is
    recorded as its two passes, cond then uncond (tensors of batch ``2 x B`` split in halves, broadcast ones kept).
    """

    def __init__(self, module, cfg_batch=None):
        self.calls = []
        self.cfg_batch = cfg_batch
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        kwargs = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        b = self.cfg_batch
        if b is None or kwargs["hidden_states"].shape[0] != 2 * b:
            self.calls.append(kwargs)
            return

        def half(v, i):
            return v[i * b:(i + 1) * b] if torch.is_tensor(v) and v.ndim and v.shape[0] == 2 * b else v

        self.calls.extend({k: half(v, i) for k, v in kwargs.items()} for i in (0, 1))

    def remove(self):
        self.handle.remove()


run = partial(latents_of, prompt="a red fox", height=H, width=W, num_frames=F, num_inference_steps=STEPS)


def clip_of(parts, image):
    return clip_image_features(parts["image_encoder"], wan_clip_preprocess(load_image(image, H, W), 224))


# ------------------------------------------------------------------------------------------------------ Fun-InP
@pytest.mark.parametrize("with_end", [False, True])
def test_inpaint_wan21_clip(parts, with_end):
    pipe = build(WanFunInpaintPipeline, parts, make_transformer(36), clip=True)
    first, last = picture(1), picture(2)
    spy = Spy(pipe.transformer, cfg_batch=1)
    out = run(pipe, image=first, end_image=last if with_end else None)
    spy.remove()
    assert out.shape == (1, 16, T_LAT, H // 8, W // 8) and torch.isfinite(out).all()
    assert len(spy.calls) == 2 * STEPS  # cond + uncond per step
    want_y = i2v_condition(parts["vae"], load_image(first, H, W), F,
                           end_image=load_image(last, H, W) if with_end else None)
    for call in spy.calls:
        assert call["hidden_states"].shape[1] == 36
        torch.testing.assert_close(call["hidden_states"][:, 16:], want_y, rtol=0, atol=0)
        # CLIP of the first image only, also with an end image (Fun-InP has no FLF2V position embedding)
        torch.testing.assert_close(call["encoder_hidden_states_image"], clip_of(parts, first), rtol=0, atol=0)
        assert "reference_latents" not in call and "control_camera_latents" not in call
    # the mask marks the last frame only with an end image
    assert want_y[0, 3, -1].mean().item() == (1.0 if with_end else 0.0)


def test_inpaint_end_image_changes_output(parts):
    pipe = build(WanFunInpaintPipeline, parts, make_transformer(36), clip=True)
    a = run(pipe, image=picture(1))
    b = run(pipe, image=picture(1), end_image=picture(2))
    assert not torch.allclose(a, b)


def test_inpaint_wan22_two_experts_no_clip(parts):
    high, low = make_transformer(36, clip=False, seed=1), make_transformer(36, clip=False, seed=2)
    pipe = build(WanFunInpaintPipeline, parts, high, clip=False, transformer_2=low, boundary_ratio=0.875)
    spy_h, spy_l = Spy(high, cfg_batch=1), Spy(low, cfg_batch=1)
    out = run(pipe, image=picture(3), guidance_scale=3.0, guidance_scale_2=2.0, output_type="np")
    spy_h.remove(), spy_l.remove()
    assert out.shape == (1, F, H, W, 3) and np.isfinite(out).all()
    assert len(spy_h.calls) == 2 and len(spy_l.calls) == 2  # t=1000 -> high, t=750 -> low
    assert all(c["encoder_hidden_states_image"] is None for c in spy_h.calls + spy_l.calls)


# --------------------------------------------------------------------------------------------------- Fun-Control
@pytest.mark.parametrize("with_image", [False, True])
def test_control_wan21_stock_transformer(parts, with_image):
    """Wan2.1 Fun-Control (48) converts to the stock transformer: the pipeline runs it as is."""
    pipe = build(WanFunControlPipeline, parts, make_transformer(48, stock=True), clip=True)
    frames, start = control_frames(), picture(4)
    spy = Spy(pipe.transformer, cfg_batch=1)
    out = run(pipe, control_video=frames, image=start if with_image else None)
    spy.remove()
    assert out.shape == (1, 16, T_LAT, H // 8, W // 8)
    control = encode_video(parts["vae"], load_video_frames(frames, F, H, W))
    i2v_y = i2v_condition(parts["vae"], load_image(start, H, W), F) if with_image else None
    want_y = fun_control_condition(control, 16, i2v_y)
    for call in spy.calls:
        torch.testing.assert_close(call["hidden_states"][:, 16:], want_y, rtol=0, atol=0)
        if with_image:
            torch.testing.assert_close(call["encoder_hidden_states_image"], clip_of(parts, start), rtol=0, atol=0)
        else:  # DiffSynth: zero CLIP features and a zero image part without an image
            assert call["encoder_hidden_states_image"].shape == (1, 257, CLIP_DIM)
            assert not call["encoder_hidden_states_image"].any()
            assert not call["hidden_states"][:, 32:].any()


def test_control_v11_reference_image(parts):
    pipe = build(WanFunControlPipeline, parts, make_transformer(48, ref_conv=True), clip=True)
    frames, ref = control_frames(), picture(5, size=(64, 40))
    spy = Spy(pipe.transformer, cfg_batch=1)
    with_ref = run(pipe, control_video=frames, reference_image=ref)
    spy.remove()
    want_ref = encode_video(parts["vae"], load_image(ref, H, W).unsqueeze(2))
    assert want_ref.shape == (1, 16, 1, H // 8, W // 8)
    for call in spy.calls:
        torch.testing.assert_close(call["reference_latents"], want_ref, rtol=0, atol=0)
        # the reference image's CLIP features replace the (zero) input-image ones
        torch.testing.assert_close(call["encoder_hidden_states_image"], clip_of(parts, ref), rtol=0, atol=0)
    without = run(pipe, control_video=frames)
    assert not torch.allclose(with_ref, without)


def test_control_wan22_52_two_experts(parts):
    high = make_transformer(52, clip=False, ref_conv=True, seed=3)
    low = make_transformer(52, clip=False, ref_conv=True, seed=4)
    pipe = build(WanFunControlPipeline, parts, high, clip=False, transformer_2=low, boundary_ratio=0.875)
    frames, start, ref = control_frames(), picture(6), picture(8)
    spy_h, spy_l = Spy(high, cfg_batch=1), Spy(low, cfg_batch=1)
    out = run(pipe, control_video=frames, image=start, reference_image=ref)
    spy_h.remove(), spy_l.remove()
    assert out.shape == (1, 16, T_LAT, H // 8, W // 8)
    assert len(spy_h.calls) == 2 and len(spy_l.calls) == 2
    control = encode_video(parts["vae"], load_video_frames(frames, F, H, W))
    want_y = fun_control_condition(control, 20, i2v_condition(parts["vae"], load_image(start, H, W), F))
    for call in spy_h.calls + spy_l.calls:
        assert call["hidden_states"].shape[1] == 52
        # Wan2.2: control (16) + mask (4) + image latents (16), mask kept as VideoX-Fun does
        torch.testing.assert_close(call["hidden_states"][:, 16:], want_y, rtol=0, atol=0)
        assert call["hidden_states"][:, 32:36, 0].min().item() == 1.0
        assert call["encoder_hidden_states_image"] is None
        assert call["reference_latents"].shape == (1, 16, 1, H // 8, W // 8)


# ------------------------------------------------------------------------------------------- Fun-Control-Camera
def test_camera_wan21_32_clip(parts):
    pipe = build(WanFunCameraControlPipeline, parts, make_transformer(32, camera=True), clip=True)
    img = picture(9)
    spy = Spy(pipe.transformer, cfg_batch=1)
    out = run(pipe, image=img, camera_control_direction="LeftUp", camera_control_speed=0.05)
    spy.remove()
    assert out.shape == (1, 16, T_LAT, H // 8, W // 8)
    want_cam = camera_control_latents(F, H, W, direction="LeftUp", speed=0.05)
    want_y = fun_camera_condition(parts["vae"], load_image(img, H, W), F, 16)
    assert want_cam.shape == (1, 24, T_LAT, H, W)
    for call in spy.calls:
        torch.testing.assert_close(call["control_camera_latents"], want_cam, rtol=0, atol=0)
        torch.testing.assert_close(call["hidden_states"][:, 16:], want_y, rtol=0, atol=0)
        torch.testing.assert_close(call["encoder_hidden_states_image"], clip_of(parts, img), rtol=0, atol=0)
    # explicit poses equal to the generated trajectory give the same video; another direction does not
    poses = generate_camera_coordinates("LeftUp", F, speed=0.05)
    torch.testing.assert_close(run(pipe, image=img, camera_poses=poses), out, rtol=0, atol=0)
    assert not torch.allclose(run(pipe, image=img, camera_control_direction="In", camera_control_speed=0.05), out)


def test_camera_wan22_36_no_clip(parts):
    pipe = build(WanFunCameraControlPipeline, parts, make_transformer(36, clip=False, camera=True), clip=False)
    img = picture(10)
    spy = Spy(pipe.transformer, cfg_batch=1)
    out = run(pipe, image=img, camera_control_direction="Out")
    spy.remove()
    assert out.shape == (1, 16, T_LAT, H // 8, W // 8)
    want_y = fun_camera_condition(parts["vae"], load_image(img, H, W), F, 20)
    torch.testing.assert_close(want_y, i2v_condition(parts["vae"], load_image(img, H, W), F), rtol=0, atol=0)
    for call in spy.calls:
        torch.testing.assert_close(call["hidden_states"][:, 16:], want_y, rtol=0, atol=0)
        assert call["control_camera_latents"].shape == (1, 24, T_LAT, H, W)
        assert call["encoder_hidden_states_image"] is None


# ------------------------------------------------------------------------------------------- batch and callbacks
def test_batch_and_callback(parts):
    pipe = build(WanFunControlPipeline, parts, make_transformer(48, ref_conv=True), clip=True)
    seen = []

    def callback(p, i, t, kw):
        seen.append((i, kw["latents"].shape))
        return {}

    out = run(pipe, control_video=control_frames(), reference_image=picture(1), prompt=["a", "b"],
              negative_prompt=["", ""], num_videos_per_prompt=2, callback_on_step_end=callback,
              generator=[torch.Generator().manual_seed(i) for i in range(4)])
    assert out.shape == (4, 16, T_LAT, H // 8, W // 8)
    assert seen == [(i, (4, 16, T_LAT, H // 8, W // 8)) for i in range(STEPS)]


def test_short_text_context_is_padded_for_clip_models(parts):
    """A CLIP-branch transformer splits [image | last text_len tokens]: a short max_sequence_length is zero-padded,
    which equals encoding at 512 (umT5 embeddings are zero past the prompt)."""
    pipe = build(WanFunInpaintPipeline, parts, make_transformer(36), clip=True)
    spy = Spy(pipe.transformer, cfg_batch=1)
    short = run(pipe, image=picture(1), max_sequence_length=16)
    spy.remove()
    assert spy.calls[0]["encoder_hidden_states"].shape[1] == 512
    torch.testing.assert_close(short, run(pipe, image=picture(1)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="more than the transformer's text_len=512"):
        run(pipe, image=picture(1), prompt=None, prompt_embeds=torch.zeros(1, 600, 32),
            negative_prompt=None, negative_prompt_embeds=torch.zeros(1, 600, 32))


# --------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("variant", ["control", "camera"])
def test_save_pretrained_round_trip(parts, tmp_path, variant):
    if variant == "control":
        pipe = build(WanFunControlPipeline, parts, make_transformer(48, ref_conv=True), clip=True)
        inputs = dict(control_video=control_frames(), reference_image=picture(2), image=picture(3))
    else:
        high = make_transformer(36, clip=False, camera=True, seed=5)
        low = make_transformer(36, clip=False, camera=True, seed=6)
        pipe = build(WanFunCameraControlPipeline, parts, high, clip=False, transformer_2=low, boundary_ratio=0.875)
        inputs = dict(image=picture(4), camera_control_direction="Right")
    before = run(pipe, **inputs)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "saved"))
    assert type(loaded) is type(pipe)
    assert type(loaded.transformer).__name__ == "WanFunTransformer3DModel"
    assert loaded.config.boundary_ratio == pipe.config.boundary_ratio
    torch.testing.assert_close(run(loaded, **inputs), before, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------- LoRA
def _lora_state_dict(transformer, rank=2, seed=0):
    """A stock Diffusers-format Wan LoRA (``transformer.<module>.lora_A/B.weight``) on the self-attention q/v."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, block in enumerate(transformer.blocks):
        for name in ("to_q", "to_v"):
            lin = getattr(block.attn1, name)
            prefix = f"transformer.blocks.{i}.attn1.{name}"
            sd[f"{prefix}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.5
            sd[f"{prefix}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.5
    return sd


def test_stock_format_lora(parts):
    pytest.importorskip("peft")
    pipe = build(WanFunControlPipeline, parts, make_transformer(48, ref_conv=True, seed=11), clip=True)
    inputs = dict(control_video=control_frames(), reference_image=picture(2))
    base = run(pipe, **inputs)
    pipe.load_lora_weights(_lora_state_dict(pipe.transformer), adapter_name="style")
    with_lora = run(pipe, **inputs)
    assert not torch.allclose(base, with_lora)
    half = run(pipe, **inputs, attention_kwargs={"scale": 0.5})
    assert not torch.allclose(half, with_lora) and not torch.allclose(half, base)
    pipe.unload_lora_weights()
    torch.testing.assert_close(run(pipe, **inputs), base, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def control_pipe(parts):
    return build(WanFunControlPipeline, parts, make_transformer(48, stock=True), clip=True)


def test_error_control_video_wrong_frame_count(control_pipe):
    with pytest.raises(ValueError, match=r"control_video has 4 frames but num_frames=5"):
        run(control_pipe, control_video=control_frames(n=4))


def test_error_control_video_wrong_size(control_pipe):
    with pytest.raises(ValueError, match=r"control_video frames are 48x32 .* height=32, width=32"):
        run(control_pipe, control_video=control_frames(h=48, w=32))


def test_error_missing_control_video(control_pipe):
    with pytest.raises(ValueError, match="needs `control_video`"):
        run(control_pipe)


def test_error_reference_image_without_ref_conv(control_pipe):
    with pytest.raises(ValueError, match="`reference_image` needs a transformer with ref_conv"):
        run(control_pipe, control_video=control_frames(), reference_image=picture(1))


def test_error_unknown_camera_direction(parts):
    pipe = build(WanFunCameraControlPipeline, parts, make_transformer(32, camera=True), clip=True)
    with pytest.raises(ValueError, match=r"unknown camera_control_direction 'Sideways'; pass one of Left, Right"):
        run(pipe, image=picture(1), camera_control_direction="Sideways")
    with pytest.raises(ValueError, match="exactly one of `camera_control_direction`"):
        run(pipe, image=picture(1))
    with pytest.raises(ValueError, match="exactly one of `camera_control_direction`"):
        run(pipe, image=picture(1), camera_control_direction="Left",
            camera_poses=generate_camera_coordinates("Left", F))
    with pytest.raises(ValueError, match="poses has 3 rows but num_frames=5"):
        run(pipe, image=picture(1), camera_poses=generate_camera_coordinates("Left", 3))


def test_error_camera_without_adapter(parts):
    pipe = build(WanFunCameraControlPipeline, parts, make_transformer(36, clip=False), clip=False)
    with pytest.raises(ValueError, match="needs a transformer with the camera control_adapter"):
        run(pipe, image=picture(1), camera_control_direction="Left")


def test_error_missing_image_for_inpaint(parts):
    pipe = build(WanFunInpaintPipeline, parts, make_transformer(36), clip=True)
    with pytest.raises(ValueError, match="needs `image`: Fun-InP generates from a first frame"):
        run(pipe)


def test_error_wrong_checkpoint_kind(parts):
    pipe = build(WanFunInpaintPipeline, parts, make_transformer(48), clip=True)
    with pytest.raises(ValueError, match=r"in_channels=48 .*Wan2.1 Fun-Control.*use WanFunControlPipeline"):
        run(pipe, image=picture(1))
    pipe = build(WanFunControlPipeline, parts, make_transformer(36), clip=True)
    with pytest.raises(ValueError, match=r"in_channels=36 .*Fun-InP.*use WanFunInpaintPipeline"):
        run(pipe, control_video=control_frames())


def test_error_sizes_and_frames(control_pipe):
    with pytest.raises(ValueError, match="num_frames must be 4n \\+ 1"):
        run(control_pipe, control_video=control_frames(n=6), num_frames=6)
    with pytest.raises(ValueError, match="height and width must be positive multiples of 16"):
        run(control_pipe, control_video=control_frames(h=40), height=40)


def test_error_clip_model_without_image_encoder(parts):
    pipe = build(WanFunInpaintPipeline, parts, make_transformer(36), clip=False)
    with pytest.raises(ValueError, match="CLIP image branch .* no `image_encoder`"):
        run(pipe, image=picture(1))


def test_error_two_experts_without_transformer_2(parts):
    pipe = build(WanFunInpaintPipeline, parts, make_transformer(36, clip=False), clip=False, boundary_ratio=0.875)
    with pytest.raises(ValueError, match="`transformer_2` is missing"):
        run(pipe, image=picture(1))
