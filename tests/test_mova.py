"""MOVA (image -> video + audio): key maps, converter errors, release conversion through the CLI, loading in a fresh
interpreter (shim route), the tiny pipeline end to end with a real png and the mp4 with its audio read back, and the
refusals.  The numerical parity of the towers and the bridge is the goldens' (``dit_mova``, ``dit_mova_audio``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusers_wan_ext.conversion.mova import (
    convert_mova_audio_dit_state_dict,
    convert_mova_bridge_state_dict,
    export_mova_audio_dit_state_dict,
    export_mova_bridge_state_dict,
    fuse_weight_norm,
    load_mova_audio_dit,
    load_mova_bridge,
)
from diffusers_wan_ext.families.mova import convert_mova_release, make_tiny_mova_release
from diffusers_wan_ext.pipelines.pipeline_mova import MovaPipeline, mova_audio_length
from diffusers_wan_ext.utils.io import ConversionError
from diffusers_wan_ext_cli import main

from golden_runners.core import GOLDENS_DIR
from helpers import ROOT, run_python

MOVA_CASE = GOLDENS_DIR / "dit_mova"
needs_golden = pytest.mark.skipif(not (MOVA_CASE / "manifest.json").is_file(), reason="no dit_mova golden here")


def _release_sd(component: str) -> dict[str, torch.Tensor]:
    return load_file(str(MOVA_CASE / component / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_tiny_mova_release(tmp_path_factory.mktemp("mova") / "MOVA-360p")


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    dst = tmp_path_factory.mktemp("mova-out") / "MOVA-360p-diffusers"
    assert main(["convert", str(release), str(dst), "--dtype", "fp32"]) == 0
    return dst


# ------------------------------------------------------------------------------------------------ key maps
@needs_golden
def test_key_maps_round_trip_on_the_release_layout():
    for component, convert, export in (("audio_dit", convert_mova_audio_dit_state_dict, export_mova_audio_dit_state_dict),
                                       ("dual_tower_bridge", convert_mova_bridge_state_dict,
                                        export_mova_bridge_state_dict)):
        sd = _release_sd(component)
        ours = convert(sd)
        assert set(ours) != set(sd)
        back = export(ours)
        assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd), component


@needs_golden
def test_converter_errors_name_the_keys():
    bridge = _release_sd("dual_tower_bridge")
    broken = {k: v for k, v in bridge.items() if not k.startswith("video_to_audio_conditioners.1.")}
    with pytest.raises(ConversionError, match="video_to_audio_conditioners layers"):
        load_mova_bridge(broken)
    with pytest.raises(ConversionError, match="head_dim|divisible"):
        load_mova_bridge(bridge, {"head_dim": 7})
    with pytest.raises(ConversionError, match="pooled_adaln"):
        load_mova_bridge(bridge, {"pooled_adaln": True})
    audio = _release_sd("audio_dit")
    with pytest.raises(ConversionError, match="num_layers=5"):
        load_mova_audio_dit(audio, {"num_layers": 5})
    with pytest.raises(ConversionError, match="unknown.key"):
        load_mova_audio_dit({**audio, "unknown.key.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="not MOVA's audio DiT"):
        load_mova_audio_dit(_release_sd("video_dit_2"))


def test_weight_norm_pairs_are_fused():
    conv = torch.nn.utils.weight_norm(torch.nn.Conv1d(3, 4, 5))
    sd = {f"m.{k}": v.detach() for k, v in conv.state_dict().items()}
    fused = fuse_weight_norm(sd)
    assert set(fused) == {"m.weight", "m.bias"}
    torch.testing.assert_close(fused["m.weight"], conv.weight.detach())
    with pytest.raises(ConversionError, match="weight_g"):
        fuse_weight_norm({"m.weight_v": sd["m.weight_v"]})


def test_audio_length_rule():
    assert mova_audio_length(9, 24.0, 48000, 960) == 19  # dit_mova's mova_call
    assert mova_audio_length(121, 24.0, 48000, 960) == (int(48000 * 121 / 24) - 1) // 960 + 1


# ---------------------------------------------------------------------------------------------- releases
def test_release_errors_are_one_line(release, tmp_path):
    with pytest.raises(ConversionError, match="not a MOVA release"):
        convert_mova_release(tmp_path, tmp_path / "out")
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("audio_dit", "dual_tower_bridge", "video_dit"):
        (partial / name).symlink_to(release / name)
    with pytest.raises(ConversionError, match="audio_vae"):
        convert_mova_release(partial, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_converted_folder(converted):
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_wan_ext", "MovaPipeline"]
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert index["audio_transformer"] == ["diffusers_wan_ext", "MovaAudioTransformer1DModel"]
    assert index["bridge"] == ["diffusers_wan_ext", "MovaDualTowerBridge"]
    assert index["audio_vae"] == ["diffusers_wan_ext", "AutoencoderDac"]
    assert json.loads((converted / "wan_variant.json").read_text())["name"] == "mova-360p"


def test_variants_lists_mova(capsys):
    assert main(["variants"]) == 0
    out = capsys.readouterr().out
    assert "mova-360p" in out and "mova-720p" in out


# ---------------------------------------------------------------------------------------------- pipeline
def test_refusals_and_input_errors(converted):
    pipe = MovaPipeline.from_pretrained(converted, torch_dtype=torch.float32)
    for call, what in ((pipe.enable_teacache, "TeaCache"), (pipe.enable_parallelism, "parallelism")):
        with pytest.raises(ValueError, match=what):
            call()
    assert "bridge" in pipe.sliding_window_unsupported_reason
    img = Image.new("RGB", (32, 32))
    kw = dict(image=img, prompt="a fox", height=32, width=32, num_frames=9, num_inference_steps=1,
              max_sequence_length=16)
    for bad, message in ((dict(image=None), "image is required"), (dict(height=40), "multiples of 16"),
                         (dict(num_frames=8), "num_frames"), (dict(frame_rate=0), "frame_rate"),
                         (dict(audio_latents=torch.zeros(1, 128, 3)), "audio_latents must have shape")):
        with pytest.raises(ValueError, match=message):
            pipe(**{**kw, **bad})
    assert pipe.expert(torch.tensor(950.0), 0.9) is pipe.transformer
    assert pipe.expert(torch.tensor(899.0), 0.9) is pipe.transformer_2


RUN = r"""
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({folder!r}, dtype=torch.float32, trust_remote_code=True)
assert type(pipe).__name__ == "MovaPipeline", type(pipe)
out = pipe(image={png!r}, prompt="a fox barks", negative_prompt="blur", height=32, width=48, num_frames=9,
           frame_rate=12.0, num_inference_steps=2, max_sequence_length=16, generator=torch.Generator().manual_seed(0))
