"""MOVA against its references beyond the towers' goldens: the latents dtype between steps (DiffSynth-Studio's
``MovaAudioVideoPipeline`` keeps them in its pipeline dtype), and the release ``model_index.json`` fields
``boundary_ratio`` / ``audio_vae_type`` (OpenMOSS ``MOVA.__init__``'s registered config) carried into the converted
folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers_wan_ext.families.mova import convert_mova_release, make_tiny_mova_release
from diffusers_wan_ext.models.mova_joint_forward import mova_joint_forward
from diffusers_wan_ext.pipelines.fun_conditioning import i2v_condition
from diffusers_wan_ext.pipelines.pipeline_mova import MovaPipeline, mova_audio_length
from diffusers_wan_ext.utils.io import safetensors_shapes
from diffusers_wan_ext.utils.media import load_image
from diffusers_wan_ext_cli import main

DIT_PARTS = ("transformer", "transformer_2", "audio_transformer", "bridge")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_tiny_mova_release(tmp_path_factory.mktemp("mova-ref") / "MOVA-360p")


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    return convert_mova_release(release, tmp_path_factory.mktemp("mova-ref-out") / "MOVA-360p-diffusers",
                                dtype="fp32", progress=False)


def _noise(shape, seed):
    """DiffSynth-Studio's ``generate_noise(shape, seed, rand_device="cpu")`` before its cast: float32 ``randn`` from a
    new CPU generator seeded with ``seed``."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def _diffsynth_loop(pipe, image, ctx, neg, *, seed, height, width, num_frames, frame_rate, steps, cfg, dtype):
    """DiffSynth-Studio's ``MovaAudioVideoPipeline.__call__`` written out with its rules: the noise cast to the
    pipeline dtype, ``FlowMatchScheduler("Wan")`` sigmas (shift 5), ``video_dit2`` once ``timestep.item() < 900``,
    the timestep cast to the dtype, ``cfg_guided_model_fn``'s guidance and ``FlowMatchScheduler.step``
    (``sample + model_output * (sigma_ - sigma)``), everything in the latents' dtype.  Returns the latents after
    every step."""
    video = _noise((1, 16, (num_frames - 1) // 4 + 1, height // 8, width // 8), seed).to(dtype)
    audio = _noise((1, 128, mova_audio_length(num_frames, frame_rate, 8000, 160)), seed).to(dtype)
    y = i2v_condition(pipe.vae, load_image(image, height, width), num_frames).to(dtype)
    ctx, neg = ctx.to(dtype), neg.to(dtype)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    sigmas = 5.0 * sigmas / (1 + 4.0 * sigmas)
    timesteps = sigmas * 1000
    after = []
    for i, timestep in enumerate(timesteps):
        expert = pipe.transformer_2 if timestep.item() < 0.9 * 1000 else pipe.transformer
        t = timestep.unsqueeze(0).to(dtype=dtype)
        (v_c, a_c), (v_u, a_u) = [mova_joint_forward(expert, pipe.audio_transformer, pipe.bridge, video, audio, t, c,
                                                     frame_rate, image_condition=y) for c in (ctx, neg)]
        v_pred, a_pred = v_u + cfg * (v_c - v_u), a_u + cfg * (a_c - a_u)
        sigma_ = sigmas[i + 1] if i + 1 < len(sigmas) else 0
        video = video + v_pred * (sigma_ - sigmas[i])
        audio = audio + a_pred * (sigma_ - sigmas[i])
        after.append((video, audio))
    return after


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_latents_stay_in_the_pipeline_dtype_as_in_diffsynth(converted, dtype):
    """The latents are in the DiTs' dtype between steps (bf16 here: the callback sees bf16 latents at every step) and
    the whole run equals a hand-written DiffSynth-Studio loop bit for bit.  With float32 latents (the previous
    rule) the second step's inputs differ: the bf16-rounded noise and the bf16 Euler update are not what a float32
    state holds."""
    pipe = MovaPipeline.from_pretrained(converted, torch_dtype=torch.float32)
    for name in DIT_PARTS:
        getattr(pipe, name).to(dtype)
    g = torch.Generator().manual_seed(7)
    ctx, neg = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    image = Image.fromarray(np.random.default_rng(7).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    shape = dict(height=32, width=48, num_frames=9, frame_rate=12.0)
    seen = []

    def callback(p, i, t, tensors):
        seen.append({k: v.clone() for k, v in tensors.items()})
        return {}

    out = pipe(image=image, prompt_embeds=ctx, negative_prompt_embeds=neg, num_inference_steps=4, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(21), output_type="latent", callback_on_step_end=callback,
               **shape)
    with torch.no_grad():
        ref = _diffsynth_loop(pipe, image, ctx, neg, seed=21, steps=4, cfg=4.0, dtype=dtype, **shape)
    assert [s["latents"].dtype for s in seen] == [dtype] * 4
    assert [s["audio_latents"].dtype for s in seen] == [dtype] * 4
    for step, (video, audio) in enumerate(ref):
        assert torch.equal(seen[step]["latents"], video), step
        assert torch.equal(seen[step]["audio_latents"], audio), step
    assert out.frames.dtype == out.audio.dtype == dtype
    assert torch.equal(out.frames, ref[-1][0]) and torch.equal(out.audio, ref[-1][1])


def test_decoding_takes_the_latents_in_the_pipeline_dtype(converted, monkeypatch):
    """The decoders get DiffSynth's final latents: the bf16 state (cast to the VAEs' dtype, float32 here)."""
    pipe = MovaPipeline.from_pretrained(converted, torch_dtype=torch.float32)
    for name in DIT_PARTS:
        getattr(pipe, name).to(torch.bfloat16)
    got = {}
    real_video, real_audio = pipe.decode_latents, pipe.decode_audio

    def decode_video(latents, **kwargs):
        got["video"] = latents
        return real_video(latents, **kwargs)

    def decode_audio(latents):
        got["audio"] = latents
        return real_audio(latents)

    monkeypatch.setattr(pipe, "decode_latents", decode_video)
    monkeypatch.setattr(pipe, "decode_audio", decode_audio)
    g = torch.Generator().manual_seed(0)
    out = pipe(image=Image.new("RGB", (32, 32), (10, 90, 200)), prompt_embeds=torch.randn(1, 6, 32, generator=g),
               height=32, width=32, num_frames=5, frame_rate=8.0, num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(1), output_type="np")
    assert got["video"].dtype == got["audio"].dtype == torch.bfloat16
    assert out.frames.shape == (1, 5, 32, 32, 3) and np.isfinite(out.audio).all()


# ------------------------------------------------------------------------------- release model_index.json fields
def _release_copy(release, tmp_path, **fields):
    """The tiny release copied (weights linked) with its ``model_index.json`` fields replaced (``None``: removed)."""
    dst = tmp_path / "MOVA-360p"
    dst.mkdir()
    for item in release.iterdir():
        if item.name != "model_index.json":
            (dst / item.name).symlink_to(item)
    index = json.loads((release / "model_index.json").read_text())
    index.update(fields)
    (dst / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if v is not None}))
    return dst


def _experts_per_step(pipe, steps):
    """Which video expert ran at each step (a hook on each expert's patch embedding)."""
    ran = []
    hooks = [getattr(pipe, name).patch_embedding.register_forward_hook(lambda *a, name=name: ran.append(name))
             for name in ("transformer", "transformer_2")]
    g = torch.Generator().manual_seed(0)
    pipe(image=Image.new("RGB", (32, 32), (200, 40, 40)), prompt_embeds=torch.randn(1, 6, 32, generator=g),
         height=32, width=32, num_frames=5, frame_rate=8.0, num_inference_steps=steps, guidance_scale=1.0,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    for hook in hooks:
        hook.remove()
    return ran


def test_the_release_boundary_ratio_moves_the_expert_switch(release, converted, tmp_path):
    """``boundary_ratio`` 0.8 in the release's ``model_index.json`` becomes the converted pipeline's config: at 4 steps
    (timesteps 1000, 937.5, 833.3, 625) the high-noise expert runs three steps instead of the default's two."""
    index = json.loads((converted / "model_index.json").read_text())
    assert (index["boundary_ratio"], index["audio_vae_type"]) == (0.9, "dac")
    default = MovaPipeline.from_pretrained(converted, torch_dtype=torch.float32)
    assert _experts_per_step(default, 4) == ["transformer"] * 2 + ["transformer_2"] * 2

    dst = tmp_path / "out"
    assert main(["convert", str(_release_copy(release, tmp_path, boundary_ratio=0.8)), str(dst), "--dtype",
                 "fp32"]) == 0
    index = json.loads((dst / "model_index.json").read_text())
    assert (index["boundary_ratio"], index["audio_vae_type"]) == (0.8, "dac")
    assert json.loads((dst / "wan_variant.json").read_text())["boundary_ratio"] == 0.8
    pipe = MovaPipeline.from_pretrained(dst, torch_dtype=torch.float32)
    assert pipe.config.boundary_ratio == 0.8
    assert _experts_per_step(pipe, 4) == ["transformer"] * 3 + ["transformer_2"]


def test_a_release_index_without_the_fields_takes_the_release_values(release, tmp_path):
    """No ``boundary_ratio`` / ``audio_vae_type`` (or no ``model_index.json``): 0.9 and ``dac``, the values of both
    releases and DiffSynth-Studio's defaults."""
    src = _release_copy(release, tmp_path, boundary_ratio=None, audio_vae_type=None)
    dst = convert_mova_release(src, tmp_path / "out", dtype="fp32", progress=False, transformer_only=False)
    index = json.loads((dst / "model_index.json").read_text())
    assert (index["boundary_ratio"], index["audio_vae_type"]) == (0.9, "dac")
    (src / "model_index.json").unlink()
    dst = convert_mova_release(src, tmp_path / "out2", dtype="fp32", progress=False, transformer_only=True)
    assert json.loads((dst / "wan_variant.json").read_text())["boundary_ratio"] == 0.9


@pytest.mark.parametrize("fields,named", [
    (dict(audio_vae_type="oobleck"), "audio_vae_type 'oobleck'"),
    (dict(audio_vae_type="encodec"), "audio_vae_type 'encodec'"),
    (dict(boundary_ratio=1.5), "boundary_ratio"),
    (dict(boundary_ratio="0.9"), "boundary_ratio"),
    (dict(boundary_ratio=True), "boundary_ratio"),
])
def test_release_index_values_it_cannot_honour_are_one_line(release, tmp_path, capsys, fields, named):
    """A value the pipeline cannot honour is refused before anything loads, in one line naming the file and the
    field; nothing is written."""
    src = _release_copy(release, tmp_path, **fields)
    assert main(["convert", str(src), str(tmp_path / "out"), "--dtype", "fp32"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model_index.json" in errors[0] and named in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_release_index_that_is_not_an_object_is_one_line(release, tmp_path, capsys):
    src = _release_copy(release, tmp_path)
    (src / "model_index.json").write_text("[]")
    assert main(["convert", str(src), str(tmp_path / "out"), "--dtype", "fp32", "--transformer-only"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model_index.json" in errors[0], errors


def test_a_converted_folder_edited_to_another_audio_vae_is_refused_at_load(converted, tmp_path):
    dst = tmp_path / "edited"
    shutil.copytree(converted, dst, symlinks=True)
    index = json.loads((dst / "model_index.json").read_text())
    (dst / "model_index.json").write_text(json.dumps({**index, "audio_vae_type": "oobleck"}))
    with pytest.raises(ValueError, match="audio_vae_type 'oobleck' is not supported") as info:
        MovaPipeline.from_pretrained(dst, torch_dtype=torch.float32)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------- header-only shapes
def test_safetensors_shapes_reads_the_header(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.zeros(3, 4), "b": torch.zeros(2)}, str(path))
    assert safetensors_shapes(path) == {"a.weight": (3, 4), "b": (2,)}
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert safetensors_shapes(tmp_path / "bad.safetensors") is None
