"""Wan2.2-S2V end to end on a tiny original-layout release (CPU): converter, audio features, transformer, pipeline.

The release folder is written by :func:`diffusers_wan_ext.demo.make_tiny_release` exactly as Wan-AI ships
Wan2.2-S2V-14B (DiT safetensors + ``config.json``, umT5 / VAE ``.pth``, tokenizer, and the
``wav2vec2-large-xlsr-53-english/`` folder with legacy ``weight_g`` / ``weight_v`` names), only tiny.  Audio, images
and videos are real files written here (``wave`` for WAV, imageio-ffmpeg for mp4).  The DiT itself is checked against
the reference by the ``dit_s2v`` golden (tests/golden_runners/s2v.py).
"""

from __future__ import annotations

import json
import math
import shutil
import wave

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers_wan_ext import WanS2VTransformer3DModel, WanSpeechToVideoPipeline
from diffusers_wan_ext.conversion.dit import convert_dit_state_dict, export_dit_state_dict, load_dit_from_original
from diffusers_wan_ext.release_converter import convert_release
from diffusers_wan_ext.demo import WAV2VEC_DIR, write_video
from diffusers_wan_ext.models.transformer_wan_s2v import audio_injector_layout
from diffusers_wan_ext.pipelines.s2v_conditioning import (
    AUDIO_FEATURE_FPS,
    bucket_audio_features,
    load_audio,
    wav2vec_features,
)
from diffusers_wan_ext.utils import ConversionError

from helpers import run_python

H = W = 64  # the FramePack 4x group needs latent sizes >= 8
CLIP = 8  # video frames per clip (2 latent frames)
FPS = 16
SR = 16000
STEPS = 2


# ---------------------------------------------------------------------------------------------------- files
def write_wav(path, seconds: float, rate: int = SR, channels: int = 1, freq: float = 220.0):
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    mono = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    data = np.stack([mono * (1 - 0.2 * c) for c in range(channels)], axis=1)
    pcm = np.round(data * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path, pcm


def write_png(path, seed: int = 0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(path)
    return path


def write_mp4(path, frames: int, seed: int = 0):
    yy, xx = np.mgrid[0:H, 0:W]
    video = [((np.stack([xx + 4 * i, yy, xx + yy], -1) * 2 + seed) % 256).astype(np.uint8) for i in range(frames)]
    return write_video([Image.fromarray(f) for f in video], path, fps=FPS)


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def release(tiny_release):
    return tiny_release("s2v")


@pytest.fixture(scope="module")
def folder(converted):
    return converted("s2v")


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def call_kwargs(**kw):
    base = dict(prompt="a person is singing", negative_prompt="blurry", height=H, width=W, num_frames_per_clip=CLIP,
                fps=FPS, num_inference_steps=STEPS, guidance_scale=4.5, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0))
    base.update(kw)
    return base


# ------------------------------------------------------------------------------------------------ converter
def test_release_converts_to_a_speech_to_video_folder(folder, pipe):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_wan_ext", "WanSpeechToVideoPipeline"]
    assert index["transformer"] == ["diffusers_wan_ext", "WanS2VTransformer3DModel"]
    assert index["audio_encoder"] == ["transformers", "Wav2Vec2Model"]
    assert index["audio_processor"] == ["transformers", "Wav2Vec2Processor"]
    record = json.loads((folder / "wan_variant.json").read_text())
    assert record["arch"] == "s2v" and record["pipeline"] == "WanSpeechToVideoPipeline"
    assert isinstance(pipe, WanSpeechToVideoPipeline)
    cfg = pipe.transformer.config
    # widths from the shapes, options from the release config.json
    assert (cfg.audio_dim, cfg.audio_num_layers, cfg.num_audio_tokens, cfg.pose_dim) == (32, 3, 4, 16)
    assert list(cfg.audio_inject_layers) == [0, 1] and cfg.motion_frames == 9 and cfg.zero_timestep
    assert pipe.audio_encoder.config.num_hidden_layers + 1 == cfg.audio_num_layers
    assert pipe.audio_sample_rate == SR


def test_s2v_key_map_round_trip(release):
    sd = load_file(str(release / "diffusion_pytorch_model.safetensors"))
    ours = convert_dit_state_dict(sd)
    assert "condition_embedder.causal_audio_encoder.encoder.conv1_local.conv.weight" in ours
    assert "condition_embedder.pose_embedder.weight" in ours and "trainable_condition_mask.weight" in ours
    assert "audio_injector.injector.1.to_out.0.weight" in ours
    assert "audio_injector.injector_adain_layers.0.linear.weight" in ours
    back = export_dit_state_dict(ours)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    model = load_dit_from_original(str(release))
    assert isinstance(model, WanS2VTransformer3DModel)
    assert model.state_dict().keys() == ours.keys()


def _copy_release(release, tmp_path):
    dst = tmp_path / "release"
    shutil.copytree(release, dst)
    return dst


def test_converter_errors_name_the_problem(release, tmp_path):
    # no audio encoder folder
    rel = _copy_release(release, tmp_path)
    shutil.rmtree(rel / WAV2VEC_DIR)
    with pytest.raises(ConversionError, match="audio_encoder.*wav2vec2-large-xlsr-53-english"):
        convert_release(rel, tmp_path / "out1", dtype="fp32", progress=False)
    assert not (tmp_path / "out1").exists()
    # an unexpected weight in the wav2vec2 file
    shutil.copytree(release / WAV2VEC_DIR, rel / WAV2VEC_DIR)
    w = load_file(str(rel / WAV2VEC_DIR / "model.safetensors"))
    w["wav2vec2.extra_head.weight"] = torch.zeros(2)
    save_file(w, str(rel / WAV2VEC_DIR / "model.safetensors"))
    with pytest.raises(ConversionError, match="extra_head"):
        convert_release(rel, tmp_path / "out2", dtype="fp32", progress=False)
    # configurations we do not implement
    cfg_path = rel / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "enable_framepack": False, "enable_motioner": True}))
    with pytest.raises(ConversionError, match="enable_motioner=True"):
        load_dit_from_original(str(rel))
    cfg_path.write_text(json.dumps({**cfg, "audio_inject_layers": [0]}))
    with pytest.raises(ConversionError, match="audio_inject_layers"):
        load_dit_from_original(str(rel))
    # a missing S2V module
    cfg_path.write_text(json.dumps(cfg))
    sd = load_file(str(rel / "diffusion_pytorch_model.safetensors"))
    sd = {k: v for k, v in sd.items() if not k.startswith("frame_packer.")}
    with pytest.raises(ConversionError, match="frame_packer.proj.weight"):
        load_dit_from_original(sd, cfg)


