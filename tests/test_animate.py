"""Wan2.2-Animate: release conversion (DiT + adapter + relighting LoRA), stock / our pipeline end to end on real mp4
files, bad inputs.  Everything tiny, on CPU; the tiny release is written by ``make_tiny_release(arch="animate")``."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusers_wan_ext.utils import ConversionError

H = W = 32  # video size (multiple of 16)
FACE = 16  # the tiny motion encoder's face-crop size
SEGMENT = 5  # frames per segment (4n + 1)
N_FRAMES = 9  # two segments of 5 frames continuing from 1 frame


def _frames(rng, n, size):
    return [PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Real files as Wan-Animate's preprocessing writes them: src_ref.png, src_pose.mp4, src_face.mp4, src_bg.mp4,
    src_mask.mp4 (and the frames read back from them, which is what every route sees)."""
    from diffusers.utils import export_to_video, load_video

    d = tmp_path_factory.mktemp("animate-media")
    rng = np.random.default_rng(0)
    _frames(rng, 1, H)[0].save(d / "src_ref.png")
    videos = {"pose": _frames(rng, N_FRAMES, H), "face": _frames(rng, N_FRAMES, FACE), "bg": _frames(rng, N_FRAMES, H)}
    mask = np.zeros((N_FRAMES, H, W, 3), np.uint8)
    mask[:, 8:24, 8:24] = 255  # the person to replace
    videos["mask"] = [PIL.Image.fromarray(m) for m in mask]
    paths = {}
    for name, frames in videos.items():
        paths[name] = d / f"src_{name}.mp4"
        export_to_video([np.asarray(f) / 255.0 for f in frames], str(paths[name]), fps=8)
    read = {name: load_video(str(p)) for name, p in paths.items()}
    assert all(len(v) == N_FRAMES for v in read.values())
    return d, paths, read


@pytest.fixture(scope="module")
def folder(converted):
    return converted("animate", 1, 512)  # release text_len: stock WanAnimateTransformer3DModel


@pytest.fixture(scope="module")
def ours(folder):
    from diffusers_wan_ext import WanAnimateExtPipeline

    return WanAnimateExtPipeline.from_pretrained(folder)


