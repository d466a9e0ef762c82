"""Wan2.2-Dancer end to end on a tiny release in the release layout (CPU): converter, model, pipeline, example.

The release folder is written by :func:`diffusers_wan_ext.demo.make_tiny_release` as Wan-AI ships Wan-Dancer-14B
(``global_model.safetensors`` + ``local_model.safetensors`` in the original key layout, umT5 / VAE / CLIP ``.pth``,
tokenizer), only tiny.  Music and images are real files written here.  The DiT itself is checked against the
reference by the ``dit_wantodance_*`` goldens (tests/golden_runners/dancer.py); the music features need librosa
(an optional dependency): without it the file path is checked to fail with the one-line librosa message and the
pipeline runs on precomputed features.
"""

from __future__ import annotations

import importlib.util
import json
import wave

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_wan_ext import WanDancerPipeline, WanDancerTransformer3DModel
from diffusers_wan_ext.conversion.dancer import DANCER_RELEASE_FILES
from diffusers_wan_ext.conversion.dit import convert_dit_state_dict, export_dit_state_dict, load_dit_from_original
from diffusers_wan_ext.demo import make_tiny_release
from diffusers_wan_ext.models.transformer_wan_dancer import resampled_temporal_rope
from diffusers_wan_ext.pipelines import pipeline_wan_dancer
from diffusers_wan_ext.utils import ConversionError
from diffusers_wan_ext_cli import main as cli_main

from helpers import ROOT, run_python, write_pcm16_wav

H, W = 32, 64  # 2 x 4 = 8 tokens per latent frame: a multiple of the 8 music tokens per frame
SEGMENT = 9  # 30-fps frames per local segment (3 latent frames)
STEPS = 1
HAS_LIBROSA = importlib.util.find_spec("librosa") is not None


def write_wav(path, seconds: float, rate: int = 22050):
    t = np.arange(int(round(seconds * rate))) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0) + 0.1 * np.sin(2 * np.pi * 660 * t)
    return write_pcm16_wav(path, np.round(x * 32767).astype("<i2"), rate)


