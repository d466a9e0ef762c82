"""Wan-Dancer-14B trains (CPU, tiny): the global model (``transformer``, keyframes at 7.5 fps) and the local model
(``transformer_2``, 30 fps) of one converted folder, each picked with ``--lora_base_model dit`` / ``dit2``, on a dataset
of real mp4 / png / wav files written here with DiffSynth-Studio's ``wantodance_*`` columns.  The music column holds
precomputed features (``.npy``); the audio-file path goes through the pipeline's librosa features, or -- librosa
missing -- gives one line naming the ``dancer`` extra."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers_wan_ext import WanDancerPipeline
from diffusers_wan_ext.demo import make_tiny_release, write_video
from diffusers_wan_ext.families.dancer import read_music_features
from diffusers_wan_ext.pipelines.dancer_conditioning import music_features
from diffusers_wan_ext.training import FlowMatchTrainingSchedule, parse_args, run_training
from diffusers_wan_ext.training.components import load_training_components
from diffusers_wan_ext.training.inputs import ModelInputs, WanInputBuilder
from diffusers_wan_ext_cli import main as cli_main

from helpers import write_pcm16_wav

H, W, FRAMES = 32, 64, 9  # 2 x 4 tokens per latent frame: a multiple of the 8 music tokens per frame
EXTRA = "wantodance_music_path,wantodance_reference_image,wantodance_fps,wantodance_keyframes,wantodance_keyframes_mask"
COMMON = ["--height", H, "--width", W, "--num_frames", FRAMES, "--max_sequence_length", 16, "--dtype", "fp32",
          "--report_to", "none", "--lora_rank", 4, "--lora_target_modules", "q,k,v,o,ffn.0,ffn.2"]
MASK = [1, 0, 0, 0, 1, 0, 0, 0, 1]
HAS_LIBROSA = importlib.util.find_spec("librosa") is not None


def train(*argv) -> Path:
    return run_training(parse_args([str(a) for a in argv]))


def write_wav(path: Path, seconds: float = 1.0, rate: int = 22050) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0) * 32767).astype("<i2")
    return write_pcm16_wav(path, pcm, rate)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dancer-train")
    release = make_tiny_release(root / "Wan-Dancer-14B", arch="dancer")
    out = root / "Wan-Dancer-14B-diffusers"
    assert cli_main(["convert", str(release), str(out), "--dtype", "fp32", "--image-encoder-heads", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One 9-frame clip (a moving square), its reference image, keyframe video (non-keyframes black), music (wav and
    precomputed features) and two metadata files: the clip at 30 fps (local) and at 7.5 fps (global)."""
    folder = tmp_path_factory.mktemp("dancer-data")
    clip = np.zeros((FRAMES, H, W, 3), np.uint8)
    for i in range(FRAMES):
        clip[i, 8:24, 4 + 4 * i : 20 + 4 * i] = (220, 60, 40)
        clip[i, :, :, 2] += 30
    write_video(clip, folder / "video.mp4", fps=30)
    keyframes = np.where(np.array(MASK, bool)[:, None, None, None], clip, 0).astype(np.uint8)
    write_video(keyframes, folder / "keyframes.mp4", fps=30)
    Image.fromarray(clip[0]).save(folder / "reference.png")
    write_wav(folder / "music.wav")
    np.save(folder / "music.npy", np.random.default_rng(0).standard_normal((40, 35)).astype(np.float32))
    for name, fps in (("local", 30), ("global", 7.5)):
        with open(folder / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["video", "prompt", *EXTRA.split(",")])
            w.writerow(["video.mp4", "a person is dancing", "music.npy", "reference.png", fps, "keyframes.mp4",
                        json.dumps(MASK)])
    return folder


def dataset_args(data: Path, stage: str) -> list:
    return ["--dataset_base_path", data, "--dataset_metadata_path", data / f"{stage}.csv", "--extra_inputs", EXTRA]


@pytest.fixture(scope="module")
def caches(model, data, tmp_path_factory) -> dict[str, Path]:
    """Each stage's training cache (``--task sft:data_process``; the same for LoRA and full fine-tuning runs)."""
    root = tmp_path_factory.mktemp("dancer-caches")
    return {stage: train("--task", "sft:data_process", "--model_path", model, *COMMON, *dataset_args(data, stage),
                         "--lora_base_model", base, "--output_path", root / stage)
            for stage, base in (("global", "dit"), ("local", "dit2"))}


# --------------------------------------------------------------------------------------------------- conditioning