import importlib.util
spec = importlib.util.spec_from_file_location("mova_example", {example!r})
example = importlib.util.module_from_spec(spec); spec.loader.exec_module(example)
example.write_mp4_with_audio(out.frames[0], out.audio[0], out.audio_sample_rate, 12.0, {mp4!r})
print(json.dumps(dict(frames=list(out.frames.shape), audio=list(out.audio.shape), rate=out.audio_sample_rate,
                      peak=float(np.abs(out.audio).max()), finite=bool(np.isfinite(out.frames).all()))))
"""


def test_tiny_pipeline_end_to_end_in_a_fresh_interpreter(converted, tmp_path):
    """Loaded without importing the package first (the folder's shims, ``trust_remote_code``), a real png in, the
    mp4 written by examples/mova.py carries the video frames and the generated audio."""
    from diffusers_wan_ext.utils.media import read_audio_file, read_video_file

    png, mp4 = tmp_path / "first.png", tmp_path / "mova.mp4"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(png)
    proc = run_python(RUN.format(folder=str(converted), png=str(png), example=str(ROOT / "examples" / "mova.py"),
                                 mp4=str(mp4)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    latents = mova_audio_length(9, 12.0, 8000, 160)
    assert result["frames"] == [1, 9, 32, 48, 3] and result["finite"]
    assert result["audio"] == [1, latents * 160] and result["rate"] == 8000 and 0 < result["peak"] <= 1
    frames = read_video_file(mp4, "video")
    assert len(frames) == 9 and frames[0].size == (48, 32)
    audio = read_audio_file(mp4, 8000)
    assert math.isclose(len(audio) / 8000, latents * 160 / 8000, abs_tol=0.05)
    assert np.abs(audio).max() > 0


def test_cli_generate_writes_the_sound_track(converted, tmp_path, capsys):
    """``diffusers-wan generate`` on a MOVA folder: --image required (checked before loading), the sound generated
    for --fps and muxed into the mp4."""
    from diffusers_wan_ext.utils.media import read_audio_file, read_video_file

    png, mp4 = tmp_path / "first.png", tmp_path / "gen.mp4"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png)
    args = ["generate", "--model", str(converted), "--prompt", "a fox", "--height", "32", "--width", "32",
            "--num-frames", "5", "--steps", "1", "--dtype", "fp32", "--fps", "10", "--output", str(mp4)]
    assert main(args) == 2
    assert "--image is required" in capsys.readouterr().err
    assert main(args + ["--image", str(png)]) == 0
    assert len(read_video_file(mp4, "video")) == 5
    audio = read_audio_file(mp4, 8000)
    assert math.isclose(len(audio) / 8000, mova_audio_length(5, 10.0, 8000, 160) * 160 / 8000, abs_tol=0.05)


def test_lora_loading(converted):
    """A DiffSynth-Studio MOVA LoRA (one video expert, ``lora_A.default`` keys) goes into ``transformer_2`` with
    ``load_into_transformer_2``; Diffusers keys of the audio tower and the bridge into theirs; keys that fit no layer
    are refused, naming them."""
    pipe = MovaPipeline.from_pretrained(converted, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    layers = dict(pipe.transformer_2.named_modules())
    video = {}
    for i in range(pipe.transformer_2.config.num_layers):
        for release, ours in (("self_attn.q", "attn1.to_q"), ("ffn.0", "ffn.net.0.proj")):
            w = layers[f"blocks.{i}.{ours}"].weight
            video[f"blocks.{i}.{release}.lora_A.default.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.1
            video[f"blocks.{i}.{release}.lora_B.default.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.1
    before = pipe.transformer_2.blocks[0].attn1.to_q(torch.ones(1, 48))
    pipe.load_lora_weights(video, adapter_name="low", load_into_transformer_2=True)
    assert list(pipe.transformer_2.peft_config) == ["low"] and not hasattr(pipe.transformer, "peft_config")
    assert (pipe.transformer_2.blocks[0].attn1.to_q(torch.ones(1, 48)) - before).abs().max() > 1e-4
    towers = {}
    for name in ("audio_transformer", "bridge"):
        for path, module in getattr(pipe, name).named_modules():
            if path.endswith("to_q") and isinstance(module, torch.nn.Linear):
                towers[f"{name}.{path}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.1
                towers[f"{name}.{path}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.1
    pipe.load_lora_weights(towers, adapter_name="av")
    assert list(pipe.audio_transformer.peft_config) == ["av"] and list(pipe.bridge.peft_config) == ["av"]
    bad = {"bridge.audio_to_video.9.to_q.lora_A.weight": torch.zeros(4, 36),
           "bridge.audio_to_video.9.to_q.lora_B.weight": torch.zeros(48, 4)}
    with pytest.raises(ValueError, match="audio_to_video.9.to_q"):
        pipe.load_lora_weights(bad, adapter_name="bad")


def test_pipeline_loop_follows_the_reference(converted):
    """The denoising loop against a hand-written one with DiffSynth-Studio's rules: sigmas ``linspace(1, 0, N+1)[:N]``
    shifted by 5, the high-noise expert while ``t >= 900`` (here steps 0 and 1, then the low-noise one), one guidance
    scale for both outputs, Euler steps on video and audio latents."""
    from diffusers_wan_ext.models.mova_joint_forward import mova_joint_forward
    from diffusers_wan_ext.pipelines.fun_conditioning import i2v_condition
    from diffusers_wan_ext.utils.media import load_image

    pipe = MovaPipeline.from_pretrained(converted, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    ctx, neg = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    video, audio = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 128, mova_audio_length(5, 8.0, 8000, 160),
                                                                         generator=g)
    out = pipe(image=image, prompt_embeds=ctx, negative_prompt_embeds=neg, height=32, width=32, num_frames=5,
               frame_rate=8.0, num_inference_steps=3, guidance_scale=4.0, latents=video, audio_latents=audio,
               output_type="latent")
    y = i2v_condition(pipe.vae, load_image(image, 32, 32), 5)
    sigmas = torch.linspace(1, 0, 4)[:3]
    sigmas = 5 * sigmas / (1 + 4 * sigmas)
    experts = []
    with torch.no_grad():
        for i, sigma in enumerate(sigmas):
            t = sigma * 1000
            expert = pipe.transformer if t >= 900 else pipe.transformer_2
            experts.append(expert is pipe.transformer)
            run = [mova_joint_forward(expert, pipe.audio_transformer, pipe.bridge, video, audio, t.reshape(1), c, 8.0,
                                      image_condition=y) for c in (ctx, neg)]
            (v_c, a_c), (v_u, a_u) = run
            step = (sigmas[i + 1] if i + 1 < len(sigmas) else 0.0) - sigma
            video = video + (v_u + 4.0 * (v_c - v_u)) * step
            audio = audio + (a_u + 4.0 * (a_c - a_u)) * step
    assert experts == [True, True, False]
    torch.testing.assert_close(out.frames, video, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.audio, audio, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("component", ["audio_dit", "dual_tower_bridge", "audio_vae"])
def test_cli_refuses_one_component_alone(release, tmp_path, capsys, component):
    """A MOVA component given alone (folder or file) is recognised by its keys and refused in one line."""
    for src in (release / component, release / component / "diffusion_pytorch_model.safetensors"):
        assert main(["convert", str(src), str(tmp_path / "out"), "--dtype", "fp32"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"MOVA's {component}" in errors[0] and "whole release" in errors[0], errors
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("offload", ["sequential", "group_disk"])
def test_offloading_hooks_run_for_the_joint_forward(converted, tmp_path, monkeypatch, offload):
    """The joint forward calls the towers' parts one by one, so the hooks offloading puts on their ``forward`` are
    run around it: accelerate's sequential offload of the four DiT components (weights on the meta device, streamed
    in; what ``enable_sequential_cpu_offload`` does to each) and block-level group offloading to disk give the plain
    result."""
    from accelerate import cpu_offload

    pipe = MovaPipeline.from_pretrained(converted, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    kw = dict(image=Image.new("RGB", (32, 32), (90, 30, 200)), prompt_embeds=torch.randn(1, 6, 32, generator=g),
              negative_prompt_embeds=torch.randn(1, 6, 32, generator=g), height=32, width=32, num_frames=5,
              num_inference_steps=2, output_type="latent")
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0))
    if offload == "sequential":
        # (the tiny VAE / umT5 are left alone: this accelerate build cannot stream their parameters on CPU)
        monkeypatch.setattr(MovaPipeline, "_execution_device", property(lambda self: torch.device("cpu")))
        for name in ("transformer", "transformer_2", "audio_transformer", "bridge"):
            cpu_offload(getattr(pipe, name), execution_device=torch.device("cpu"))
        assert pipe.transformer.scale_shift_table.device.type == "meta"
    else:
        for name in ("transformer", "transformer_2", "audio_transformer"):
            getattr(pipe, name).enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                                     num_blocks_per_group=1, offload_to_disk_path=str(tmp_path / name))
    out = pipe(**kw, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.frames, ref.frames, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.audio, ref.audio, rtol=1e-5, atol=1e-6)


def test_variant_option(release, tmp_path):
    """--variant picks the release row (the folder name is the default); a non-MOVA row is refused."""
    dst = tmp_path / "as720"
    assert main(["convert", str(release), str(dst), "--dtype", "fp32", "--transformer-only",
                 "--variant", "mova-720p"]) == 0
    assert json.loads((dst / "wan_variant.json").read_text())["height"] == 720
    with pytest.raises(ConversionError, match="--variant wan2.1-t2v-1.3b"):
        convert_mova_release(release, tmp_path / "bad", variant="wan2.1-t2v-1.3b")


# ------------------------------------------------------------------------------ DiffSynth's noise and timestep
def _diffsynth_noise(shape, seed):
    """DiffSynth-Studio's ``BasePipeline.generate_noise(shape, seed=seed, rand_device="cpu")`` as its documentation and
    ``MovaAudioVideoUnit_NoiseInitializer`` describe it: a new CPU generator seeded with ``seed`` for every tensor,
    float32 ``torch.randn``."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), device="cpu", dtype=torch.float32)


