"""Every family trains: Wan2.2-S2V, Wan2.2-Animate, Video-As-Prompt and LongCat-Video on CPU with tiny models and a
dataset of real mp4 / png / wav files written here (DiffSynth-Studio's column names).  For each family: LoRA training
lowers the loss on fixed draws, the LoRA loads with the pipeline's ``load_lora_weights`` and changes its output, and
full fine-tuning (of the family's scope where DiffSynth-Studio trains one) saves a folder that loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_wan_ext.demo import make_tiny_dataset, make_tiny_longcat_release, write_video
from diffusers_wan_ext.lora import EXPORT_FILE_NAMES, convert_lora_state_dict
from diffusers_wan_ext.training import VideoDataset, parse_args, run_training

from helpers import fixed_draws_loss, write_pcm16_wav

SIZE = ["--height", "32", "--width", "32", "--num_frames", "5"]
COMMON = [*SIZE, "--max_sequence_length", "16", "--dtype", "fp32", "--report_to", "none", "--lora_rank", "4"]
FACE = 24  # face crops are read at their own size and resized to the motion encoder's (16 for the tiny model)


def train(*argv) -> Path:
    return run_training(parse_args([str(a) for a in argv]))


def losses(out: Path) -> list[float]:
    lines = (Path(out) / "logs" / "losses.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, freq: float = 220.0) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.4 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    return write_pcm16_wav(path, pcm, rate)


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """1 mp4 clip (9 frames, 32x32) with every family's columns: wav audio, pose / face / background / mask videos
    (mp4), reference videos and prompts, LongCat conditioning frames (a 1-frame mp4)."""
    folder = tmp_path_factory.mktemp("family-data")
    meta = make_tiny_dataset(folder, num_videos=1, num_images=0, control=True)
    rows = list(csv.DictReader(open(meta)))
    rng = np.random.default_rng(3)
    for i, r in enumerate(rows):
        clip = [np.asarray(f) for f in _frames(folder / r["video"])]
        r["input_audio"] = write_wav(folder / f"audio_{i}.wav", freq=220.0 * (i + 1)).name
        face = [rng.uniform(0, 1, (FACE, FACE, 3)) for _ in clip]
        r["animate_face_video"] = write_video(face, folder / f"face_{i}.mp4", fps=8).name
        mask = [np.broadcast_to((np.arange(32) > 12)[None, :, None], (32, 32, 3)).astype(float) for _ in clip]
        r["animate_mask_video"] = write_video(mask, folder / f"mask_{i}.mp4", fps=8).name
        r["longcat_video"] = write_video([f / 255.0 for f in clip[:1]], folder / f"cond_{i}.mp4", fps=8).name
        r.update(s2v_pose_video=r["control_video"], animate_pose_video=r["control_video"],
                 animate_inpaint_video=r["control_video"], vap_video=r["control_video"],
                 vap_prompt=f"a shape turns into its negative {i}")
    with open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


def _frames(path: Path) -> list:
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path))
    try:
        return [np.asarray(f) for f in reader]
    finally:
        reader.close()


@pytest.fixture(scope="module")
def vap(tmp_path_factory) -> Path:
    """A converted tiny Video-As-Prompt folder (WanVideoAsPromptPipeline)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_wan_ext import WanVideoAsPromptPipeline
    from test_fun_pipelines import make_clip, make_text_parts, make_vae
    from test_video_as_prompt import tiny_model

    root = tmp_path_factory.mktemp("vap-model")
    tokenizer, text_encoder = make_text_parts(root / "tok")
    processor, clip = make_clip()
    pipe = WanVideoAsPromptPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=make_vae(),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), image_processor=processor,
                                    image_encoder=clip, transformer=tiny_model(text_len=16))
    pipe.save_pretrained(root / "vap")
    return root / "vap"


@pytest.fixture(scope="module")
def longcat(tmp_path_factory) -> Path:
    from diffusers_wan_ext.release_converter import convert_release

    d = tmp_path_factory.mktemp("longcat-model")
    release = make_tiny_longcat_release(d / "release")
    return convert_release(release, d / "diffusers", dtype="fp32", progress=False)