def write_png(path, seed: int = 0):
    rgb = (np.random.default_rng(seed).random((H, W, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def fake_features(music, name: str = "music") -> torch.Tensor:
    """Stand-in for the librosa features when librosa is missing: 30 frames per second of the file, 35 features."""
    with wave.open(str(music), "rb") as w:
        frames = int(w.getnframes() / w.getframerate() * 30) + 1
    return torch.linspace(-1, 1, frames * 35).reshape(frames, 35)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_tiny_release(tmp_path_factory.mktemp("dancer") / "Wan-Dancer-14B", arch="dancer")


@pytest.fixture(scope="module")
def folder(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("dancer-converted") / "Wan-Dancer-14B-diffusers"
    assert cli_main(["convert", str(release), str(out), "--dtype", "fp32", "--image-encoder-heads", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def pipe(folder):
    return WanDancerPipeline.from_pretrained(folder, torch_dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ conversion
def test_release_layout_converts_to_one_two_stage_folder(release, folder):
    assert sorted(p.name for p in release.glob("*.safetensors")) == sorted(DANCER_RELEASE_FILES.values())
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"][1] == "WanDancerPipeline"
    assert index["transformer"][1] == index["transformer_2"][1] == "WanDancerTransformer3DModel"
    assert json.loads((folder / "wan_variant.json").read_text())["name"] == "wan-dancer-14b"
    glob = load_file(str(release / DANCER_RELEASE_FILES["global"]))
    local = load_file(str(release / DANCER_RELEASE_FILES["local"]))
    for sub, sd in (("transformer", glob), ("transformer_2", local)):
        model = WanDancerTransformer3DModel.from_pretrained(folder / sub)
        assert list(model.config.music_inject_layers) == [0, 1] and model.ref_conv is not None
        torch.testing.assert_close(model.proj_out_global.weight, sd["head_global.head.weight"])
        torch.testing.assert_close(model.music_encoder[1].self_attn.in_proj_weight,
                                   sd["music_encoder.1.self_attn.in_proj_weight"])


def test_key_map_round_trip_keeps_every_release_key(release):
    sd = load_file(str(release / DANCER_RELEASE_FILES["global"]))
    converted = convert_dit_state_dict(sd)
    assert "music_injector.injector.0.to_q.weight" in converted and "ref_conv.weight" in converted
    assert "reference_image_embedder.ff.net.0.proj.weight" in converted
    back = export_dit_state_dict(converted)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_one_stage_variant_and_fresh_interpreter(release, folder, tmp_path):
    out = tmp_path / "global-only"
    assert cli_main(["convert", str(release), str(out), "--variant", "wan-dancer-14b-global", "--dtype", "fp32",
                     "--image-encoder-heads", "2"]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer_2"] == [None, None]
    proc = run_python(
        "import torch\nfrom diffusers import DiffusionPipeline\n"
        f"p = DiffusionPipeline.from_pretrained({str(folder)!r}, dtype=torch.float32, trust_remote_code=True)\n"
        "print(type(p).__name__, type(p.transformer).__name__, type(p.transformer_2).__name__)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WanDancerPipeline WanDancerTransformer3DModel WanDancerTransformer3DModel" in proc.stdout


def test_converter_errors_name_the_problem(release):
    sd = load_file(str(release / DANCER_RELEASE_FILES["global"]))
    cfg = json.loads((release / "config.json").read_text())
    no_injector = {k: v for k, v in sd.items() if not k.startswith("music_injector.")}
    with pytest.raises(ConversionError, match="music_injector.injector.0.q.weight"):
        load_dit_from_original(no_injector, cfg)
    with pytest.raises(ConversionError, match="wantodance_music_inject_layers"):
        load_dit_from_original(sd, dict(cfg, wantodance_music_inject_layers=[0]))
    no_clip = {k: v for k, v in sd.items() if not k.startswith("img_emb.") and ".k_img" not in k
               and ".v_img" not in k and "norm_k_img" not in k}
    with pytest.raises(ConversionError, match="img_emb"):
        load_dit_from_original(no_clip, cfg)


# ------------------------------------------------------------------------------------------------------ model
def test_resampled_temporal_rope_lands_on_the_30fps_axis():
    dim, positions = 8, 64
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    table = torch.outer(torch.arange(positions, dtype=torch.float64), inv)
    # 7.5 fps: row i at 30-fps position 4 i, the last row at total - 1 = 4 F - 1 (the reference's rule)
    cos, sin = resampled_temporal_rope(6, 7.5, dim, positions)
    rows = table[[0, 4, 8, 12, 16, 23]]
    torch.testing.assert_close(cos[:, ::2].double(), rows.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[:, ::2].double(), rows.sin(), atol=1e-5, rtol=0)
    cos30, _ = resampled_temporal_rope(6, 30.0, dim, positions)
    torch.testing.assert_close(cos30[:, ::2].double(), table[:6].cos(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        resampled_temporal_rope(40, 1.0, dim, positions)


def test_transformer_paths_and_input_errors(pipe):
    model = pipe.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 36, 2, 8, 8, generator=g)
    kw = dict(encoder_hidden_states_image=torch.randn(1, 257, 32, generator=g),
              reference_image_embeds=torch.randn(1, 257, 32, generator=g), music_features=torch.randn(20, 35),
              return_dict=False)
    text, t = torch.randn(1, 512, 32, generator=g), torch.tensor([600.0])
    with torch.no_grad():
        local = model(x, t, text, fps=30, **kw)[0]
        glob = model(x, t, text, fps=7.5, **kw)[0]
        skipped = model(x, t, text, fps=30, skip_blocks=(1,), **kw)[0]
    assert local.shape == (1, 16, 2, 8, 8)
    assert (local - glob).abs().max() > 1e-3 and (local - skipped).abs().max() > 1e-3
    with pytest.raises(ValueError, match="music_features is required"):
        model(x, t, text, **dict(kw, music_features=None))
    with pytest.raises(ValueError, match=r"\[L, 35\]"):
        model(x, t, text, **dict(kw, music_features=torch.randn(20, 7)))
    with pytest.raises(ValueError, match="music_tokens_per_frame"):
        model(torch.randn(1, 36, 2, 6, 6), t, text, **kw)


# --------------------------------------------------------------------------------------------------- pipeline
def test_pipeline_runs_both_stages_and_skips_block_9_in_the_negative_branch(pipe, tmp_path):
    seen = []

    def record(module, args, kwargs):
        seen.append((module is pipe.transformer, tuple(kwargs.get("skip_blocks", ())), kwargs["fps"]))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in (pipe.transformer, pipe.transformer_2)]
    try:
        out = pipe(image=str(write_png(tmp_path / "ref.png")), music_features=torch.randn(18, 35), prompt="dance",
                   height=H, width=W, segment_frames=SEGMENT, num_inference_steps=STEPS,
                   local_num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    finally:
        for h in handles:
            h.remove()
    # 18 feature frames = 0.6 s -> 2 keyframes at 0 and 0.53 s -> 30-fps frames 0 .. 16 in 2 segments of 9
    assert tuple(out.keyframes.shape) == (2, 3, H, W)
    assert out.frames.shape == (1, 17, H, W, 3) and np.isfinite(out.frames).all()
    assert seen[:2] == [(True, (), 7.5), (True, (9,), 7.5)]
    assert seen[2:] == [(False, (), 30.0), (False, (9,), 30.0)] * 2


def test_pipeline_bad_inputs_give_clear_errors(pipe, tmp_path):
    png = str(write_png(tmp_path / "ref.png"))
    base = dict(image=png, music_features=torch.randn(40, 35), prompt="dance", height=H, width=W)
    cases = [
        (dict(music_features=None), "exactly one of `music`"),
        (dict(height=72), "multiples of 16"),
        (dict(segment_frames=10), "segment_frames"),
        (dict(keyframe_fps=30), "keyframe_fps"),
        (dict(duration=5.0), "duration"),
        (dict(music_features=None, music=str(tmp_path / "missing.wav")), "missing.wav"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            pipe(**{**base, **change})


def test_music_file_needs_librosa_or_gives_features(tmp_path):
    wav = write_wav(tmp_path / "music.wav", 1.0)
    if not HAS_LIBROSA:
        with pytest.raises(ValueError, match="pip install librosa"):
            pipeline_wan_dancer.music_features_of(str(wav))
        return
    feats = pipeline_wan_dancer.music_features_of(str(wav))
    assert feats.shape == (31, 35) and torch.isfinite(feats).all()
    assert set(feats[:, 33].unique().tolist()) <= {0.0, 1.0} and set(feats[:, 34].unique().tolist()) <= {0.0, 1.0}


def test_example_script_writes_the_dance_with_its_music(folder, tmp_path, monkeypatch):
    """examples/wan_dancer.py on real files: wav + png in, 30-fps mp4 with the music muxed out."""
    import subprocess

    import imageio_ffmpeg
    from diffusers.utils import load_video

    if not HAS_LIBROSA:  # the librosa step is covered above; the rest of the example runs on stand-in features
        monkeypatch.setattr(pipeline_wan_dancer, "music_features", fake_features)
    spec = importlib.util.spec_from_file_location("dancer_example", ROOT / "examples" / "wan_dancer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "dance.mp4"
    example.main([str(folder), str(write_png(tmp_path / "ref.png")), str(write_wav(tmp_path / "music.wav", 0.6)),
                  "--output", str(out), "--height", str(H), "--width", str(W), "--segment-frames", str(SEGMENT),
                  "--steps", "1", "--local-steps", "1", "--dtype", "fp32"])
    assert len(load_video(str(out))) == 17  # 0.6 s -> 2 keyframes (0, 0.53 s) -> 30-fps frames 0 .. 16
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(out)], capture_output=True, text=True)
    assert "Audio:" in probe.stderr and "Video:" in probe.stderr


# ------------------------------------------------------------------------------------------- runtime options
def test_teacache_is_refused_with_the_reason(pipe):
    with pytest.raises(NotImplementedError, match="music injections between the DiT blocks"):
        pipe.enable_teacache(threshold=0.1)


def test_release_size_vram_plan_covers_both_models():
    """The VRAM planner reads the release-size Dancer DiTs (on the meta device): 14 B parameters each; the plans
    fit 80 GB and 24 GB (where the DiTs are streamed or stored in fp8)."""
    from diffusers import AutoencoderKLWan

    from diffusers_wan_ext.hooks.vram import plan_vram

    with torch.device("meta"):
        models = [WanDancerTransformer3DModel(ref_conv_in_channels=16).to(torch.bfloat16) for _ in range(2)]
        vae = AutoencoderKLWan().to(torch.bfloat16)
    # Wan2.1-I2V-14B (16.4 B with the image K/V) + 8 music injectors (0.84 B) + music encoder, global modules
    assert 17.0e9 < sum(p.numel() for p in models[0].parameters()) < 17.5e9
    for limit in (80, 24):
        plan = plan_vram(dict(transformer=models[0], transformer_2=models[1], vae=vae), f"{limit}gb")
        assert {"transformer", "transformer_2", "vae"} <= set(plan.strategies)
        assert plan.components["transformer"].weights_gib == pytest.approx(plan.components["transformer_2"].weights_gib)
        assert plan.peak_gib + plan.margin_gib <= plan.vram_limit_gib + 1e-9
    assert plan.strategies["transformer"] != "resident"  # 24 GB: streamed or fp8


def test_diffsynth_lora_reaches_the_music_injectors_and_either_model(folder, tmp_path):
    """A DiffSynth-Studio LoRA (``--lora_target_modules q,k,v,o,ffn.0,ffn.2`` also matches the music injectors'
    ``q`` / ``k`` / ``v`` / ``o``) loads into the global model, or into the local one with ``load_into_transformer_2``."""
    from safetensors.torch import save_file

    pipe = WanDancerPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    lora = {}
    for module, width in (("blocks.0.self_attn.q", 48), ("blocks.1.ffn.0", 96), ("music_injector.injector.1.o", 48)):
        lora[f"{module}.lora_A.default.weight"] = torch.randn(4, 48, generator=g) * 0.1
        lora[f"{module}.lora_B.default.weight"] = torch.randn(width, 4, generator=g) * 0.1
    save_file(lora, str(tmp_path / "dancer_lora.safetensors"))
    before = {name: getattr(pipe, name).music_injector.injector[1].to_out[0].weight.clone()
              for name in ("transformer", "transformer_2")}
    pipe.load_lora_weights(str(tmp_path / "dancer_lora.safetensors"), adapter_name="local",
                           load_into_transformer_2=True)
    pipe.fuse_lora(components=["transformer_2"])
    after = {name: getattr(pipe, name).music_injector.injector[1].to_out[0].weight for name in before}
    assert torch.equal(after["transformer"], before["transformer"])
    assert (after["transformer_2"] - before["transformer_2"]).abs().max() > 1e-3
