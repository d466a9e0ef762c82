"""MOVA trains through the trainer: LoRA on one video expert while the audio DiT and the bridge run in the same joint
forward, loss = video flow-matching MSE + audio flow-matching MSE at one timestep (DiffSynth-Studio's
``FlowMatchSFTAudioVideoLoss``); the LoRA loads into ``MovaPipeline.load_lora_weights`` and changes the output."""

from __future__ import annotations

import csv
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_wan_ext.demo import make_tiny_dataset
from diffusers_wan_ext.families.mova import convert_mova_release, make_tiny_mova_release
from diffusers_wan_ext.pipelines import MovaPipeline
from diffusers_wan_ext.training import parse_args, run_training
from diffusers_wan_ext.training.components import load_training_components
from diffusers_wan_ext.training.dataset import VideoDataset
from diffusers_wan_ext.training.flow_match import FlowMatchTrainingSchedule
from diffusers_wan_ext.training.inputs import WanInputBuilder
from diffusers_wan_ext.training.modules import WanTrainingModule, training_loss

COMMON = ["--height", "32", "--width", "32", "--num_frames", "9", "--max_sequence_length", "16", "--dtype", "fp32",
          "--report_to", "none", "--lora_rank", "8", "--lora_target_modules", "q,k,v,o,ffn.0,ffn.2"]


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.4 * np.sin(2 * np.pi * 330 * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(x * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mova-train")
    release = make_tiny_mova_release(root / "MOVA-360p")
    return convert_mova_release(release, root / "MOVA-360p-diffusers", dtype="fp32", progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One real mp4 clip (9 frames, 32x32) with a wav track in ``input_audio``."""
    folder = tmp_path_factory.mktemp("mova-data")
    meta = make_tiny_dataset(folder, num_videos=1, num_images=0)
    rows = list(csv.DictReader(open(meta)))
    for i, r in enumerate(rows):
        r["input_audio"] = write_wav(folder / f"audio_{i}.wav").name
    with open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


def train(*argv) -> Path:
    return run_training(parse_args([str(a) for a in argv]))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "logs" / "losses.jsonl").read_text().splitlines()]


def test_audio_latents_are_the_dac_posterior_mean(model, data):
    components = load_training_components(model, dtype=torch.float32)
    assert {"audio_transformer", "bridge", "audio_vae"} <= set(components.extra_components)
    builder = WanInputBuilder(components, ["input_image", "input_audio"], max_sequence_length=16)
    ds = VideoDataset(data, data / "metadata.csv", num_frames=9, height=32, width=32,
                      extra_inputs=["input_image", "input_audio"])
    inputs = builder(ds[0])
    audio = inputs.joint_latents["audio"]
    assert tuple(audio.shape) == (1, 128, 19)  # (int(8000 * 9 / 24) - 1) // 160 + 1
    assert inputs.y is not None and inputs.y.shape[1] == 20  # the I2V condition of the video tower
    cached = inputs.to_tensors()  # the training cache carries the audio latents
    assert torch.equal(cached["joint.audio"], audio.cpu())
    assert torch.equal(type(inputs).from_tensors(cached).joint_latents["audio"], audio.cpu())
    # the audio latents are the DAC posterior mean of the clip's first 9 / 24 s, resampled to the DAC's 8 kHz
    wav = ds[0]["input_audio"][: int(16000 * 9 / 24)]
    wav = torch.nn.functional.interpolate(wav[None, None], size=3000, mode="linear", align_corners=False)
    dac = components.extra_components["audio_vae"]
    torch.testing.assert_close(audio.cpu(), dac.encode(wav).latent_dist.mode(), rtol=0, atol=0)


def test_input_audio_may_be_the_clips_own_sound_track(model, tmp_path):
    """``input_audio`` naming the clip's own mp4 reads its audio track (ffmpeg)."""
    from diffusers_wan_ext.utils.media import add_audio_track, write_video

    rng = np.random.default_rng(0)
    clip = write_video([rng.random((32, 32, 3)) for _ in range(9)], tmp_path / "clip.mp4", fps=24)
    t = np.arange(int(48000 * 9 / 24)) / 48000
    add_audio_track(clip, 0.3 * np.sin(2 * np.pi * 440 * t), 48000)
    (tmp_path / "metadata.csv").write_text("video,prompt,input_audio\nclip.mp4,a beep,clip.mp4\n")
    ds = VideoDataset(tmp_path, tmp_path / "metadata.csv", num_frames=9, height=32, width=32,
                      extra_inputs=["input_image", "input_audio"])
    sample = ds[0]
    assert sample["input_audio"].abs().max() > 0.1
    components = load_training_components(model, dtype=torch.float32)
    builder = WanInputBuilder(components, ["input_image", "input_audio"], max_sequence_length=16)
    assert tuple(builder(sample).joint_latents["audio"].shape) == (1, 128, 19)
    with pytest.raises(ValueError, match="--extra_inputs input_audio"):  # the video expert alone: refused
        WanInputBuilder(components, ["input_image"], max_sequence_length=16)


def fixed_noise_loss(model: Path, data: Path, lora: dict | None) -> float:
    """The joint loss of the clip at the trained timestep, averaged over 4 fixed noise draws (with ``lora`` loaded
    into the video expert)."""
    components = load_training_components(model, dtype=torch.float32)
    builder = WanInputBuilder(components, ["input_image", "input_audio"], max_sequence_length=16)
    ds = VideoDataset(data, data / "metadata.csv", num_frames=9, height=32, width=32,
                      extra_inputs=["input_image", "input_audio"])
    inputs = builder(ds[0])
    if lora is not None:
        components.transformer.load_lora_adapter(lora, prefix="transformer")
    module = WanTrainingModule(components.transformer, {name: components.extra_components[name]
                                                        for name in ("audio_transformer", "bridge")})
    schedule = FlowMatchTrainingSchedule(min_boundary=0.3, max_boundary=0.31)
    with torch.no_grad():
        return float(np.mean([training_loss(module, inputs, schedule, torch.Generator().manual_seed(s),
                                            torch.float32)[0] for s in range(4)]))


def test_lora_lowers_the_joint_loss_and_loads_into_the_pipeline(model, data, tmp_path):
    out = train("--dataset_base_path", data, "--dataset_metadata_path", data / "metadata.csv", "--model_path", model,
                *COMMON, "--extra_inputs", "input_image,input_audio", "--lora_base_model", "dit",
                "--learning_rate", "1e-2", "--max_train_steps", "24", "--dataset_repeat", "24",
                "--min_timestep_boundary", "0.3", "--max_timestep_boundary", "0.31",  # one timestep: a clean signal
                "--output_path", tmp_path / "lora")
    assert len(losses(out)) == 24
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") for k in lora)
    before, after = fixed_noise_loss(model, data, None), fixed_noise_loss(model, data, lora)
    assert after < 0.95 * before, (before, after)  # 24 steps: 1.248 -> 1.129 here
    pipe = MovaPipeline.from_pretrained(model, torch_dtype=torch.float32)
    kw = dict(image=np.full((32, 32, 3), 128, np.uint8), prompt="a tone", height=32, width=32, num_frames=9,
              num_inference_steps=2, guidance_scale=1.0, output_type="np")
    before = pipe(**kw, generator=torch.Generator().manual_seed(0))
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    after = pipe(**kw, generator=torch.Generator().manual_seed(0))
    assert np.abs(after.frames - before.frames).max() > 1e-4
    assert np.abs(after.audio - before.audio).max() > 1e-6  # the bridge carries the video change into the audio