def _call(pipe, **kw):
    args = dict(prompt="a dancer", height=H, width=W, segment_frame_length=SEGMENT, num_inference_steps=1,
                generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return pipe(**args).frames


# ------------------------------------------------------------------------------------------------------- conversion


def test_release_converts_to_a_stock_folder(tiny_release, folder):
    from diffusers import WanAnimatePipeline, WanAnimateTransformer3DModel

    from diffusers_wan_ext.conversion.dit import load_dit_from_original

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanAnimatePipeline"
    assert index["transformer"] == ["diffusers", "WanAnimateTransformer3DModel"]
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    assert (folder / "relighting_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "load_video" in (folder / "README.md").read_text()
    pipe = WanAnimatePipeline.from_pretrained(folder)  # stock loads it
    assert type(pipe.transformer) is WanAnimateTransformer3DModel
    cfg = pipe.transformer.config
    assert (cfg.motion_encoder_size, cfg.motion_style_dim, cfg.motion_dim, cfg.motion_encoder_dim) == (16, 32, 8, 32)
    assert (cfg.face_encoder_hidden_dim, cfg.face_encoder_num_heads, cfg.num_layers) == (16, 4, 5)
    direct = load_dit_from_original(tiny_release("animate", 1, 512))
    saved = pipe.transformer.state_dict()
    assert set(saved) == set(direct.state_dict())
    assert all(torch.equal(saved[k], v) for k, v in direct.state_dict().items())


def test_adapter_key_map_round_trips_exactly(tiny_release):
    from diffusers_wan_ext.conversion.dit import convert_dit_state_dict, export_dit_state_dict

    sd = load_file(str(tiny_release("animate", 1, 512) / "diffusion_pytorch_model.safetensors"))
    converted = convert_dit_state_dict(sd)
    assert "motion_encoder.res_blocks.1.conv_skip.weight" in converted  # release convs.2 -> res_blocks.1
    assert converted["motion_encoder.conv_in.act_fn.bias"].ndim == 1
    assert not any(k.endswith(".kernel") for k in converted)
    back = export_dit_state_dict(converted)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_text_len_other_than_512_uses_our_subclass(converted):
    from diffusers_wan_ext import WanAnimateExtPipeline, WanAnimateExtTransformer3DModel

    pipe = WanAnimateExtPipeline.from_pretrained(converted("animate", 1, 16))
    assert isinstance(pipe.transformer, WanAnimateExtTransformer3DModel) and pipe.transformer.config.text_len == 16
    assert type(pipe.transformer.blocks[0].attn2.processor).__name__ == "WanTextLenAttnProcessor"


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("face_encoder.conv2.conv.weight"), r"missing key\(s\) face_encoder\.conv2\.conv\.weight"),
        (lambda sd: sd.__setitem__("face_adapter.fuser_blocks.0.mystery.weight", torch.zeros(2)),
         r"face_adapter\.fuser_blocks\.0\.mystery\.weight"),
        (lambda sd: sd.__setitem__("motion_encoder.enc.net_app.convs.1.skip.0.kernel", torch.ones(4, 4)),
         r"convs\.1\.skip\.0\.kernel: the motion encoder's blur kernel"),
        (lambda sd: sd.pop("motion_encoder.enc.fc.4.weight"), r"missing keys motion_encoder\.motion_network\.4\.weight"),
        (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("motion_encoder.enc.fc.4.")],
         r"motion_encoder\.enc\.fc has layers \[0, 1, 2, 3\]"),
    ],
)
def test_bad_adapter_weights_are_named(tiny_release, edit, match):
    from diffusers_wan_ext.conversion.dit import load_dit_from_original

    sd = load_file(str(tiny_release("animate", 1, 512) / "diffusion_pytorch_model.safetensors"))
    edit(sd)
    with pytest.raises(ConversionError, match=match):
        load_dit_from_original(sd)


def test_config_json_must_match_the_adapter(tiny_release):
    from diffusers_wan_ext.conversion.dit import dit_config_from_state_dict

    release = tiny_release("animate", 1, 512)
    sd = load_file(str(release / "diffusion_pytorch_model.safetensors"))
    cfg = json.loads((release / "config.json").read_text())
    assert dit_config_from_state_dict(sd, cfg).arch == "animate"
    with pytest.raises(ConversionError, match=r"motion_encoder_dim=64 \(weights: 32\)"):
        dit_config_from_state_dict(sd, {**cfg, "motion_encoder_dim": 64})


def test_relighting_lora_equals_the_peft_update(tiny_release, folder):
    """The converted LoRA, loaded by Diffusers (PEFT) and fused, changes every adapted Linear by lora_B @ lora_A of
    the original ckpt -- via our loader from the original .ckpt and via stock load_lora_weights on the folder."""
    from diffusers_wan_ext import WanAnimateExtPipeline

    ours = WanAnimateExtPipeline.from_pretrained(folder)  # own instance: fusing changes weights in place
    original = torch.load(tiny_release("animate", 1, 512) / "relighting_lora.ckpt", weights_only=True)["state_dict"]
    pairs = {"blocks.1.self_attn.q": "blocks.1.attn1.to_q", "blocks.0.cross_attn.k_img": "blocks.0.attn2.add_k_proj",
             "blocks.4.ffn.2": "blocks.4.ffn.net.2", "blocks.2.cross_attn.o": "blocks.2.attn2.to_out.0"}
    t = ours.transformer
    base = {d: t.get_submodule(d).weight.detach().clone() for d in pairs.values()}
    for load in (lambda: ours.load_relighting_lora(tiny_release("animate", 1, 512) / "relighting_lora.ckpt"),
                 lambda: ours.load_lora_weights(folder, subfolder="relighting_lora", adapter_name="relighting")):
        load()
        ours.fuse_lora(adapter_names=["relighting"])
        for o, d in pairs.items():
            delta = original[f"{o}.lora_B.weight"] @ original[f"{o}.lora_A.weight"]
            torch.testing.assert_close(t.get_submodule(d).weight, base[d] + delta)
        ours.unfuse_lora()
        ours.unload_lora_weights()
        for d in pairs.values():
            torch.testing.assert_close(t.get_submodule(d).weight, base[d])


