"""MOVA trains through the trainer: LoRA on one video expert while the audio DiT and the bridge run in the same joint
forward, loss = video flow-matching MSE + audio flow-matching MSE at one timestep (DiffSynth-Studio's
``FlowMatchSFTAudioVideoLoss``); the LoRA loads into ``MovaPipeline.load_lora_weights`` and changes the output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_wan_ext.demo import make_tiny_dataset
from diffusers_wan_ext.families.mova import MovaFamily, convert_mova_release, make_tiny_mova_release
from diffusers_wan_ext.pipelines import MovaPipeline
from diffusers_wan_ext.training import parse_args, run_training
from diffusers_wan_ext.training.components import load_training_components
from diffusers_wan_ext.training.dataset import VideoDataset
from diffusers_wan_ext.training.flow_match import FlowMatchTrainingSchedule
from diffusers_wan_ext.training.inputs import WanInputBuilder
from diffusers_wan_ext.training.modules import WanTrainingModule, training_loss

from helpers import edit_metadata_rows, write_pcm16_wav

COMMON = ["--height", "32", "--width", "32", "--num_frames", "9", "--max_sequence_length", "16", "--dtype", "fp32",
          "--report_to", "none", "--lora_rank", "8", "--lora_target_modules", "q,k,v,o,ffn.0,ffn.2"]


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.4 * np.sin(2 * np.pi * 330 * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    return write_pcm16_wav(path, np.round(x * 32767).astype("<i2"), rate)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mova-train")
    release = make_tiny_mova_release(root / "MOVA-360p")
    return convert_mova_release(release, root / "MOVA-360p-diffusers", dtype="fp32", progress=False)


def make_mova_dataset(folder: Path) -> Path:
    """One real mp4 clip (9 frames, 32x32) with a wav track in ``input_audio``."""
    meta = make_tiny_dataset(folder, num_videos=1, num_images=0)
    edit_metadata_rows(meta, lambda i, row: row.update(input_audio=write_wav(folder / f"audio_{i}.wav").name))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_mova_dataset(tmp_path_factory.mktemp("mova-data"))


def mova_dataset(folder: Path, metadata: str = "metadata.csv") -> VideoDataset:
    """The clips as the trainer reads them for a MOVA folder: MOVA's own ``input_audio`` (48 kHz) and 24 fps."""
    return VideoDataset(folder, folder / metadata, num_frames=9, height=32, width=32,
                        extra_inputs=["input_image", "input_audio"], column_specs=MovaFamily.dataset_inputs,
                        frame_rate=MovaFamily.training_frame_rate)


def train(*argv) -> Path:
    return run_training(parse_args([str(a) for a in argv]))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "logs" / "losses.jsonl").read_text().splitlines()]


def test_audio_latents_are_the_dac_posterior_mean(model, data):
    components = load_training_components(model, dtype=torch.float32)
    assert {"audio_transformer", "bridge", "audio_vae"} <= set(components.extra_components)
    builder = WanInputBuilder(components, ["input_image", "input_audio"], max_sequence_length=16)
    ds = mova_dataset(data)
    inputs = builder(ds[0])
    audio = inputs.joint_latents["audio"]
    assert tuple(audio.shape) == (1, 128, 19)  # (int(8000 * 9 / 24) - 1) // 160 + 1
    assert inputs.y is not None and inputs.y.shape[1] == 20  # the I2V condition of the video tower
    cached = inputs.to_tensors()  # the training cache carries the audio latents
    assert torch.equal(cached["joint.audio"], audio.cpu())
    assert torch.equal(type(inputs).from_tensors(cached).joint_latents["audio"], audio.cpu())
    # the audio latents are the DAC posterior mean of the clip's first 9 / 24 s, read at the release's 48 kHz and
    # resampled to the tiny DAC's 8 kHz
    wav = ds[0]["input_audio"][: int(48000 * 9 / 24)]
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
    sample = mova_dataset(tmp_path)[0]
    assert sample["input_audio"].abs().max() > 0.1
    components = load_training_components(model, dtype=torch.float32)
    builder = WanInputBuilder(components, ["input_image", "input_audio"], max_sequence_length=16)
    assert tuple(builder(sample).joint_latents["audio"].shape) == (1, 128, 19)
    with pytest.raises(ValueError, match="--extra_inputs input_audio"):  # the video expert alone: refused
        WanInputBuilder(components, ["input_image"], max_sequence_length=16)