def _spy_joint_forward(monkeypatch):
    """Record the latents and the timestep each joint forward of the pipeline gets."""
    from diffusers_wan_ext.pipelines import pipeline_mova

    seen, real = [], pipeline_mova.mova_joint_forward

    def spy(video_transformer, audio_transformer, bridge, video, audio, timestep, *args, **kwargs):
        seen.append((video.clone(), audio.clone(), timestep.clone()))
        return real(video_transformer, audio_transformer, bridge, video, audio, timestep, *args, **kwargs)

    monkeypatch.setattr(pipeline_mova, "mova_joint_forward", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_and_timestep_follow_diffsynth(converted, monkeypatch, dtype):
    """Same seed, same noise: the video noise ``[1, 16, (F - 1) / 4 + 1, H / 8, W / 8]`` and the audio noise
    ``[1, 128, L]`` are each drawn from a fresh CPU generator seeded with the seed (video first, then audio, both from
    the same state), so ``generator=torch.Generator().manual_seed(seed)`` gives DiffSynth's tensors; the towers see
    them in their dtype.  The timestep reaches both towers in the DiT dtype: bf16 rounds it as DiffSynth's
    ``timestep.unsqueeze(0).to(dtype=torch_dtype)`` does, float32 keeps it."""
    pipe = MovaPipeline.from_pretrained(converted, torch_dtype=torch.float32)
    for name in ("transformer", "transformer_2", "audio_transformer", "bridge"):
        getattr(pipe, name).to(dtype)
    seen = _spy_joint_forward(monkeypatch)
    seed, num_frames, frame_rate, steps = 11, 9, 12.0, 3
    g = torch.Generator().manual_seed(0)
    pipe(image=Image.new("RGB", (48, 32), (20, 160, 90)), prompt_embeds=torch.randn(1, 6, 32, generator=g),
         height=32, width=48, num_frames=num_frames, frame_rate=frame_rate, num_inference_steps=steps,
         guidance_scale=1.0, generator=torch.Generator().manual_seed(seed), output_type="latent")
    audio_len = (int(8000 * num_frames / frame_rate) - 1) // 160 + 1  # the tiny DAC: 8 kHz, hop 160
    video_noise = _diffsynth_noise((1, 16, (num_frames - 1) // 4 + 1, 32 // 8, 48 // 8), seed)
    audio_noise = _diffsynth_noise((1, 128, audio_len), seed)
    assert len(seen) == steps
    video, audio, _ = seen[0]
    assert video.dtype == audio.dtype == dtype
    assert torch.equal(video, video_noise.to(dtype)) and torch.equal(audio, audio_noise.to(dtype))
    # (the old rule -- audio continuing the generator after the video draw -- gives other audio noise)
    continued = torch.Generator().manual_seed(seed)
    torch.randn(video_noise.shape, generator=continued)
    assert not torch.equal(audio.float(), torch.randn(audio_noise.shape, generator=continued).to(dtype).float())

    timesteps = pipe.scheduler.timesteps
    got = torch.stack([t for _, _, t in seen]).flatten()
    assert got.dtype == dtype and torch.equal(got, timesteps.to(dtype))
    rounded = timesteps.to(torch.bfloat16).float() != timesteps
    assert rounded.any()  # these timesteps are not all bf16 numbers: the check above can tell the two rules apart
    if dtype == torch.float32:
        assert torch.equal(got, timesteps)


def test_given_latents_skip_only_their_own_draw(converted, monkeypatch):
    """Passing ``latents`` alone: the audio noise is still DiffSynth's for the seed (it does not depend on whether the
    video noise was drawn)."""
    pipe = MovaPipeline.from_pretrained(converted, torch_dtype=torch.float32)
    seen = _spy_joint_forward(monkeypatch)
    video = torch.zeros(1, 16, 2, 4, 4)
    g = torch.Generator().manual_seed(0)
    pipe(image=Image.new("RGB", (32, 32)), prompt_embeds=torch.randn(1, 6, 32, generator=g), height=32, width=32,
         num_frames=5, frame_rate=8.0, num_inference_steps=1, guidance_scale=1.0, latents=video,
         generator=torch.Generator().manual_seed(4), output_type="latent")
    assert torch.equal(seen[0][0], video)
    assert torch.equal(seen[0][1], _diffsynth_noise((1, 128, mova_audio_length(5, 8.0, 8000, 160)), 4))


# ------------------------------------------------------------------------------------- release config.json fields
def _component_copy(release, component, tmp_path, edit=None, with_config=True):
    """``component``'s folder copied (weights linked), its ``config.json`` edited by ``edit(cfg)`` or left out."""
    folder = tmp_path / component
    folder.mkdir(parents=True)
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(
        release / component / "diffusion_pytorch_model.safetensors")
    if with_config:
        cfg = json.loads((release / component / "config.json").read_text())
        if edit is not None:
            edit(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_release_configs_use_the_original_class_fields(release):
    """The tiny release writes each ``config.json`` as the original classes' ``save_pretrained`` does: their
    ``_class_name`` and constructor-argument names, with every field the converter requires."""
    from diffusers_wan_ext.conversion.mova import MOVA_RELEASE_CLASSES, MOVA_REQUIRED_CONFIG_FIELDS

    for component, name in MOVA_RELEASE_CLASSES.items():
        cfg = json.loads((release / component / "config.json").read_text())
        assert cfg["_class_name"] == name
        assert all(cfg.get(k) is not None for k in MOVA_REQUIRED_CONFIG_FIELDS.get(component, ())), component
    audio = json.loads((release / "audio_dit" / "config.json").read_text())
    assert audio["vae_type"] == "dac" and audio["patch_size"] == [1] and audio["num_heads"] == 3
    bridge = json.loads((release / "dual_tower_bridge" / "config.json").read_text())
    assert (bridge["interaction_strategy"], bridge["apply_cross_rope"], bridge["audio_fps"]) == ("full", True, 50.0)


@pytest.mark.parametrize("component,field", [("audio_dit", "num_heads"), ("audio_dit", "vae_type"),
                                             ("dual_tower_bridge", "interaction_strategy"),
                                             ("dual_tower_bridge", "apply_cross_rope"),
                                             ("dual_tower_bridge", "audio_fps"), ("audio_vae", "sample_rate")])
def test_release_config_missing_a_needed_field_is_one_line(release, tmp_path, component, field):
    """A field the weights cannot tell and whose original-class default is not the release value: its absence is an
    error naming the file and the field (not a silent guess)."""
    from diffusers_wan_ext.conversion.mova import load_mova_audio_vae

    loader = {"audio_dit": load_mova_audio_dit, "dual_tower_bridge": load_mova_bridge,
              "audio_vae": load_mova_audio_vae}[component]
    loader(_component_copy(release, component, tmp_path / "ok"))  # the whole config loads
    folder = _component_copy(release, component, tmp_path / "bad", lambda cfg: cfg.pop(field))
    with pytest.raises(ConversionError, match=f"{folder / 'config.json'}.*lacks {field}") as err:
        loader(folder)
    assert "\n" not in str(err.value)


def test_release_config_field_errors_through_the_cli(release, tmp_path, capsys):
    """``convert`` of a release whose bridge config.json lacks ``apply_cross_rope``: exit 2, one line, nothing
    written."""
    src = tmp_path / "MOVA-360p"
    src.mkdir()
    for child in release.iterdir():
        if child.name != "dual_tower_bridge":
            (src / child.name).symlink_to(child)
    _component_copy(release, "dual_tower_bridge", src, lambda cfg: cfg.pop("apply_cross_rope"))
    assert main(["convert", str(src), str(tmp_path / "out"), "--dtype", "fp32", "--transformer-only"]) == 2
    err = capsys.readouterr().err.replace("\r", "\n")  # (the progress bar rewrites its line)
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and "dual_tower_bridge/config.json" in errors[0] and "lacks apply_cross_rope" in errors[0]
    assert not (tmp_path / "out").exists()


def test_release_config_values_that_are_not_movas_are_refused(release, tmp_path):
    cases = [("audio_dit", lambda c: c.update(vae_type="oobleck"), "vae_type 'oobleck'"),
             ("audio_dit", lambda c: c.update(patch_size=[2]), "patch_size"),
             ("audio_dit", lambda c: c.update(_class_name="WanModel"), "_class_name 'WanModel'"),
             ("dual_tower_bridge", lambda c: c.update(pooled_adaln=True), "pooled_adaln")]
    for i, (component, edit, message) in enumerate(cases):
        loader = load_mova_audio_dit if component == "audio_dit" else load_mova_bridge
        with pytest.raises(ConversionError, match=message):
            loader(_component_copy(release, component, tmp_path / str(i), edit))


def test_weights_without_config_take_diffsynths_release_values(release, tmp_path):
    """DiffSynth-Studio loads the weights file alone with its hard-coded release values; so do we when no config.json
    is there (and a config given as a dict may be partial)."""
    bridge = load_mova_bridge(_component_copy(release, "dual_tower_bridge", tmp_path, with_config=False)
                              / "diffusion_pytorch_model.safetensors", {"head_dim": 12})
    cfg = bridge.config
    assert (cfg.interaction_strategy, cfg.apply_cross_rope, cfg.audio_fps) == ("full", True, 50.0)


@pytest.mark.parametrize("extra", [[], ["--transformer-only"]])
def test_a_release_without_its_low_noise_expert_is_refused(release, tmp_path, capsys, extra):
    """MOVA-360p and 720p both ship two video experts (DiffSynth-Studio's model configs load video_dit/ and
    video_dit_2/ of each): a folder without video_dit_2/ is refused in one line naming it (exit 2, nothing written),
    not converted into a one-expert pipeline."""
    for name in ("MOVA-360p", "MOVA-720p"):
        src = tmp_path / name
        src.mkdir()
        for child in release.iterdir():
            if child.name != "video_dit_2":
                (src / child.name).symlink_to(child)
        out = tmp_path / f"{name}-out"
        assert main(["convert", str(src), str(out), "--dtype", "fp32", *extra]) == 2
        err = capsys.readouterr().err.replace("\r", "\n")
        errors = [line for line in err.splitlines() if "error: " in line]
        assert len(errors) == 1 and "missing MOVA component(s): video_dit_2." in errors[0], errors
        assert not out.exists()