#: family -> (extra inputs, LoRA targets, full fine-tuning model name, the scope's parameter prefixes)
FAMILIES = {
    "s2v": ("input_image,input_audio,s2v_pose_video", "q,k,v,o,ffn.0,ffn.2,proj_out", "dit", ("",)),
    "animate": ("input_image,animate_pose_video,animate_face_video,animate_inpaint_video,animate_mask_video",
                "q,k,v,o,ffn.0,ffn.2", "animate_adapter",
                ("pose_patch_embedding.", "motion_encoder.", "face_encoder.", "face_adapter.")),
    "vap": ("input_image,vap_video,vap_prompt", "q,k,v,o,ffn.0,ffn.2,proj_out", "vap", ("vap_",)),
    "longcat": ("longcat_video", "adaLN_modulation.1,attn.qkv,attn.proj,cross_attn.q_linear,cross_attn.kv_linear,"
                "cross_attn.proj,ffn.w1,ffn.w2,ffn.w3,final_layer.linear", "dit", ("",)),
}


@pytest.fixture(scope="module")
def models(converted, vap, longcat):
    return {"s2v": converted("s2v"), "animate": converted("animate"), "vap": vap, "longcat": longcat}


def run_args(model: Path, data: Path, family: str) -> list:
    return ["--dataset_base_path", data, "--dataset_metadata_path", data / "metadata.csv", "--model_path", model,
            *COMMON, "--extra_inputs", FAMILIES[family][0]]


# ------------------------------------------------------------------------------------------------------- dataset


def test_the_new_columns_are_read_as_declared(data):
    ds = VideoDataset(data, data / "metadata.csv", num_frames=9, height=32, width=32,
                      extra_inputs=["input_audio", "animate_face_video", "longcat_video", "vap_prompt",
                                    "s2v_pose_video"])
    sample = ds[0]
    assert sample["input_audio"].dtype == torch.float32 and sample["input_audio"].shape == (16000,)
    assert tuple(sample["animate_face_video"].shape) == (9, FACE, FACE, 3)  # its own size
    assert tuple(sample["longcat_video"].shape) == (1, 32, 32, 3)  # 4n+1 conditioning frames
    assert tuple(sample["s2v_pose_video"].shape) == (9, 32, 32, 3)
    assert sample["vap_prompt"].startswith("a shape")