def test_lora_lowers_the_joint_loss_and_loads_into_the_pipeline(model, cache, tmp_path):
    out = train("--task", "sft:train", "--dataset_base_path", cache, "--model_path", model, *COMMON,
                "--extra_inputs", "input_image,input_audio", "--lora_base_model", "dit",
                "--learning_rate", "1e-2", "--max_train_steps", "24", "--dataset_repeat", "24",
                "--min_timestep_boundary", "0.3", "--max_timestep_boundary", "0.31",  # one timestep: a clean signal
                "--output_path", tmp_path / "lora")
    assert len(losses(out)) == 24
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") for k in lora)
    before, after = cached_joint_losses(model, cache, "transformer", lora)
    assert after < 0.95 * before, (before, after)  # 24 steps: 1.248 -> 1.129 here
    plain, tuned, _ = render_with_lora(model, out)
    assert float((tuned.frames - plain.frames).abs().max()) > 1e-4  # the video latents
    assert float((tuned.audio - plain.audio).abs().max()) > 1e-6  # the bridge carries the video change into the audio


def render_with_lora(model: Path, out: Path):
    """MovaPipeline's output (video latents, decoded audio) without and with the trained LoRA, and the pipeline."""
    pipe = MovaPipeline.from_pretrained(model, torch_dtype=torch.float32)
    kw = dict(image=np.full((32, 32, 3), 128, np.uint8), prompt="a tone", height=32, width=32, num_frames=9,
              num_inference_steps=2, guidance_scale=1.0, output_type="latent")  # the audio: decoded below
    results = []
    for lora in (None, out / "pytorch_lora_weights.safetensors"):
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        result = pipe(**kw, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            result.audio = pipe.decode_audio(result.audio)
        results.append(result)
    return (*results, pipe)


# ------------------------------------------------------------------------------- the family's audio rate and fps


def test_input_audio_is_read_at_the_rate_the_model_family_declares(model, data):
    """The trainer reads ``input_audio`` for a MOVA folder at 48 kHz (its DAC's rate) and resamples its clips to 24
    fps; the shared reading (Wan2.2-S2V's Wav2Vec2) stays 16 kHz, frames as they are."""
    from diffusers_wan_ext.training.dataset import EXTRA_INPUTS
    from diffusers_wan_ext.training.trainer import _dataset

    args = parse_args(["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
                       "--model_path", str(model), *COMMON, "--extra_inputs", "input_image,input_audio",
                       "--lora_base_model", "dit"])
    ds = _dataset(args, None, repeat=1)  # told from the folder, before any model loads
    assert ds.frame_rate == 24.0 and ds.specs["input_audio"].sample_rate == 48000
    assert ds[0]["input_audio"].numel() == 48000  # the 1 s wav (written at 16 kHz)
    assert EXTRA_INPUTS["input_audio"].sample_rate == 16000
    shared = VideoDataset(data, data / "metadata.csv", num_frames=9, height=32, width=32,
                          extra_inputs=["input_audio"])
    assert shared.frame_rate is None and shared[0]["input_audio"].numel() == 16000


def test_clips_are_resampled_to_the_family_frame_rate(tmp_path):
    """DiffSynth-Studio's ``fix_frame_rate``: frame i is source frame round(i / 24 * fps) (an 8 fps clip: each
    frame three times), and a clip has floor(duration * 24) frames (then cut to 4n+1 with --min_num_frames)."""
    from diffusers_wan_ext.utils.media import write_video

    levels = [0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.4, 0.6, 0.8]
    write_video([np.full((32, 32, 3), v) for v in levels], tmp_path / "clip.mp4", fps=8)
    write_video([np.full((32, 32, 3), v) for v in levels[:2]], tmp_path / "short.mp4", fps=8)
    (tmp_path / "metadata.csv").write_text("video,prompt\nclip.mp4,a\n")
    (tmp_path / "short.csv").write_text("video,prompt\nshort.mp4,b\n")
    frames = VideoDataset(tmp_path, tmp_path / "metadata.csv", num_frames=9, height=32, width=32,
                          frame_rate=24.0)[0]["video"].float().mean(dim=(1, 2, 3)) / 255
    source = [min(round(i / 24 * 8), len(levels) - 1) for i in range(9)]
    assert source == [0, 0, 1, 1, 1, 2, 2, 2, 3]
    np.testing.assert_allclose(frames.numpy(), [levels[j] for j in source], atol=0.03)
    plain = VideoDataset(tmp_path, tmp_path / "metadata.csv", num_frames=9, height=32, width=32)[0]["video"]
    np.testing.assert_allclose(plain.float().mean(dim=(1, 2, 3)).numpy() / 255, levels, atol=0.03)
    # 2 frames at 8 fps = 0.25 s -> 6 frames at 24 fps: too few for 9 ...
    short = dict(num_frames=9, height=32, width=32, frame_rate=24.0)
    with pytest.raises(ValueError, match="has 6 frame"):
        VideoDataset(tmp_path, tmp_path / "short.csv", **short)[0]
    # ... cut to 4n+1 = 5 when shorter clips are allowed
    video = VideoDataset(tmp_path, tmp_path / "short.csv", min_num_frames=1, **short)[0]["video"]
    np.testing.assert_allclose(video.float().mean(dim=(1, 2, 3)).numpy() / 255, [0.1, 0.1, 0.3, 0.3, 0.3], atol=0.03)


# ------------------------------------------------------------------------------- LoRA on the audio tower / bridge


@pytest.fixture(scope="module")
def cache(model, data, tmp_path_factory) -> Path:
    """The clip's training cache (video and audio latents, text and I2V conditions)."""
    return train("--task", "sft:data_process", "--dataset_base_path", data, "--dataset_metadata_path",
                 data / "metadata.csv", "--model_path", model, *COMMON, "--extra_inputs", "input_image,input_audio",
                 "--lora_base_model", "dit", "--output_path", tmp_path_factory.mktemp("mova-cache") / "cache")


def cached_joint_losses(model: Path, cache: Path, component: str, lora: dict) -> tuple[float, float]:
    """The joint loss of the cached clip at the trained timestep over 4 fixed noise draws, before and after ``lora``
    is loaded into ``component`` (``transformer``: the video expert)."""
    from diffusers_wan_ext.training.inputs import ModelInputs
    from diffusers_wan_ext.training.trainer import CachedDataset

    components = load_training_components(model, dtype=torch.float32, load_encoders=False)
    extras = {name: components.extra_components[name] for name in ("audio_transformer", "bridge")}
    module = WanTrainingModule(components.transformer, extras)
    inputs = ModelInputs.from_tensors(CachedDataset(cache)[0]["cached"])
    schedule = FlowMatchTrainingSchedule(min_boundary=0.3, max_boundary=0.31)

    def loss() -> float:
        with torch.no_grad():
            return float(np.mean([training_loss(module, inputs, schedule, torch.Generator().manual_seed(s),
                                                torch.float32)[0] for s in range(4)]))

    before = loss()
    (module.transformer if component == "transformer" else extras[component]).load_lora_adapter(lora,
                                                                                               prefix=component)
    return before, loss()


@pytest.mark.parametrize("base, component", [("audio_dit", "audio_transformer"), ("dual_tower_bridge", "bridge")])
def test_lora_on_the_audio_tower_or_the_bridge(base, component, model, cache, tmp_path):
    """DiffSynth-Studio's --lora_base_model audio_dit / dual_tower_bridge: the video expert frozen, the LoRA lowers
    the joint loss, is saved under the component's name and changes MovaPipeline's audio once loaded."""
    out = train("--task", "sft:train", "--dataset_base_path", cache, "--model_path", model, *COMMON,
                "--extra_inputs", "input_image,input_audio", "--lora_base_model", base, "--learning_rate", "4e-2",
                "--dataset_repeat", 40, "--min_timestep_boundary", "0.3", "--max_timestep_boundary", "0.31",
                "--output_path", tmp_path / "lora")
    assert len(losses(out)) == 40
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith(f"{component}.") for k in lora), sorted(lora)[:4]
    assert any(".to_q.lora_A." in k for k in lora)
    before, after = cached_joint_losses(model, cache, component, lora)
    assert after < 0.97 * before, (before, after)  # 40 steps: 1.23 -> 1.17 (audio DiT), -> 1.08 (bridge) here
    plain, tuned, pipe = render_with_lora(model, out)
    assert pipe.components[component].peft_config  # loaded into the component
    assert float((tuned.audio - plain.audio).abs().max()) > 1e-6


