"""Video-As-Prompt: converter (release ``_mot_ref`` layout <-> ours), model semantics, a tiny Diffusers-format release
converted and run end to end on CPU (real PNG / MP4 inputs and output), CFG batching, and input errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers_wan_ext import WanVideoAsPromptPipeline, WanVideoAsPromptTransformer3DModel
from diffusers_wan_ext.conversion.vap import (
    convert_vap_release,
    convert_vap_state_dict,
    export_vap_state_dict,
    load_vap_transformer,
    release_vap_layers,
    vap_config_from_state_dict,
)
from diffusers_wan_ext.pipelines.fun_conditioning import i2v_condition
from diffusers_wan_ext.utils.media import encode_video, load_image, load_video_frames
from diffusers_wan_ext.pipelines.pipeline_wan_video_as_prompt import select_reference_frames
from diffusers_wan_ext.utils.io import ConversionError
from test_fun_pipelines import CLIP_DIM, Spy, make_clip, make_text_parts, make_vae, picture

H = W = 32
F = 5
LAYERS = [0, 2]
GOLDEN_WEIGHTS = "dit_vap/weights.safetensors"


def tiny_model(seed=0, text_len=512):
    torch.manual_seed(seed)
    model = WanVideoAsPromptTransformer3DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=36, text_dim=32, freq_dim=32, ffn_dim=96,
        num_layers=3, image_dim=CLIP_DIM, added_kv_proj_dim=48, text_len=text_len, vap_layers=LAYERS,
    ).eval()
    with torch.no_grad():  # stock inits leave some tables at zero: make every path live
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def release_config(model):
    cfg = {k: v for k, v in model.config.items() if not k.startswith("_") and k not in ("text_len", "vap_layers")}
    cfg.update(_class_name="WanTransformer3DMOTModel", _diffusers_version="0.33.0.dev0",
               block_idx_with_mot_ref=list(model.config.vap_layers), attention_head_dim_mot_ref=None,
               reference_train_mode=None)
    return cfg


def inputs(seed=1, frames=3, ref_frames=3, text=16):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(hidden_states=r(1, 36, frames, 4, 4), timestep=torch.tensor([700.0]),
                encoder_hidden_states=r(1, text, 32), encoder_hidden_states_image=r(1, 257, CLIP_DIM),
                vap_hidden_states=r(1, 36, ref_frames, 4, 4), vap_encoder_hidden_states=r(1, text, 32),
                vap_encoder_hidden_states_image=r(1, 257, CLIP_DIM))


# ------------------------------------------------------------------------------------------------- converter
def _golden_layers(sd: dict) -> list[int]:
    """The fixture's reference-stream layers (``blocks.N.*_mot_ref``), never this set's [0, 2]."""
    layers = release_vap_layers(sd)
    assert layers, "the dit_vap fixture has no blocks.N.*_mot_ref keys"
    return layers


def test_release_layout_round_trip_is_exact(goldens_dir):
    sd = load_file(str(goldens_dir / GOLDEN_WEIGHTS))
    layers = _golden_layers(sd)
    ours = convert_vap_state_dict(sd)
    assert not any("_mot_ref" in k for k in ours)
    last = len(layers) - 1  # vap_blocks.i is the reference block of release layer layers[i]
    assert f"vap_blocks.{last}.attn1.to_q.weight" in ours and "vap_blocks.0.scale_shift_table" in ours
    torch.testing.assert_close(ours[f"vap_blocks.{last}.ffn.net.2.weight"],
                               sd[f"blocks.{layers[-1]}.ffn_mot_ref.net.2.weight"])
    back = export_vap_state_dict(ours, layers)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_converter_errors_name_the_problem(goldens_dir):
    sd = load_file(str(goldens_dir / GOLDEN_WEIGHTS))
    layers = _golden_layers(sd)
    heads = json.loads((goldens_dir / "dit_vap" / "manifest.json").read_text())["original_config"].get(
        "num_attention_heads")
    if heads is None:
        pytest.skip("the dit_vap manifest states no num_attention_heads")
    head_dim = sd["blocks.0.attn1.to_q.weight"].shape[0] // heads
    with pytest.raises(ConversionError, match="blocks.0.mystery_mot_ref.weight"):
        convert_vap_state_dict({**sd, "blocks.0.mystery_mot_ref.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="reference_independent.*proj_out_mot_ref"):
        convert_vap_state_dict({**sd, "proj_out_mot_ref.weight": torch.zeros(1)})
    wrong = [i for i in range(len(layers) + 1) if i not in layers][:1] + layers[1:]  # one layer that has none
    with pytest.raises(ConversionError, match=re.escape(f"block_idx_with_mot_ref {wrong}") + ".*"
                       + re.escape(f"layers {layers}")):
        vap_config_from_state_dict(sd, {"num_attention_heads": heads, "block_idx_with_mot_ref": wrong})
    with pytest.raises(ConversionError, match="attention_head_dim_mot_ref"):
        vap_config_from_state_dict(sd, {"num_attention_heads": heads, "attention_head_dim": head_dim,
                                        "attention_head_dim_mot_ref": head_dim // 2})
    main_only = {k: v for k, v in sd.items() if "_mot_ref" not in k}
    with pytest.raises(ConversionError, match="no reference-stream weights"):
        vap_config_from_state_dict(main_only, {"num_attention_heads": heads})
    gone = f"blocks.{layers[-1]}.attn1_mot_ref.to_q.weight"
    missing = {k: v for k, v in sd.items() if k != gone}
    with pytest.raises(ConversionError, match=f"missing keys vap_blocks.{len(layers) - 1}.attn1.to_q.weight"):
        load_vap_transformer(missing, {"num_attention_heads": heads}, text_len=16)


@pytest.fixture(scope="module")
def goldens_dir():
    from golden_runners.core import GOLDENS_DIR

    if not (GOLDENS_DIR / GOLDEN_WEIGHTS).is_file():
        pytest.skip(f"no dit_vap fixture under {GOLDENS_DIR}")
    return GOLDENS_DIR


# ------------------------------------------------------------------------------------------------- model
def test_without_reference_it_is_the_stock_i2v_model():
    model = tiny_model(text_len=16)
    stock = WanTransformer3DModel(**{k: v for k, v in model.config.items()
                                     if not k.startswith("_") and k not in ("text_len", "vap_layers")}).eval()
    from diffusers_wan_ext.models.attention_processor import WanTextLenAttnProcessor

    for block in stock.blocks:
        block.attn2.set_processor(WanTextLenAttnProcessor(16))
    missing, _ = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    x = inputs()
    main = {k: x[k] for k in ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")}
    with torch.no_grad():
        torch.testing.assert_close(model(**main, return_dict=False)[0], stock(**main, return_dict=False)[0])
        with_ref = model(**x, return_dict=False)[0]
    assert (with_ref - stock(**main, return_dict=False)[0]).abs().max() > 1e-3  # the reference stream is live


def test_reference_stream_semantics():
    model = tiny_model(text_len=16)
    x = inputs()
    with torch.no_grad():
        base = model(**x, return_dict=False)[0]
        # default vap_timestep is the clean timestep 1, whatever the main timestep
        torch.testing.assert_close(base, model(**x, vap_timestep=torch.ones(1), return_dict=False)[0])
        assert (base - model(**x, vap_timestep=torch.zeros(1), return_dict=False)[0]).abs().max() > 1e-4
        # a reference of another length works (frame positions -F_ref..-1) and changes the result
        longer = model(**{**x, "vap_hidden_states": torch.randn(1, 36, 5, 4, 4)}, return_dict=False)[0]
        assert longer.shape == base.shape and (longer - base).abs().max() > 1e-4
        # a batch-1 reference broadcasts over a batch of 2 latents
        two = {**x, "hidden_states": x["hidden_states"].repeat(2, 1, 1, 1, 1), "timestep": x["timestep"].repeat(2),
               "encoder_hidden_states": x["encoder_hidden_states"].repeat(2, 1, 1),
               "encoder_hidden_states_image": x["encoder_hidden_states_image"].repeat(2, 1, 1)}
        torch.testing.assert_close(model(**two, return_dict=False)[0], base.repeat(2, 1, 1, 1, 1))
    rope_cos, rope_sin = model.vap_rotary_emb(x["vap_hidden_states"])
    t = model.rope.t_dim
    main_cos, main_sin = model.rope(torch.zeros(1, 1, 3, 4, 4))
    # frame -1 of the reference = frame +1 of the main stream mirrored: same cos, opposite sin (temporal dims only)
    per_frame = 2 * 2
    torch.testing.assert_close(rope_cos[0, 2 * per_frame, 0, :t], main_cos[0, per_frame, 0, :t])
    torch.testing.assert_close(rope_sin[0, 2 * per_frame, 0, :t], -main_sin[0, per_frame, 0, :t])
    torch.testing.assert_close(rope_cos[0, :per_frame, 0, t:], main_cos[0, :per_frame, 0, t:])


def test_every_block_runs_its_own_forward():
    """The joint attention lives in attention processors, so every block (main and reference) runs through its
    stock forward: block-level hooks (group offloading, step caches, regional compile) see all of them."""
    model = tiny_model(text_len=16)
    calls = []
    named = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    named += [(f"vap_blocks.{k}", b) for k, b in enumerate(model.vap_blocks)]
    handles = [b.register_forward_pre_hook(lambda m, a, name=name: calls.append(name)) for name, b in named]
    with torch.no_grad():
        model(**inputs())
    for h in handles:
        h.remove()
    assert calls == ["blocks.0", "vap_blocks.0", "blocks.1", "blocks.2", "vap_blocks.1"]
    with pytest.raises(RuntimeError, match="inside its DiT layer"):
        model.vap_blocks[0](torch.randn(1, 4, 48), torch.randn(1, 273, 48), torch.randn(1, 6, 48),
                            model.vap_rotary_emb(torch.zeros(1, 36, 1, 4, 4)))


def test_model_input_errors():
    model = tiny_model(text_len=16)
    x = inputs()
    with pytest.raises(ValueError, match="vap_hidden_states must be"):
        model(**{**x, "vap_hidden_states": torch.randn(1, 16, 3, 4, 4)})
    with pytest.raises(ValueError, match="latent size"):
        model(**{**x, "vap_hidden_states": torch.randn(1, 36, 3, 8, 8)})
    with pytest.raises(ValueError, match="vap_encoder_hidden_states_image"):
        model(**{**x, "vap_encoder_hidden_states_image": None})
    with pytest.raises(ValueError, match="without vap_hidden_states"):
        model(**{**x, "vap_hidden_states": None})
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model.set_attn_processor(WanAttnProcessor())
    with pytest.raises(ValueError, match="MoT layers \\[0, 2\\] were replaced"):
        model(**x)
    with pytest.raises(ValueError, match="vap_layers"):
        WanVideoAsPromptTransformer3DModel(num_attention_heads=2, attention_head_dim=24, num_layers=3,
                                           vap_layers=[0, 4])


def test_select_reference_frames():
    assert select_reference_frames(list(range(10)), 4) == [0, 3, 6, 9]
    assert select_reference_frames(list(range(3)), 5) == [0, 0, 1, 1, 2]
    assert select_reference_frames(list(range(10)), 4, "first") == [0, 1, 2, 3]
    assert select_reference_frames(np.arange(10), 4).tolist() == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="fewer than num_frames"):
        select_reference_frames(list(range(3)), 5, "first")
    with pytest.raises(ValueError, match="vap_frames_selection"):
        select_reference_frames(list(range(3)), 5, "random")


# ------------------------------------------------------------------------------------------------- release folder
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny ByteDance-layout release folder (Diffusers components + WanTransformer3DMOTModel transformer)."""
    root = tmp_path_factory.mktemp("vap") / "Video-As-Prompt-tiny"
    tokenizer, text_encoder = make_text_parts(root.parent / "tok")
    processor, clip = make_clip()
    model = tiny_model()
    (root / "transformer").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in export_vap_state_dict(model.state_dict(), LAYERS).items()},
              str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    (root / "transformer" / "config.json").write_text(json.dumps(release_config(model)))
    make_vae().save_pretrained(root / "vae")
    text_encoder.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    clip.save_pretrained(root / "image_encoder")
    processor.save_pretrained(root / "image_processor")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanImageToVideoMOTPipeline", "_diffusers_version": "0.33.0.dev0",
        "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "image_encoder": ["transformers", "CLIPVisionModel"],
        "image_processor": ["transformers", "CLIPImageProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "WanTransformer3DMOTModel"]}))
    return root, model


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    from diffusers_wan_ext.release_converter import convert_release

    root, _ = release
    return convert_release(root, tmp_path_factory.mktemp("vap-out") / "converted", dtype="fp32", progress=False)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A PNG first frame and an MP4 reference video written to disk (7 frames, resampled to F by the pipeline)."""
    import imageio.v3 as iio

    d = tmp_path_factory.mktemp("media")
    picture(3, size=(48, 40)).save(d / "image.png")
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    frames = np.stack([np.roll(base, 3 * i, axis=1) for i in range(7)])
    iio.imwrite(d / "reference.mp4", frames, fps=8, codec="libx264", macro_block_size=1)
    return d / "image.png", d / "reference.mp4"


def test_converted_release_loads_and_keeps_the_weights(release, converted):
    _, model = release
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_wan_ext", "WanVideoAsPromptPipeline"]
    assert index["transformer"] == ["diffusers_wan_ext", "WanVideoAsPromptTransformer3DModel"]
    pipe = DiffusionPipeline.from_pretrained(converted)
    assert isinstance(pipe, WanVideoAsPromptPipeline)
    assert isinstance(pipe.transformer, WanVideoAsPromptTransformer3DModel)
    assert pipe.transformer.config.vap_layers == LAYERS and pipe.transformer.config.text_len == 512
    theirs = pipe.transformer.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())


def test_training_from_the_release_loads_the_converted_folders_components(release, converted):
    """``--model_path`` the ByteDance release folder: the trainer converts it and trains the same MoT transformer
    (class and weights) with the same encoders as from the converted folder."""
    from diffusers_wan_ext.training.components import load_training_components

    root, _ = release
    from_release = load_training_components(root, dtype=torch.float32)
    from_folder = load_training_components(converted, dtype=torch.float32)
    assert from_release.pipeline_class == from_folder.pipeline_class == "WanVideoAsPromptPipeline"
    for name in ("transformer", "text_encoder", "vae", "image_encoder"):
        a, b = getattr(from_release, name), getattr(from_folder, name)
        assert type(a) is type(b), name
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert isinstance(from_release.transformer, WanVideoAsPromptTransformer3DModel)


def test_pipeline_end_to_end_on_cpu(converted, media, tmp_path):
    from diffusers.utils import export_to_video, load_video

    image_path, video_path = media
    pipe = DiffusionPipeline.from_pretrained(converted)
    spy = Spy(pipe.transformer, cfg_batch=1)
    frames = pipe(image=Image.open(image_path), prompt="a fox turns into a balloon", negative_prompt="blurry",
                  vap_video=str(video_path), vap_prompt="a shoe turns into a balloon", height=H, width=W,
                  num_frames=F, num_inference_steps=2, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0)).frames[0]
    spy.remove()
    assert frames.shape == (F, H, W, 3) and np.isfinite(frames).all()
    out = export_to_video(list(frames), str(tmp_path / "vap.mp4"), fps=8)
    assert len(load_video(out)) == F

    # what reached the transformer, rebuilt independently from the files
    assert len(spy.calls) == 4  # 2 steps x (cond, uncond)
    cond, uncond = spy.calls[0], spy.calls[1]
    ref = load_video_frames([f.resize((W, H)) for f in select_reference_frames(load_video(str(video_path)), F)],
                            F, H, W)
    with torch.no_grad():
        want = torch.cat([encode_video(pipe.vae, ref), i2v_condition(pipe.vae, ref[:, :, 0], F)], dim=1)
        y = i2v_condition(pipe.vae, load_image(Image.open(image_path), H, W), F)
    torch.testing.assert_close(cond["vap_hidden_states"], want)
    torch.testing.assert_close(cond["hidden_states"][:, 16:], y)
    torch.testing.assert_close(uncond["vap_hidden_states"], want)
    clip_ref = pipe.encode_clip_image(ref[:, :, 0])
    torch.testing.assert_close(cond["vap_encoder_hidden_states_image"], clip_ref)
    with torch.no_grad():
        vap_pos, vap_neg = pipe.encode_prompt("a shoe turns into a balloon", "blurry", max_sequence_length=512)
    torch.testing.assert_close(cond["vap_encoder_hidden_states"], vap_pos)
    torch.testing.assert_close(uncond["vap_encoder_hidden_states"], vap_neg)  # negative_vap_prompt = negative_prompt
    assert not torch.allclose(cond["encoder_hidden_states"], uncond["encoder_hidden_states"])


def test_cfg_batching_matches_two_forwards(converted, media):
    image_path, video_path = media
    pipe = DiffusionPipeline.from_pretrained(converted)
    kw = dict(image=Image.open(image_path), prompt="a fox", negative_prompt="blurry", vap_video=str(video_path),
              vap_prompt="a shoe", negative_vap_prompt="static", height=H, width=W, num_frames=F,
              num_inference_steps=2, guidance_scale=4.0, output_type="latent")
    spy = Spy(pipe.transformer)
    pipe.cfg_batching = False
    two = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    pipe.cfg_batching = True
    one = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames
    spy.remove()
    assert len(spy.calls) == 4 + 2  # two forwards per step, then one batched forward per step
    assert spy.calls[-1]["hidden_states"].shape[0] == 2
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-5)
    pipe.cfg_batching = False
    other = pipe(**{**kw, "negative_vap_prompt": "blurry"}, generator=torch.Generator().manual_seed(0)).frames
    assert (other - two).abs().max() > 1e-6  # the negative reference prompt reaches the unconditional pass


def test_pipeline_input_errors(converted, media):
    image_path, video_path = media
    pipe = DiffusionPipeline.from_pretrained(converted)
    kw = dict(image=Image.open(image_path), prompt="a fox", vap_video=str(video_path), height=H, width=W,
              num_frames=F, num_inference_steps=1)
    with pytest.raises(ValueError, match="needs `vap_video`"):
        pipe(**{**kw, "vap_video": None})
    with pytest.raises(ValueError, match="needs `image`"):
        pipe(**{**kw, "image": None})
    with pytest.raises(ValueError, match="single image"):
        pipe(**{**kw, "vap_video": Image.open(image_path)})
    with pytest.raises(ValueError, match="no video file"):
        pipe(**{**kw, "vap_video": "missing.mp4"})
    with pytest.raises(ValueError, match="vap_frames_selection"):
        pipe(**kw, vap_frames_selection="random")
    with pytest.raises(ValueError, match="`vap_prompt` must be a string"):
        pipe(**kw, vap_prompt=["a", "b"])
    with pytest.raises(ValueError, match="num_frames must be 4n"):
        pipe(**{**kw, "num_frames": 6})
    with pytest.raises(ValueError, match=r"vap_video frames are 16x16"):
        pipe(**kw | {"vap_video": np.zeros((5, 16, 16, 3), np.uint8)})
    stock = WanVideoAsPromptPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
        image_processor=pipe.image_processor, image_encoder=pipe.image_encoder,
        transformer=WanTransformer3DModel(num_attention_heads=2, attention_head_dim=24, in_channels=36, text_dim=32,
                                          freq_dim=32, ffn_dim=96, num_layers=1, image_dim=CLIP_DIM,
                                          added_kv_proj_dim=48),
    )
    with pytest.raises(ValueError, match="needs a Video-As-Prompt transformer"):
        stock(**kw)


def test_convert_vap_release_errors(tmp_path, release):
    root, _ = release
    with pytest.raises(ConversionError, match="not a Video-As-Prompt release"):
        convert_vap_release(tmp_path, tmp_path / "out")
    broken = tmp_path / "broken"
    (broken / "transformer").mkdir(parents=True)
    (broken / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DMOTModel"}))
    with pytest.raises(ConversionError, match="missing component folder"):
        convert_vap_release(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_converted_folder_in_a_fresh_interpreter(converted, media):
    """An interpreter that never imported the package loads the folder through its shim (trust_remote_code)."""
    from helpers import run_python

    image_path, video_path = media
    code = f"""
import numpy as np, torch
from PIL import Image
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(converted)!r}, trust_remote_code=True)
assert type(pipe).__name__ == "WanVideoAsPromptPipeline", type(pipe).__name__
assert type(pipe.transformer).__name__ == "WanVideoAsPromptTransformer3DModel"
out = pipe(image=Image.open({str(image_path)!r}), prompt="a fox", vap_video={str(video_path)!r}, vap_prompt="a shoe",
           height={H}, width={W}, num_frames={F}, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).frames
assert out.shape == (1, {F}, {H}, {W}, 3) and np.isfinite(out).all()
print("ok")
"""
    result = run_python(code)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