def test_a_bad_audio_file_names_the_row_and_column(data, tmp_path):
    rows = list(csv.DictReader(open(data / "metadata.csv")))
    (tmp_path / "bad.wav").write_bytes(b"RIFF not audio")
    for name in {v for r in rows for v in r.values()}:
        if (data / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes((data / name).read_bytes())
    rows.append(dict(rows[0], input_audio="bad.wav"))
    with open(tmp_path / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ds = VideoDataset(tmp_path, tmp_path / "metadata.csv", num_frames=9, height=32, width=32,
                      extra_inputs=["input_audio"])
    with pytest.raises(ValueError, match=r"row 1 .*column 'input_audio'"):
        ds[1]


# ----------------------------------------------------------------------------------------------------- training


def _eval_loss(model: Path, cache: Path, lora: Path | None, targets: str) -> float:
    """Mean training loss over fixed (entry, timestep, noise) draws, base transformer (+ a trained LoRA)."""
    from diffusers import AutoModel

    from diffusers_wan_ext.lora import map_lora_target_modules
    from diffusers_wan_ext.training.modules import add_lora, load_lora_into

    transformer = AutoModel.from_pretrained(str(model), subfolder="transformer").float()
    if lora is not None:
        add_lora(transformer, 4, 4, map_lora_target_modules(targets), scope="dit")
        load_lora_into(transformer, load_file(str(lora / "pytorch_lora_weights.safetensors")), "trained")
    return fixed_draws_loss(transformer, cache)


def _render(family: str, pipe, data: Path) -> np.ndarray:
    """A tiny generation with the family's pipeline and its own inputs (from the dataset's files)."""
    g = torch.Generator().manual_seed(0)
    common = dict(prompt="a red square", height=32, width=32, num_inference_steps=1, generator=g, output_type="np",
                  max_sequence_length=16)
    image = Image.open(data / "reference.png")
    if family == "s2v":
        return pipe(image=image, audio=str(data / "audio_0.wav"), num_frames_per_clip=8, num_clips=1,
                    guidance_scale=1.0, **common).frames[0]
    if family == "animate":
        pose = [Image.fromarray(f) for f in _frames(data / "control" / "clip_0.mp4")]
        face = [Image.fromarray(f) for f in _frames(data / "face_0.mp4")]
        return pipe(image=image, pose_video=pose, face_video=face, segment_frame_length=9, guidance_scale=1.0,
                    **{k: v for k, v in common.items() if k != "max_sequence_length"}).frames[0]
    if family == "vap":
        return pipe(image=image, vap_video=str(data / "control" / "clip_0.mp4"), vap_prompt="a shape",
                    num_frames=5, guidance_scale=1.0, **common).frames[0]
    return pipe(num_frames=9, guidance_scale=1.0, **common).frames[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_lora_and_full(family, models, data, tmp_path):
    """LoRA: the loss on fixed draws drops, the LoRA loads with the pipeline's ``load_lora_weights`` and changes its
    output; full fine-tuning (of the family's scope) saves a transformer folder that loads, only the scope changed."""
    from diffusers import AutoModel, DiffusionPipeline

    model, (extra, targets, name, prefixes) = models[family], FAMILIES[family]
    cache = train("--task", "sft:data_process", *run_args(model, data, family), "--output_path", tmp_path / "cache")
    entry = load_file(str(sorted((cache / "0").glob("*.safetensors"))[0]))
    if family == "longcat":  # continuation: 1 clean conditioning latent frames, told to the transformer
        assert int(entry["clean_frames"]) == 1 and int(entry["kwargs.num_cond_latents"]) == 1
    cached = ["--task", "sft:train", "--dataset_base_path", cache, "--model_path", model, *COMMON, "--extra_inputs",
              extra]
    exports = ["--export_format", "longcat" if family == "longcat" else "original,kohya,diffsynth"]  # its layouts
    steps = 16 if family == "longcat" else 10  # (its loss covers one latent frame: the other is the condition)
    out = train(*cached, "--lora_base_model", "dit", "--lora_target_modules", targets, "--learning_rate", "1e-2",
                "--dataset_repeat", steps, *exports, "--output_path", tmp_path / "lora")
    assert len(losses(out)) == steps and all(np.isfinite(losses(out)))
    trained = load_file(str(out / "pytorch_lora_weights.safetensors"))
    keys = trained.keys()
    assert keys and all(k.startswith("transformer.") for k in keys)
    for fmt, file in EXPORT_FILE_NAMES.items() if family != "longcat" else ():  # each layout: the same deltas
        back = convert_lora_state_dict(load_file(str(out / file)), "diffusers")
        assert back.keys() == keys, fmt
        for a in (k for k in keys if ".lora_A." in k):
            b = a.replace(".lora_A.", ".lora_B.")
            torch.testing.assert_close(back[b] @ back[a], trained[b] @ trained[a], atol=1e-6, rtol=1e-4)
    if family in ("animate", "vap"):  # dit = the main blocks only (the adapter / reference stream is its own model)
        assert all(k.startswith("transformer.blocks.") for k in keys)
    before, after = _eval_loss(model, cache, None, targets), _eval_loss(model, cache, out, targets)
    assert after < 0.95 * before, (before, after)

    pipe = DiffusionPipeline.from_pretrained(str(model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    plain = _render(family, pipe, data)
    pipe.load_lora_weights(str(out))
    with_lora = _render(family, pipe, data)
    assert float(np.abs(with_lora - plain).max()) > 1e-4
    if family == "longcat":  # its own LoRA layout out (--export_format longcat): it loads and renders the same
        from diffusers_wan_ext.conversion.longcat import LORA_PREFIX
        from diffusers_wan_ext.families.longcat import export_longcat_lora

        original = load_file(str(out / "lora_longcat.safetensors"))
        assert original and all(k.startswith(LORA_PREFIX) for k in original), sorted(original)[:4]
        assert {k.split(".", 1)[1] for k in original} >= {"lora_down.weight", "lora_up.weight", "alpha_scale",
                                                          "lora_up.blocks.2.weight"}  # attn.qkv: 3 parts
        want = export_longcat_lora(trained)
        assert original.keys() == want.keys() and all(torch.equal(original[k], want[k]) for k in want)
        fresh = DiffusionPipeline.from_pretrained(str(model), dtype=torch.float32)
        fresh.set_progress_bar_config(disable=True)
        fresh.load_lora_weights(str(out), weight_name="lora_longcat.safetensors")
        np.testing.assert_allclose(_render(family, fresh, data), with_lora, atol=1e-5)
        # ... and in: training continues from the original-format file (--lora_checkpoint)
        again = train(*cached, "--lora_base_model", "dit", "--lora_target_modules", targets, "--lora_checkpoint",
                      out / "lora_longcat.safetensors", "--learning_rate", "1e-12", "--max_train_steps", "1",
                      "--output_path", tmp_path / "again")
        first, second = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (out, again))
        assert first.keys() == second.keys()
        assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)

    full = train(*cached, "--trainable_models", name, "--learning_rate", "1e-3", "--max_train_steps", "1",
                 "--save_steps", "1", "--output_path", tmp_path / "full")
    tuned = AutoModel.from_pretrained(str(full / "transformer"), dtype=torch.bfloat16)  # --save_dtype
    base = AutoModel.from_pretrained(str(model), subfolder="transformer").float()
    a, b = tuned.state_dict(), base.state_dict()
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k].to(a[k].dtype))}
    assert changed and all(k.startswith(prefixes) for k in changed), sorted(changed)[:4]
    ckpt = load_file(str(full / "checkpoint-1" / "trainable_weights.safetensors"))
    assert all(k[len("transformer."):].startswith(prefixes) for k in ckpt)


