"""Release folders -> Diffusers folders: every variant of the foundation issue, tiny, end to end on CPU."""

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_wan_ext.conversion.dit import convert_dit_state_dict
from diffusers_wan_ext.release_converter import convert_release
from diffusers_wan_ext.utils import ConversionError

GEN = dict(height=32, width=32, num_frames=5, num_inference_steps=2, max_sequence_length=16, output_type="pt")


def _image(size=32, seed=0):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _run(pipe, **kw):
    out = pipe(prompt="a red fox", negative_prompt="blur", generator=torch.Generator().manual_seed(0), **GEN, **kw)
    return out.frames


@pytest.mark.parametrize(
    "arch,experts,pipeline,extra",
    [
        ("t2v", 1, "WanPipeline", {}),
        ("i2v", 1, "WanImageToVideoPipeline", {"image": True}),
        ("flf2v", 1, "WanImageToVideoPipeline", {"image": True, "last_image": True}),
        ("ti2v", 1, "WanPipeline", {}),
        ("t2v", 2, "WanPipeline", {}),
        ("i2v-noclip", 2, "WanImageToVideoPipeline", {"image": True}),
    ],
    ids=["t2v", "i2v", "flf2v", "ti2v-t2v", "t2v-a14b", "i2v-a14b"],
)
def test_convert_and_run(converted, arch, experts, pipeline, extra):
    folder = converted(arch, experts)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == pipeline
    if experts == 2:
        assert index["transformer_2"][1] == "WanTransformer3DModel" and index["boundary_ratio"] in (0.875, 0.9)
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert type(pipe).__name__ == pipeline
    kw = {}
    if extra.get("image"):
        kw["image"] = _image()
    if extra.get("last_image"):
        kw["last_image"] = _image(seed=1)
    frames = _run(pipe, **kw)
    assert frames.shape == (1, GEN["num_frames"], 3, GEN["height"], GEN["width"]) and torch.isfinite(frames).all()


def test_ti2v_image_to_video(converted):
    """TI2V-5B folders also run image-to-video through the stock I2V pipeline (per-token timesteps)."""
    from diffusers import WanImageToVideoPipeline

    folder = converted("ti2v")
    assert json.loads((folder / "model_index.json").read_text())["expand_timesteps"] is True
    pipe = WanImageToVideoPipeline.from_pretrained(str(folder))
    frames = pipe(prompt="a fox", image=_image(), generator=torch.Generator().manual_seed(0),
                  **{**GEN, "height": 32, "width": 32}).frames
    assert frames.shape[1] == GEN["num_frames"] and torch.isfinite(frames).all()


def test_variant_flag_must_match_weights(tiny_release, tmp_path):
    with pytest.raises(ConversionError, match="wan2.1-i2v-14b-480p"):
        convert_release(tiny_release("t2v"), tmp_path / "out", variant="wan2.1-i2v-14b-480p", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("component", ["models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google"])
def test_missing_component_is_an_error_and_writes_nothing(tiny_release, tmp_path, component):
    src = tmp_path / "release"
    shutil.copytree(tiny_release("t2v"), src)
    target = src / component
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ConversionError, match="missing component"):
        convert_release(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_clip_for_i2v(tiny_release, tmp_path):
    src = tmp_path / "release"
    shutil.copytree(tiny_release("i2v"), src)
    (src / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth").unlink()
    with pytest.raises(ConversionError, match="image_encoder"):
        convert_release(src, tmp_path / "out", progress=False, image_encoder_heads=2)
    assert not (tmp_path / "out").exists()


def test_truncated_dit_writes_nothing(tiny_release, tmp_path):
    src = tmp_path / "release"
    shutil.copytree(tiny_release("t2v"), src)
    f = src / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ConversionError, match="truncated"):
        convert_release(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_keys_write_nothing(tiny_release, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "release"
    shutil.copytree(tiny_release("t2v"), src)
    f = src / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["blocks.0.strange_layer.weight"] = torch.zeros(3)
    save_file(sd, str(f))
    with pytest.raises(ConversionError, match="strange_layer"):
        convert_release(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_wrong_vae_for_variant(tiny_release, tmp_path):
    src = tmp_path / "release"
    shutil.copytree(tiny_release("t2v"), src)
    (src / "Wan2.1_VAE.pth").unlink()
    shutil.copy(tiny_release("ti2v") / "Wan2.2_VAE.pth", src / "Wan2.2_VAE.pth")
    with pytest.raises(ConversionError, match="wan2.1 VAE"):
        convert_release(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_destination_is_kept(tiny_release, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert_release(tiny_release("t2v"), dst, progress=False)
    assert (dst / "keep.txt").read_text() == "mine"


def test_sharded_dit_and_bf16(tiny_release, tmp_path):
    """A sharded original DiT (index + shards) converts like the single file; --dtype bf16 casts the weights."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "release"
    shutil.copytree(tiny_release("t2v"), src)
    f = src / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    f.unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(src / name))
        weight_map.update({k: name for k in ks})
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = convert_release(src, tmp_path / "out", dtype="bf16", transformer_only=True, progress=False)
    saved = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert saved["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert saved["scale_shift_table"].dtype == torch.float32  # kept in fp32 like Diffusers' _keep_in_fp32_modules
    ref = convert_dit_state_dict(sd)
    assert all(torch.equal(saved[k].float(), ref[k].to(saved[k].dtype).float()) for k in ref)


def test_cli_convert(tiny_release, tmp_path, capsys):
    from diffusers_wan_ext_cli import main

    assert main(["convert", str(tiny_release("t2v")), str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    assert (tmp_path / "out" / "model_index.json").exists()
    assert main(["convert", str(tiny_release("t2v")), str(tmp_path / "out2"), "--variant", "wan2.2-ti2v-5b"]) == 2
    assert "wan2.2-ti2v-5b" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("scheduler,cls", [("euler", "FlowMatchEulerDiscreteScheduler"),
                                           ("diffsynth", "WanFlowMatchScheduler"),
                                           ("original-unipc", "WanFlowUniPCScheduler")])
def test_scheduler_options(converted, scheduler, cls):
    import diffusers_wan_ext  # noqa: F401  (our schedulers)

    folder = converted("t2v", 1, 512, scheduler)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"][1] == cls
    if cls.startswith("Wan"):
        assert index["scheduler"][0] == "diffusers_wan_ext"
        assert (folder / "scheduler" / "diffusers_wan_ext.py").exists()  # shim for trust_remote_code loading
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert type(pipe.scheduler).__name__ == cls
    assert torch.isfinite(_run(pipe)).all()


def test_reference_i2v_pipeline_uses_reference_clip_preprocessing(converted):
    """WanImageToVideoReferencePipeline: CLIP features = wan_clip_preprocess (torch bicubic to 224, no crop)."""
    from diffusers_wan_ext.conversion.image_encoder import clip_image_features, wan_clip_preprocess
    from diffusers_wan_ext.pipelines import WanImageToVideoReferencePipeline

    pipe = WanImageToVideoReferencePipeline.from_pretrained(str(converted("i2v")))
    img = _image(seed=3)
    pipe._reference_call = {"height": 32, "width": 32}
    feats = pipe.encode_image(img)
    x = pipe.video_processor.preprocess(img, height=32, width=32)
    want = clip_image_features(pipe.image_encoder, wan_clip_preprocess(x, pipe.image_encoder.config.image_size))
    assert torch.equal(feats, want) and feats.shape[1] == 257
    pipe._reference_call = None
    frames = _run(pipe, image=img)
    assert torch.isfinite(frames).all()