def test_each_dit_of_the_folder_is_chosen_and_conditioned_as_its_pipeline_stage(model, data, tmp_path):
    """dit = the global model (framewise keyframe latents, 7.5 fps), dit2 = the local model (30 fps); the inputs are
    the pipeline's: keyframe condition, CLIP of the first keyframe and of the reference, sliced music."""
    for stage, expert, frames in (("global", "transformer", 3), ("local", "transformer_2", 3)):
        cache = train("--task", "sft:data_process", "--model_path", model, *COMMON, *dataset_args(data, stage),
                      "--lora_base_model", "dit" if expert == "transformer" else "dit2",
                      "--output_path", tmp_path / stage)
        entry = load_file(str(sorted((cache / "0").glob("*.safetensors"))[0]))
        assert tuple(entry["latents"].shape) == (1, 16, frames, H // 8, W // 8)
        assert tuple(entry["y"].shape) == (1, 20, frames, H // 8, W // 8)
        assert tuple(entry["image_embeds"].shape) == tuple(entry["kwargs.reference_image_embeds"].shape)
        fps = 7.5 if stage == "global" else 30.0
        assert float(entry["kwargs.fps"]) == fps
        # the music of F / fps seconds: 36 feature frames at 7.5 fps, 9 at 30 fps
        assert entry["kwargs.music_features"].shape == (round(FRAMES / fps * 30), 35)
        torch.testing.assert_close(entry["kwargs.music_features"],
                                   torch.from_numpy(np.load(data / "music.npy"))[: round(FRAMES / fps * 30)])
    comps = load_training_components(model, expert="transformer_2", dtype=torch.float32)
    assert comps.boundary_ratio is None and not comps.has_two_experts  # no timestep split between the two DiTs
    builder = WanInputBuilder(comps, EXTRA.split(","), max_sequence_length=16)
    assert builder.conditioning.name.startswith("Wan-Dancer")
    with pytest.raises(ValueError, match="needs --extra_inputs"):
        WanInputBuilder(comps, ["wantodance_reference_image"], max_sequence_length=16)


def test_global_latents_are_the_keyframes_each_encoded_alone(model, data):
    """The global target: clip frames 0, 4, 8 through the VAE one at a time (what the pipeline decodes framewise)."""
    from diffusers_wan_ext.training.dataset import VideoDataset

    comps = load_training_components(model, dtype=torch.float32)
    builder = WanInputBuilder(comps, EXTRA.split(","), max_sequence_length=16)
    sample = VideoDataset(data, data / "global.csv", num_frames=FRAMES, height=H, width=W,
                          extra_inputs=EXTRA.split(","))[0]
    inputs = builder(sample)
    video = builder.video(sample, "video")
    for i, f in enumerate((0, 4, 8)):
        torch.testing.assert_close(inputs.latents[:, :, i : i + 1], builder.encode_latents(video[:, :, f : f + 1]))
    # the mask of frames 0 (x4), 1-4, 5-8 folded into 4 channels per latent frame: keyframes 0, 4, 8
    assert inputs.y[0, :4, :, 0, 0].tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]]
    bad = dict(sample, wantodance_keyframes_mask=[1, 0])
    with pytest.raises(ValueError, match="wantodance_keyframes_mask must be 9 values"):
        builder(bad)
    with pytest.raises(ValueError, match="wantodance_fps must be positive"):
        builder(dict(sample, wantodance_fps=0.0))