def test_s2v_conditioning_is_the_pipelines(models, data, tiny_release):
    """The S2V inputs are what the pipeline's own code gives for the first clip of the clip's audio, and the original
    release folder (wav2vec2 folder included) gives the same as the converted one."""
    from diffusers_wan_ext.pipelines.s2v_conditioning import audio_embeds_per_clip, load_audio
    from diffusers_wan_ext.training.components import load_training_components
    from diffusers_wan_ext.training.inputs import WanInputBuilder

    components = load_training_components(models["s2v"], dtype=torch.float32)
    builder = WanInputBuilder(components, FAMILIES["s2v"][0].split(","), max_sequence_length=16)
    ds = VideoDataset(data, data / "metadata.csv", num_frames=5, height=32, width=32,
                      extra_inputs=builder.extra_inputs)
    inputs = builder(ds[0])
    audio = load_audio(str(data / "audio_0.wav"))
    want = audio_embeds_per_clip(components.audio_encoder, components.audio_processor, audio, 16000, fps=16,
                                 frames_per_clip=4)
    torch.testing.assert_close(inputs.transformer_kwargs["audio_embeds"], want[0])
    assert inputs.latents.shape[2] == 1  # the reference frame's latent is the transformer's image_latents
    assert inputs.transformer_kwargs["pose_latents"].shape == inputs.latents.shape
    assert bool(inputs.transformer_kwargs["drop_motion_frames"])
    assert not any(p.requires_grad for p in components.audio_encoder.parameters())
    original = load_training_components(tiny_release("s2v"), dtype=torch.float32)
    same = WanInputBuilder(original, builder.extra_inputs, max_sequence_length=16)(ds[0])
    torch.testing.assert_close(same.latents, inputs.latents)
    assert same.transformer_kwargs.keys() == inputs.transformer_kwargs.keys()
    for k, v in inputs.transformer_kwargs.items():
        torch.testing.assert_close(same.transformer_kwargs[k], v)


# ------------------------------------------------------------------------------------------- scripts and validation

#: the new families' scripts -> (extra inputs, LoRA scope, full fine-tuning scope)
SCRIPTS = {
    "Wan2.2-S2V-14B": (["input_image", "input_audio", "s2v_pose_video"], "dit", None),
    "Wan2.2-Animate-14B": (["input_image", "animate_pose_video", "animate_face_video"], "dit", "animate_adapter"),
    "Video-As-Prompt-Wan2.1-14B": (["vap_video", "input_image"], "dit", "vap"),
    "LongCat-Video": ([], "dit", None),
}