def test_component_lora_arguments(model, cache, tmp_path):
    """The component's own names and DiffSynth-Studio's resolve; the Wan LoRA layouts are refused at start-up."""
    common = ["--task", "sft:train", "--dataset_base_path", str(cache), "--model_path", str(model)]
    for name in ("audio_dit", "audio_transformer"):
        args = parse_args([*common, "--lora_base_model", name])
        assert args.lora_base_model == "audio_transformer" and args.expert == "transformer"
    assert parse_args([*common, "--lora_base_model", "dual_tower_bridge"]).lora_base_model == "bridge"
    with pytest.raises(SystemExit):
        parse_args([*common, "--lora_base_model", "audio_dit", "--export_format", "original"])
    with pytest.raises(SystemExit):
        parse_args([*common, "--lora_base_model", "audio_vae"])


def test_full_fine_tuning_of_the_bridge_saves_its_folder(model, cache, tmp_path):
    """--trainable_models dual_tower_bridge: one step saves bridge/ (a MovaDualTowerBridge folder) that differs from the
    base; the video expert stays frozen (nothing else is written)."""
    from diffusers_wan_ext.models import MovaDualTowerBridge

    out = train("--task", "sft:train", "--dataset_base_path", cache, "--model_path", model, *COMMON,
                "--extra_inputs", "input_image,input_audio", "--trainable_models", "dual_tower_bridge",
                "--learning_rate", "1e-3", "--max_train_steps", "1", "--save_dtype", "fp32",
                "--output_path", tmp_path / "full")
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("checkpoint")) == \
        ["bridge", "logs"]
    tuned = MovaDualTowerBridge.from_pretrained(str(out / "bridge"))
    base = MovaDualTowerBridge.from_pretrained(str(model), subfolder="bridge")
    a, b = tuned.state_dict(), base.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_component_lora_resumes_exactly_and_continues_from_its_file(model, cache, tmp_path):
    """An audio-DiT LoRA resumed from checkpoint-2 gives the uninterrupted run's losses and weights; --lora_checkpoint
    puts its saved file back into the component (a tiny learning rate keeps the weights)."""
    args = ["--task", "sft:train", "--dataset_base_path", cache, "--model_path", model, *COMMON, "--extra_inputs",
            "input_image,input_audio", "--lora_base_model", "audio_dit", "--learning_rate", "1e-2",
            "--dataset_repeat", 4, "--save_steps", 2]
    full = train(*args, "--output_path", tmp_path / "full")
    resumed = train(*args, "--output_path", tmp_path / "resumed", "--resume_from_checkpoint", full / "checkpoint-2")
    assert losses(resumed) == losses(full)[2:]
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    assert a.keys() == load_file(str(full / "checkpoint-2" / "pytorch_lora_weights.safetensors")).keys()
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = train(*args[:-2], "--lora_checkpoint", full / "pytorch_lora_weights.safetensors", "--learning_rate",
                  "1e-12", "--max_train_steps", 1, "--output_path", tmp_path / "again")
    c = load_file(str(again / "pytorch_lora_weights.safetensors"))
    assert a.keys() == c.keys() and all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