def test_relighting_lora_cli_and_errors(tiny_release, tmp_path):
    from diffusers_wan_ext_cli import main
    from diffusers_wan_ext.conversion.animate import convert_relighting_lora
    from diffusers_wan_ext.release_converter import convert_release

    ckpt = tiny_release("animate", 1, 512) / "relighting_lora.ckpt"
    assert main(["relighting-lora", str(ckpt), str(tmp_path / "lora")]) == 0
    sd = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert "transformer.blocks.0.attn2.add_v_proj.lora_B.weight" in sd and len(sd) == 5 * 12 * 2
    with pytest.raises(ConversionError, match=r"blocks\.0\.self_attn\.zz\.lora_A\.weight"):
        convert_relighting_lora({"blocks.0.self_attn.zz.lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(ConversionError, match="only the down"):
        convert_relighting_lora({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(ConversionError, match="belongs to Wan2.2-Animate"):
        convert_release(tiny_release("i2v"), tmp_path / "x", relighting_lora=ckpt, progress=False)


# ---------------------------------------------------------------------------------------------------------- pipeline


def test_animation_from_mp4_files_matches_stock(folder, ours, media):
    """Our pipeline on mp4 / png paths == stock WanAnimatePipeline on the same frames as PIL lists (two segments)."""
    from diffusers import WanAnimatePipeline

    d, paths, read = media
    video = _call(ours, image=str(d / "src_ref.png"), pose_video=paths["pose"], face_video=paths["face"])
    assert video.shape == (1, N_FRAMES, H, W, 3) and np.isfinite(video).all()
    stock = WanAnimatePipeline.from_pretrained(folder)
    ref = _call(stock, image=PIL.Image.open(d / "src_ref.png").convert("RGB"), pose_video=read["pose"],
                face_video=read["face"], mode="animate")
    np.testing.assert_array_equal(video, ref)
    # the driving videos matter (a test that ignored them would pass with any input)
    other = _call(ours, image=str(d / "src_ref.png"), pose_video=read["pose"][::-1], face_video=paths["face"])
    assert np.abs(other - video).max() > 1e-3


def test_replacement_mode_is_inferred_and_matches_stock(folder, ours, media):
    from diffusers import WanAnimatePipeline

    d, paths, read = media
    mask = np.zeros((N_FRAMES, H, W), bool)  # numpy mask input (white = generate)
    mask[:, 8:24, 8:24] = True
    video = _call(ours, image=str(d / "src_ref.png"), pose_video=paths["pose"], face_video=paths["face"],
                  inpaint_video=paths["bg"], mask_video=mask)  # DiffSynth's name for the background
    stock = WanAnimatePipeline.from_pretrained(folder)
    ref = _call(stock, image=PIL.Image.open(d / "src_ref.png").convert("RGB"), pose_video=read["pose"],
                face_video=read["face"], background_video=read["bg"],
                mask_video=[PIL.Image.fromarray(m.astype(np.uint8) * 255) for m in mask], mode="replace")
    np.testing.assert_array_equal(video, ref)
    animated = _call(ours, image=str(d / "src_ref.png"), pose_video=paths["pose"], face_video=paths["face"])
    assert np.abs(animated - video).max() > 1e-3


def test_guided_animation_matches_stock_through_the_shared_loop(folder, ours, media):
    """With classifier-free guidance (blank-face uncond pass): cfg_batching=False is stock's two forwards bit for
    bit; the default batched forward agrees closely; guidance changes the video."""
    from diffusers import WanAnimatePipeline

    d, paths, read = media
    guided = dict(guidance_scale=2.0, negative_prompt="blurry")
    stock = WanAnimatePipeline.from_pretrained(folder)
    ref = _call(stock, image=PIL.Image.open(d / "src_ref.png").convert("RGB"), pose_video=read["pose"],
                face_video=read["face"], mode="animate", **guided)
    two = _call(ours, image=str(d / "src_ref.png"), pose_video=paths["pose"], face_video=paths["face"],
                cfg_batching=False, **guided)
    np.testing.assert_array_equal(two, ref)
    batched = _call(ours, image=str(d / "src_ref.png"), pose_video=paths["pose"], face_video=paths["face"], **guided)
    np.testing.assert_allclose(batched, ref, atol=1e-4)
    unguided = _call(ours, image=str(d / "src_ref.png"), pose_video=paths["pose"], face_video=paths["face"])
    assert np.abs(unguided - ref).max() > 1e-3


def test_short_text_len_model_runs_with_its_context(converted, media):
    from diffusers_wan_ext import WanAnimateExtPipeline

    d, paths, _ = media
    pipe = WanAnimateExtPipeline.from_pretrained(converted("animate", 1, 16))
    video = _call(pipe, image=str(d / "src_ref.png"), pose_video=paths["pose"], face_video=paths["face"],
                  segment_frame_length=9)
    assert video.shape == (1, N_FRAMES, H, W, 3)
    with pytest.raises(ValueError, match="text_len=16"):
        _call(pipe, image=str(d / "src_ref.png"), pose_video=paths["pose"], face_video=paths["face"],
              max_sequence_length=512)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pose_video=None), "pose_video is required"),
        (dict(face_video=None), "face_video is required"),
        (dict(image=None), "image is required"),
        (dict(face_video="FACE8"), "pose_video has 9 frames but face_video has 8"),
        (dict(mask_video="MASK", mode="animate"), "mask_video given with mode='animate'"),
        (dict(background_video="BG", mode="replace"), "mode='replace' needs mask_video"),
        (dict(mode="swap"), "mode='swap'"),
        (dict(segment_frame_length=6), "num_frames=6 is not 4n\\+1"),
        (dict(height=40), "height=40 must be a multiple of 16"),
        (dict(prev_segment_conditioning_frames=5), "must be smaller than segment_frame_length=5"),
        (dict(pose_video="/no/such/pose.mp4"), "pose_video: no video file at"),
        (dict(background_video="BG", inpaint_video="BG"), "not both"),
        (dict(prompt_embeds=torch.zeros(1, 7, 32), prompt=None), "prompt_embeds has 7 tokens"),
    ],
)
def test_bad_inputs_raise_clear_errors(ours, media, kwargs, match):
    d, paths, read = media
    args = dict(image=str(d / "src_ref.png"), pose_video=paths["pose"], face_video=paths["face"])
    subst = {"FACE8": read["face"][:8], "MASK": paths["mask"], "BG": paths["bg"]}
    args.update({k: subst.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()})
    with pytest.raises(ValueError, match=match):
        _call(ours, **args)