@pytest.mark.parametrize("model", list(SCRIPTS))
def test_the_new_scripts_train_what_diffsynth_trains(model, tmp_path):
    from test_training_entry import ROOT, script_arguments

    extra, lora_scope, full_scope = SCRIPTS[model]
    lora = parse_args(script_arguments(ROOT / "examples" / "training" / "lora" / f"{model}.sh", tmp_path)[4:])
    full = parse_args(script_arguments(ROOT / "examples" / "training" / "full" / f"{model}.sh", tmp_path)[4:])
    assert lora.extra_inputs == extra == full.extra_inputs and lora.lora_scope == lora_scope
    assert lora.lora_base_model == "transformer" and full.trainable_models == ["transformer"]
    assert full.trainable_scope == full_scope
    if model == "LongCat-Video":
        assert {"attn1.to_q", "attn2.to_k", "norm1.linear", "ffn.w3"} <= set(lora.lora_target_modules)


def _validate_module():
    import importlib.util

    from test_training_entry import ROOT

    spec = importlib.util.spec_from_file_location("validate", ROOT / "examples" / "training" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_validate_has_an_entry_for_every_trained_model(models, data, tmp_path):
    from test_training_entry import ROOT

    validate = _validate_module()
    scripts = {p.stem for p in (ROOT / "examples" / "training").glob("*/*.sh")}  # lora, full, direct_distill
    assert scripts <= set(validate.MODELS) and len(scripts) >= 30, sorted(scripts - set(validate.MODELS))
    given = {"--input_image": data / "reference.png", "--end_image": data / "reference.png",
             "--control_video": data / "control" / "clip_0.mp4", "--camera_control_direction": "Left",
             "--motion_bucket_id": "50", "--input_audio": data / "audio_0.wav",
             "--animate_pose_video": data / "control" / "clip_0.mp4", "--animate_face_video": data / "face_0.mp4",
             "--vap_video": data / "control" / "clip_0.mp4", "--animate2_reference_image": data / "reference.png",
             "--animate2_reference_video": data / "control" / "clip_0.mp4",
             "--wantodance_reference_image": data / "reference.png", "--wantodance_music_path": data / "audio_0.wav"}
    for name, (_, needed) in validate.MODELS.items():
        argv = ["--model", name, "--model_path", models["s2v"], "--prompt", "x"]
        args = validate.parse([str(a) for a in argv + [v for n in needed for v in (f"--{n}", given[f"--{n}"])]])
        assert args.height and args.num_frames and args.num_inference_steps, name
        if needed:
            with pytest.raises(SystemExit):
                validate.parse([str(a) for a in argv])
    # a tiny LongCat-Video continuation: --model's defaults overridden, the family's own input
    video = validate.main([str(a) for a in [
        "--model", "LongCat-Video", "--model_path", models["longcat"], "--prompt", "a square slides",
        "--longcat_video", data / "cond_0.mp4", "--height", "32", "--width", "32", "--num_frames", "9",
        "--num_inference_steps", "1", "--guidance_scale", "1", "--max_sequence_length", "16", "--dtype", "fp32",
        "--device", "cpu", "--output", tmp_path / "longcat.mp4"]])
    assert video.stat().st_size > 0


def test_longcat_dit_with_wan_release_files(tiny_release, longcat, data, tmp_path):
    """DiffSynth-Studio's LongCat-Video line: the original ``dit/`` (--transformer_path) with Wan2.1's release files
    (--model_path) trains LongCat: its conditioning is read from the transformer, the cache has the converted
    folder's entries (the tiny Wan release has other encoder weights, so only their shapes agree)."""
    release = make_tiny_longcat_release(tmp_path / "release")
    args = ["--dataset_base_path", data, "--dataset_metadata_path", data / "metadata.csv", *COMMON, "--extra_inputs",
            "longcat_video", "--task", "sft:data_process"]
    mixed = train(*args, "--model_path", tiny_release("t2v"), "--transformer_path", release / "dit",
                  "--output_path", tmp_path / "mixed")
    ours = train(*args, "--model_path", longcat, "--output_path", tmp_path / "ours")
    a, b = (load_file(str(sorted((c / "0").glob("*.safetensors"))[0])) for c in (mixed, ours))
    assert a.keys() == b.keys() and {"kwargs.encoder_attention_mask", "kwargs.num_cond_latents"} <= a.keys()
    assert all(a[k].shape == b[k].shape for k in a)