def test_music_column_audio_file_and_bad_features(tmp_path, data):
    if HAS_LIBROSA:  # the pipeline's own feature code
        torch.testing.assert_close(read_music_features(data / "music.wav"), music_features(str(data / "music.wav")))
    else:
        with pytest.raises(ValueError, match=r"wantodance_music_path: .*music\.wav: .*librosa.*\[dancer\]"):
            read_music_features(data / "music.wav")
    np.save(tmp_path / "bad.npy", np.zeros((10, 34), np.float32))
    with pytest.raises(ValueError, match=r"bad\.npy: music features must be finite \[frames, 35\]"):
        read_music_features(tmp_path / "bad.npy")
    save_file({"a": torch.zeros(4, 35), "b": torch.zeros(4, 35)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match=r"two\.safetensors: not readable music features \(holds 2 tensors"):
        read_music_features(tmp_path / "two.safetensors")
    save_file({"music_features": torch.ones(4, 35)}, str(tmp_path / "one.safetensors"))
    assert read_music_features(tmp_path / "one.safetensors").shape == (4, 35)


# ------------------------------------------------------------------------------------------------------- training


def _eval_loss(model: Path, sub: str, cache: Path, lora: Path | None) -> float:
    """Mean training loss over fixed (timestep, noise) draws: base DiT ``sub`` (+ a trained LoRA)."""
    from diffusers import AutoModel

    from diffusers_wan_ext.lora import map_lora_target_modules
    from diffusers_wan_ext.training.modules import WanTrainingModule, add_lora, load_lora_into, training_loss
    from diffusers_wan_ext.training.trainer import CachedDataset

    transformer = AutoModel.from_pretrained(str(model), subfolder=sub).float()
    if lora is not None:
        add_lora(transformer, 4, 4, map_lora_target_modules("q,k,v,o,ffn.0,ffn.2"), scope="dit")
        sd = {f"transformer.{k.split('.', 1)[1]}": v
              for k, v in load_file(str(lora / "pytorch_lora_weights.safetensors")).items()}
        load_lora_into(transformer, sd, "trained")
    module = WanTrainingModule(transformer).eval()
    schedule = FlowMatchTrainingSchedule(min_boundary=0.2, max_boundary=0.8)
    inputs = ModelInputs.from_tensors(CachedDataset(cache)[0]["cached"])
    total = []
    with torch.no_grad():
        for seed in range(6):
            loss, smp = training_loss(module, inputs, schedule, torch.Generator().manual_seed(seed), torch.float32)
            total.append(float(loss) / smp.weight)
    return float(np.mean(total))


@pytest.mark.parametrize("stage", ["global", "local"])
def test_lora_trains_and_changes_the_pipeline(stage, model, data, caches, tmp_path):
    """Sixteen steps lower the loss on fixed draws; the LoRA loads into WanDancerPipeline (into the trained DiT)
    and changes what that stage renders."""
    base_model, sub = ("dit", "transformer") if stage == "global" else ("dit2", "transformer_2")
    cache = caches[stage]
    out = train("--task", "sft:train", "--dataset_base_path", cache, "--model_path", model, *COMMON,
                "--extra_inputs", EXTRA, "--lora_base_model", base_model, "--learning_rate", "1e-2",
                "--dataset_repeat", 16, "--output_path", tmp_path / "lora")
    lines = (out / "logs" / "losses.jsonl").read_text().splitlines()
    assert len(lines) == 16 and all(np.isfinite(json.loads(line)["loss"]) for line in lines)
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith(f"{sub}.") for k in keys)
    before, after = _eval_loss(model, sub, cache, None), _eval_loss(model, sub, cache, out)
    assert after < 0.95 * before, (before, after)

    pipe = WanDancerPipeline.from_pretrained(str(model), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref = Image.open(data / "reference.png")
    feats = torch.from_numpy(np.load(data / "music.npy"))
    keyframes = None if stage == "global" else torch.zeros(2, 3, H, W)
    if stage == "global":  # the keyframe stage alone
        pipe.register_modules(transformer_2=None)

    def render() -> torch.Tensor:
        return pipe(image=ref, music_features=feats, prompt="a person is dancing", height=H, width=W,
                    segment_frames=FRAMES, duration=0.6, num_inference_steps=1, local_num_inference_steps=1, keyframes=keyframes,
                    guidance_scale=1.0, max_sequence_length=16, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).frames

    plain = render()
    pipe.load_lora_weights(str(out))
    assert float((render() - plain).abs().max()) > 1e-4


@pytest.mark.parametrize("stage", ["global", "local"])
def test_full_fine_tuning_saves_a_dancer_folder(stage, model, caches, tmp_path):
    """--trainable_models dit / dit2: two steps save the stage's DiT as a WanDancerTransformer3DModel folder (in
    --save_dtype) that differs from the base and takes its place in WanDancerPipeline."""
    from diffusers_wan_ext import WanDancerTransformer3DModel

    name, sub = ("dit", "transformer") if stage == "global" else ("dit2", "transformer_2")
    out = train("--task", "sft:train", "--dataset_base_path", caches[stage], "--model_path", model, *COMMON,
                "--extra_inputs", EXTRA, "--trainable_models", name, "--learning_rate", "1e-3", "--dataset_repeat", 2,
                "--save_dtype", "fp32", "--output_path", tmp_path / "full")
    assert len((out / "logs" / "losses.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("checkpoint")) == ["logs", sub]
    assert json.loads((out / sub / "config.json").read_text())["_class_name"] == "WanDancerTransformer3DModel"
    tuned = WanDancerTransformer3DModel.from_pretrained(str(out / sub), torch_dtype=torch.float32)
    base = WanDancerTransformer3DModel.from_pretrained(str(model), subfolder=sub, torch_dtype=torch.float32)
    a, b = tuned.state_dict(), base.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == torch.float32 for k in a)
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert any(k.startswith("blocks.") for k in changed), "the fine-tuned DiT equals the base"
    pipe = WanDancerPipeline.from_pretrained(str(model), torch_dtype=torch.float32, **{sub: tuned})
    assert pipe.components[sub] is tuned and type(pipe.components["transformer"]) is WanDancerTransformer3DModel


# ------------------------------------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("stage", ["global", "local"])
def test_scripts_train_the_stages_dit(stage, tmp_path):
    from test_training_entry import ROOT, script_arguments

    expert = "transformer" if stage == "global" else "transformer_2"
    folder = ROOT / "examples" / "training"
    lora = parse_args(script_arguments(folder / "lora" / f"Wan-Dancer-14B-{stage}.sh", tmp_path)[4:])
    full = parse_args(script_arguments(folder / "full" / f"Wan-Dancer-14B-{stage}.sh", tmp_path)[4:])
    assert lora.extra_inputs == EXTRA.split(",") == full.extra_inputs
    assert lora.lora_base_model == expert and full.trainable_models == [expert]
    assert str(lora.model_path).endswith("Wan-Dancer-14B-diffusers") and lora.num_frames == 149