def test_teacache_is_refused(ours):
    with pytest.raises(NotImplementedError, match="Wan2.2-Animate"):
        ours.enable_teacache(0.1)


@pytest.mark.slow
def test_fresh_interpreter_loads_the_converted_folder(converted):
    """Without importing diffusers_wan_ext: the release-width folder is plain stock; the text_len=16 folder loads our
    transformer through the shim (trust_remote_code)."""
    from helpers import run_python

    code = f"""
from diffusers import DiffusionPipeline
p = DiffusionPipeline.from_pretrained({str(converted("animate", 1, 512))!r})
q = DiffusionPipeline.from_pretrained({str(converted("animate", 1, 16))!r}, trust_remote_code=True)
print(type(p).__name__, type(p.transformer).__name__, type(q.transformer).__name__)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-3:] == ["WanAnimatePipeline", "WanAnimateTransformer3DModel",
                                     "WanAnimateExtTransformer3DModel"]


def test_example_script_replaces_with_relighting(folder, media, tmp_path):
    """examples/animate.py on the preprocessing layout (src_ref.png, src_*.mp4), replacement mode + relighting LoRA."""
    import importlib.util

    from helpers import ROOT

    d, _, _ = media
    spec = importlib.util.spec_from_file_location("animate_example", ROOT / "examples" / "animate.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "replace.mp4"
    example.main([str(folder), str(d), "--replace", "--output", str(out), "--height", str(H), "--width", str(W),
                  "--segment-frames", str(SEGMENT), "--steps", "1", "--dtype", "fp32", "--fps", "8"])
    from diffusers.utils import load_video

    assert len(load_video(str(out))) == N_FRAMES


def test_cli_generate_animates_from_files(folder, media, tmp_path):
    from diffusers.utils import load_video

    from diffusers_wan_ext_cli import main

    d, paths, _ = media
    out = tmp_path / "animate.mp4"
    assert main(["generate", "--model", str(folder), "--prompt", "a dancer", "--image", str(d / "src_ref.png"),
                 "--pose-video", str(paths["pose"]), "--face-video", str(paths["face"]), "--height", str(H),
                 "--width", str(W), "--num-frames", str(SEGMENT), "--steps", "1", "--dtype", "fp32",
                 "--device", "cpu", "--output", str(out)]) == 0
    assert len(load_video(str(out))) == N_FRAMES


def test_other_adapter_widths_convert_from_shapes():
    """Nothing assumes the release (or the tiny release's) widths: a model with other heads, depth, face size, channel
    table and encoder widths exported to the original layout converts back to the same config and forward."""
    from diffusers import WanAnimateTransformer3DModel

    from diffusers_wan_ext.conversion.dit import export_dit_state_dict, load_dit_from_original

    torch.manual_seed(0)
    cfg = dict(num_attention_heads=4, attention_head_dim=16, in_channels=36, latent_channels=16, out_channels=16,
               text_dim=24, freq_dim=16, ffn_dim=80, num_layers=10, image_dim=20, added_kv_proj_dim=64,
               motion_encoder_channel_sizes={"32": 4, "16": 8, "8": 8, "4": 12}, motion_encoder_size=32,
               motion_style_dim=12, motion_dim=6, motion_encoder_dim=10, face_encoder_hidden_dim=8,
               face_encoder_num_heads=3)
    ref = WanAnimateTransformer3DModel(**cfg).eval()
    for p in ref.parameters():  # stock initialises some modules to zero: make every path live
        p.data.normal_(0, 0.2)
    model = load_dit_from_original(export_dit_state_dict(ref.state_dict()))
    for k in ("motion_encoder_size", "motion_style_dim", "motion_dim", "motion_encoder_dim", "face_encoder_hidden_dim",
              "face_encoder_num_heads", "num_attention_heads", "num_layers", "image_dim"):
        assert model.config[k] == cfg[k], k
    assert {k: int(v) for k, v in model.config.motion_encoder_channel_sizes.items()} == cfg["motion_encoder_channel_sizes"]
    x = dict(hidden_states=torch.randn(1, 36, 3, 4, 4), timestep=torch.tensor([500.0]),
             encoder_hidden_states=torch.randn(1, 512, 24), encoder_hidden_states_image=torch.randn(1, 257, 20),
             pose_hidden_states=torch.randn(1, 16, 2, 4, 4), face_pixel_values=torch.randn(1, 3, 5, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(**x).sample, ref(**x).sample)