def test_cli_converts_with_an_explicit_audio_encoder(release, tmp_path):
    from diffusers_wan_ext_cli import main

    rel = _copy_release(release, tmp_path)
    moved = tmp_path / "w2v"
    shutil.move(str(rel / WAV2VEC_DIR), moved)
    assert main(["convert", str(rel), str(tmp_path / "out"), "--dtype", "fp32", "--audio-encoder", str(moved)]) == 0
    from transformers import Wav2Vec2Processor

    proc = Wav2Vec2Processor.from_pretrained(tmp_path / "out" / "audio_processor")
    assert proc.feature_extractor.sampling_rate == SR


def test_folder_loads_with_trust_remote_code_in_a_fresh_interpreter(folder):
    proc = run_python(
        "import torch\nfrom diffusers import DiffusionPipeline\n"
        f"p = DiffusionPipeline.from_pretrained({str(folder)!r}, dtype=torch.float32, trust_remote_code=True)\n"
        "print(type(p).__name__, type(p.transformer).__name__)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WanSpeechToVideoPipeline WanS2VTransformer3DModel" in proc.stdout


# -------------------------------------------------------------------------------------------------- audio
def test_load_audio_files_and_arrays(tmp_path):
    path, pcm = write_wav(tmp_path / "mono.wav", 0.25)
    np.testing.assert_array_equal(load_audio(str(path)), pcm[:, 0].astype(np.float32) / 32768)
    path, pcm = write_wav(tmp_path / "stereo.wav", 0.25, channels=2)
    np.testing.assert_allclose(load_audio(path), pcm.astype(np.float32).mean(axis=1) / 32768, atol=1e-7)
    path, _ = write_wav(tmp_path / "8k.wav", 0.5, rate=8000)
    x = load_audio(path)  # decoded and resampled by ffmpeg
    assert abs(len(x) - SR // 2) <= 64 and np.abs(x).max() > 0.1
    arr = np.zeros(SR // 4, np.float32)
    assert load_audio(arr, SR).shape == (SR // 4,)
    np.testing.assert_allclose(load_audio(np.array([16384, -32768], np.int16), SR), [0.5, -1.0])
    with pytest.raises(ValueError, match="audio_sample_rate=22050.*16000 Hz"):
        load_audio(arr, 22050)
    with pytest.raises(ValueError, match="mono"):
        load_audio(np.zeros((2, 100), np.float32), SR)
    with pytest.raises(ValueError, match="no audio file"):
        load_audio(str(tmp_path / "missing.wav"))


def _reference_buckets(feats, fps, frames, m):
    """The reference's bucketing rule, written out loop by loop."""
    layers, t, c = feats.shape
    clips = int(t / (frames * AUDIO_FEATURE_FPS / fps)) + 1
    n = clips * frames
    total = math.ceil(clips * frames / fps * AUDIO_FEATURE_FPS)
    stride = int(AUDIO_FEATURE_FPS / fps)
    out = []
    for k in range(n):
        bi = min(max(int(np.round(k / fps * AUDIO_FEATURE_FPS)), 0), total - 1)
        if bi < t:
            idx = [min(max(j, 0), t - 1) for j in range(bi - m * stride, bi + (m + 1) * stride, stride)]
            out.append(feats[:, idx].reshape(layers, -1))
        else:
            out.append(torch.zeros(layers, (2 * m + 1) * c))
    return torch.stack(out, dim=-1).unsqueeze(0), clips


@pytest.mark.parametrize("t", [7, 15, 29, 30, 31, 46])
@pytest.mark.parametrize("m", [0, 1])
def test_audio_bucketing_follows_the_reference(t, m):
    feats = torch.randn(3, t, 4)
    ours, clips = bucket_audio_features(feats, fps=FPS, frames_per_clip=CLIP, m=m)
    want, want_clips = _reference_buckets(feats, FPS, CLIP, m)
    assert clips == want_clips and torch.equal(ours, want)
    # the original's clip count: audio of exactly n clips (15 feature frames = one 8-frame clip) gets n + 1
    assert clips == t // 15 + 1


def test_wav2vec_features_are_all_layers_at_30_per_second(pipe):
    audio = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1
    feats = wav2vec_features(pipe.audio_encoder, pipe.audio_processor, audio, SR)
    values = pipe.audio_processor(audio, sampling_rate=SR, return_tensors="pt").input_values
    with torch.no_grad():
        hidden = pipe.audio_encoder(values, output_hidden_states=True).hidden_states
    frames = hidden[0].shape[1]  # 49 for 1 s (the conv front end's receptive field)
    assert feats.shape == (len(hidden), int(frames / 50 * 30), hidden[0].shape[-1])
    for layer, h in enumerate(hidden):  # linear resampling with align_corners keeps both ends
        torch.testing.assert_close(feats[layer, 0], h[0, 0])
        torch.testing.assert_close(feats[layer, -1], h[0, -1])


# ---------------------------------------------------------------------------------------------- transformer
def test_audio_injector_layout_follows_the_reference_substring_rule():
    assert audio_injector_layout(40, [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39]) == (
        12, {i: k for k, i in enumerate([0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39])})
    assert audio_injector_layout(12, [0, 1]) == (4, {0: 0, 1: 3})  # blocks 1, 10, 11 all contain "blocks.1"
    model = WanS2VTransformer3DModel(num_attention_heads=2, attention_head_dim=8, text_dim=8, freq_dim=8,
                                     ffn_dim=16, num_layers=12, audio_dim=8, audio_num_layers=2,
                                     audio_inject_layers=[0, 1])
    assert len(model.audio_injector.injector) == 4


def _tiny_inputs(frames=2):
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, frames, 8, 8, generator=g),
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
        audio_embeds=torch.randn(1, 3, 32, 4 * frames, generator=g),
        image_latents=torch.randn(1, 16, 1, 8, 8, generator=g),
        pose_latents=torch.randn(1, 16, frames, 8, 8, generator=g),
        motion_latents=torch.randn(1, 16, 3, 8, 8, generator=g),
    )


def test_transformer_save_load_checkpointing_and_lora(pipe, tmp_path):
    from peft import LoraConfig

    model = pipe.transformer
    x = _tiny_inputs()
    with torch.no_grad():
        ref = model(**x, return_dict=False)[0]
    model.save_pretrained(tmp_path / "t")
    loaded = WanS2VTransformer3DModel.from_pretrained(tmp_path / "t").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x, return_dict=False)[0], ref)
    # gradient checkpointing gives the same output and gradients flow into the audio path
    loaded.enable_gradient_checkpointing()
    loaded.train()
    out = loaded(**x, return_dict=False)[0]
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    assert loaded.condition_embedder.causal_audio_encoder.weights.grad.abs().sum() > 0
    assert loaded.audio_injector.injector[0].to_q.weight.grad is not None
    # a PEFT adapter on the attention projections, audio cross-attention included
    loaded.eval()
    loaded.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    assert any("audio_injector.injector.0.to_q.lora_A" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        assert not torch.allclose(loaded(**x, return_dict=False)[0], ref)


def test_transformer_input_errors(pipe):
    model = pipe.transformer
    x = _tiny_inputs()
    with pytest.raises(ValueError, match="pass 8 audio frames"):
        model(**{**x, "audio_embeds": x["audio_embeds"][..., :4]})
    with pytest.raises(ValueError, match="image_latents must be the reference image"):
        model(**{**x, "image_latents": None})
    with pytest.raises(ValueError, match="pose_latents must be"):
        model(**{**x, "pose_latents": x["pose_latents"][:, :, :1]})
    with pytest.raises(ValueError, match=r"audio_embeds must be \[B, 3, 32, T\]"):
        model(**{**x, "audio_embeds": x["audio_embeds"][:, :2]})


# -------------------------------------------------------------------------------------------------- pipeline
def _record_calls(transformer, cfg_batch=None):
    """The keyword arguments of every transformer forward; with ``cfg_batch=B`` a batched cond + uncond forward
    (``hidden_states`` of batch ``2 x B``) is recorded as its two passes (tensors of batch ``2 x B`` halved)."""
    calls = []

    def half(v, i):
        batched = torch.is_tensor(v) and v.ndim and v.shape[0] == 2 * cfg_batch
        return v[i * cfg_batch:(i + 1) * cfg_batch] if batched else v

    def hook(module, args, kwargs):
        kwargs = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        if cfg_batch is None or kwargs["hidden_states"].shape[0] != 2 * cfg_batch:
            calls.append(kwargs)
        else:
            calls.extend({k: half(v, i) for k, v in kwargs.items()} for i in (0, 1))

    return calls, transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_pipeline_multi_clip_from_files(pipe, tmp_path):
    """wav + png + pose mp4 -> two clips; the second continues from the first's frames (motion tokens)."""
    wav, _ = write_wav(tmp_path / "speech.wav", 0.6)  # 0.6 s = 18 feature frames -> 2 clips of 8 frames
    png = write_png(tmp_path / "ref.png")
    pose = write_mp4(tmp_path / "pose.mp4", 12)  # shorter than 2 clips: the rest is black
    calls, handle = _record_calls(pipe.transformer, cfg_batch=1)
    try:
        frames = pipe(image=str(png), audio=str(wav), pose_video=str(pose), **call_kwargs()).frames[0]
    finally:
        handle.remove()
    assert frames.shape == (CLIP - 3 + CLIP, H, W, 3) and np.isfinite(frames).all()  # first clip: 3 frames dropped
    assert len(calls) == 2 * STEPS * 2  # clips x steps x (cond, uncond)
    for i, c in enumerate(calls):
        clip, uncond = i // (2 * STEPS), i % 2
        assert c["audio_embeds"].shape == (1, 3, 32, CLIP)
        assert bool(c["audio_embeds"].abs().sum() == 0) == bool(uncond)  # negative pass: zero audio
        assert c["drop_motion_frames"] == (clip == 0)
        assert c["pose_latents"].shape == (1, 16, CLIP // 4, H // 8, W // 8)
        assert c["motion_latents"].shape == (1, 16, 3, H // 8, W // 8)  # 9 history frames -> 3 latent frames
        assert c["image_latents"].shape == (1, 16, 1, H // 8, W // 8)
    # clip 1 sees a history made of clip 0's frames; its audio is the second clip of the track
    assert not torch.equal(calls[0]["motion_latents"], calls[2 * STEPS]["motion_latents"])
    assert not torch.equal(calls[0]["audio_embeds"], calls[2 * STEPS]["audio_embeds"])
    # pose clip 1 is past the video's 12 frames at its end: black
    assert not torch.equal(calls[0]["pose_latents"], calls[2 * STEPS]["pose_latents"])


def test_pipeline_motion_video_precomputed_audio_and_cfg_batching(pipe, tmp_path):
    audio = np.sin(np.linspace(0, 400, int(0.7 * SR))).astype(np.float32) * 0.2
    motion = write_mp4(tmp_path / "previous.mp4", 5, seed=7)
    frames = pipe(image=Image.open(write_png(tmp_path / "ref.png")), audio=audio, audio_sample_rate=SR,
                  motion_video=str(motion), num_clips=1, **call_kwargs()).frames[0]
    assert frames.shape == (CLIP, H, W, 3)  # continuing a video: no frames dropped

    image = Image.open(write_png(tmp_path / "ref.png"))
    embeds = pipe.encode_audio(audio, SR, CLIP, FPS)
    assert len(embeds) == 2 and embeds[0].shape == (1, 3, 32, CLIP)
    a = pipe(image=image, audio=audio, num_clips=1, output_type="latent", cfg_batching=False, **call_kwargs()).frames
    b = pipe(image=image, audio_embeds=embeds[:1], output_type="latent", cfg_batching=True, **call_kwargs()).frames
    assert a.shape == (1, 16, CLIP // 4, H // 8, W // 8)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pipeline_bad_inputs_give_clear_errors(pipe, tmp_path):
    image = Image.new("RGB", (W, H))
    short, _ = write_wav(tmp_path / "short.wav", 0.3)  # one clip of 8 frames at 16 fps lasts 0.5 s
    with pytest.raises(ValueError, match="shorter than one clip"):
        pipe(image=image, audio=str(short), **call_kwargs())
    with pytest.raises(ValueError, match="audio_sample_rate=44100"):
        pipe(image=image, audio=np.zeros(SR, np.float32), audio_sample_rate=44100, **call_kwargs())
    with pytest.raises(ValueError, match="mono"):
        pipe(image=image, audio=np.zeros((2, SR), np.float32), **call_kwargs())
    with pytest.raises(ValueError, match="pass `image`"):
        pipe(image=None, audio=str(short), **call_kwargs())
    with pytest.raises(ValueError, match="exactly one of `audio`"):
        pipe(image=image, **call_kwargs())
    with pytest.raises(ValueError, match="num_frames_per_clip must be a positive multiple of 4"):
        pipe(image=image, audio=str(short), **call_kwargs(num_frames_per_clip=6))
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe(image=image, audio=str(short), **call_kwargs(height=60))
    long_wav, _ = write_wav(tmp_path / "long.wav", 0.6)
    with pytest.raises(ValueError, match="pose_video: no video file"):
        pipe(image=image, audio=str(long_wav), pose_video=str(tmp_path / "missing.mp4"), **call_kwargs())
    with pytest.raises(ValueError, match="pose_video frames are 32x32"):
        pipe(image=image, audio=str(long_wav), pose_video=np.zeros((8, 32, 32, 3), np.uint8), **call_kwargs())
    with pytest.raises(ValueError, match=r"audio_embeds\[0\] must be"):
        pipe(image=image, audio_embeds=[torch.zeros(1, 3, 32, 4)], **call_kwargs())
    bare = WanSpeechToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                    scheduler=pipe.scheduler, transformer=pipe.transformer)
    with pytest.raises(ValueError, match="needs the pipeline's `audio_encoder`"):
        bare(image=image, audio=str(long_wav), **call_kwargs())


def test_example_script_writes_a_video_with_the_audio(folder, tmp_path):
    """examples/speech_to_video.py on real files: wav + png in, mp4 with the audio muxed out."""
    import importlib.util
    import subprocess

    import imageio_ffmpeg
    from diffusers.utils import load_video

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("s2v_example", ROOT / "examples" / "speech_to_video.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    wav, _ = write_wav(tmp_path / "speech.wav", 0.6)
    out = tmp_path / "s2v.mp4"
    example.main([str(folder), str(write_png(tmp_path / "ref.png")), str(wav), "a person is singing",
                  "--output", str(out), "--height", str(H), "--width", str(W), "--frames-per-clip", str(CLIP),
                  "--num-clips", "1", "--steps", "1", "--dtype", "fp32"])
    assert len(load_video(str(out))) == CLIP - 3
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(out)], capture_output=True, text=True)
    assert "Audio:" in probe.stderr and "Video:" in probe.stderr
