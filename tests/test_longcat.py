"""LongCat-Video: key map, converter on tiny original-layout releases, the pipeline end to end on CPU (real mp4 in and
out), save / from_pretrained, KV cache, Diffusers features of the transformer, and bad-input errors."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_wan_ext import LongCatVideoPipeline, LongCatVideoTransformer3DModel
from diffusers_wan_ext.conversion.longcat import (
    convert_longcat_state_dict,
    export_longcat_state_dict,
    load_longcat_transformer_from_original,
    longcat_config_from_state_dict,
)
from diffusers_wan_ext.families.longcat import convert_longcat_release
from diffusers_wan_ext.release_converter import convert_release
from diffusers_wan_ext.demo import make_tiny_longcat_release, write_video
from diffusers_wan_ext.utils import ConversionError, load_state_dict_files

from helpers import run_python

GEN = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_tiny_longcat_release(tmp_path_factory.mktemp("longcat") / "LongCat-Video", shards=2)


@pytest.fixture(scope="module")
def folder(release, tmp_path_factory):
    return convert_release(release, tmp_path_factory.mktemp("longcat-out") / "diffusers", dtype="fp32", progress=False)


@pytest.fixture(scope="module")
def pipe(folder):
    return DiffusionPipeline.from_pretrained(str(folder))


def _dit_sd(release):
    return load_state_dict_files(sorted((release / "dit").glob("*.safetensors")))


def _tiny_model(seed=0, **kw) -> LongCatVideoTransformer3DModel:
    torch.manual_seed(seed)
    cfg = dict(num_attention_heads=2, attention_head_dim=24, num_layers=2, text_dim=32, freq_dim=32, time_embed_dim=32,
               ffn_dim=256)
    cfg.update(kw)
    model = LongCatVideoTransformer3DModel(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# ----------------------------------------------------------------------------------------------------- key map


def test_key_map_round_trip_and_split(release):
    sd = _dit_sd(release)
    conv = convert_longcat_state_dict(sd)
    q, k, v = (conv[f"blocks.1.attn1.to_{n}.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q, k, v]), sd["blocks.1.attn.qkv.weight"])
    assert torch.equal(conv["blocks.0.attn2.to_v.bias"], sd["blocks.0.cross_attn.kv_linear.bias"].chunk(2)[1])
    back = export_longcat_state_dict(conv)
    assert back.keys() == sd.keys() and all(torch.equal(back[n], sd[n]) for n in sd)
    # a wrapper prefix is stripped
    assert convert_longcat_state_dict({"model." + n: t for n, t in sd.items()}).keys() == conv.keys()


def test_unknown_keys_and_config_mismatch_are_named(release):
    sd = _dit_sd(release)
    with pytest.raises(ConversionError, match="blocks.0.attn.lora_up.weight"):
        convert_longcat_state_dict({**sd, "blocks.0.attn.lora_up.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="depth=3 but the weights have depth=2"):
        longcat_config_from_state_dict(sd, {"depth": 3})
    with pytest.raises(ConversionError, match="mlp_ratio"):
        longcat_config_from_state_dict(sd, {"mlp_ratio": 12})
    with pytest.raises(ConversionError, match="blocks.1 differs from blocks.0"):
        longcat_config_from_state_dict({n: t for n, t in sd.items() if n != "blocks.1.ffn.w3.weight"})
    with pytest.raises(ConversionError, match="missing key"):
        longcat_config_from_state_dict({"x_embedder.proj.weight": sd["x_embedder.proj.weight"]})


def test_config_from_weights(release):
    cfg = longcat_config_from_state_dict(_dit_sd(release), json.loads((release / "dit" / "config.json").read_text()))
    assert cfg["num_attention_heads"] == 2 and cfg["attention_head_dim"] == 24 and cfg["num_layers"] == 2
    assert cfg["ffn_dim"] == 256 and cfg["time_embed_dim"] == 32 and cfg["text_tokens_zero_pad"] is True


# ----------------------------------------------------------------------------------------------------- converter


def test_converted_folder_layout(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_wan_ext", "LongCatVideoPipeline"]
    assert index["transformer"] == ["diffusers_wan_ext", "LongCatVideoTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"] and index["text_encoder"][1] == "UMT5EncoderModel"
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 12.0
    assert json.loads((folder / "wan_variant.json").read_text())["name"] == "longcat-video"


def test_wan_component_files_and_bf16(tmp_path):
    """dit/ + the Wan2.1 .pth files DiffSynth-Studio pairs it with; bf16 keeps the float32 modules float32."""
    rel = make_tiny_longcat_release(tmp_path / "rel", layout="wan")
    out = convert_release(rel, tmp_path / "out", dtype="bf16", progress=False)
    from safetensors.torch import load_file

    stored = load_file(str(next((out / "transformer").glob("*.safetensors"))))
    assert stored["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    for name in ("blocks.0.norm1.linear.weight", "proj_out.weight", "time_embedder.linear_1.weight", "blocks.1.norm2.weight"):
        assert stored[name].dtype == torch.float32, name
    model = LongCatVideoTransformer3DModel.from_pretrained(str(out / "transformer"), dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].norm1.linear.weight.dtype == torch.float32


def test_converter_errors_write_nothing(release, tmp_path):
    import shutil

    broken = tmp_path / "rel"
    shutil.copytree(release, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ConversionError, match="missing component.*text_encoder"):
        convert_release(broken, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    convert_longcat_release(broken, tmp_path / "t", transformer_only=True, progress=False, dtype="fp32")
    assert (tmp_path / "t" / "config.json").is_file()
    with pytest.raises(ConversionError, match="no LongCat-Video DiT"):
        convert_longcat_release(tmp_path / "t", tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_cli_convert_generate_and_continue(release, tmp_path, capsys):
    from diffusers.utils import load_video

    from diffusers_wan_ext_cli import main

    assert main(["convert", str(release), str(tmp_path / "cli"), "--dtype", "fp32"]) == 0
    assert "converted" in capsys.readouterr().out
    gen = ["generate", "--model", str(tmp_path / "cli"), "--prompt", "a fox", "--height", "32", "--width", "32",
           "--steps", "1", "--dtype", "fp32"]
    assert main(gen + ["--num-frames", "9", "--output", str(tmp_path / "a.mp4")]) == 0
    assert main(gen + ["--num-frames", "13", "--video", str(tmp_path / "a.mp4"), "--num-cond-frames", "5",
                       "--output", str(tmp_path / "b.mp4")]) == 0
    assert len(load_video(str(tmp_path / "b.mp4"))) == 13
    assert main(gen + ["--num-frames", "13", "--video", str(tmp_path / "a.mp4"), "--num-cond-frames", "4"]) == 2
    assert "num_cond_frames=4 must be 4n+1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- pipeline


def test_text_to_video_then_continue_an_mp4(pipe, tmp_path):
    from diffusers.utils import load_video

    assert type(pipe).__name__ == "LongCatVideoPipeline"
    frames = pipe("a red fox runs through snow", num_frames=9, generator=torch.Generator().manual_seed(0),
                  output_type="np", **GEN).frames[0]
    assert frames.shape == (9, 32, 32, 3) and np.isfinite(frames).all()
    mp4 = write_video(frames, tmp_path / "t2v.mp4", fps=15)
    assert len(load_video(str(mp4))) == 9
    out = pipe("the fox jumps", video=str(mp4), num_cond_frames=5, num_frames=13,
               generator=torch.Generator().manual_seed(1), output_type="pt", **GEN).frames
    assert out.shape == (1, 13, 3, 32, 32) and torch.isfinite(out).all()
    write_video(out[0].permute(0, 2, 3, 1).numpy(), tmp_path / "vc.mp4")
    # image-to-video (one conditioning frame)
    img = pipe("a fox", image=load_video(str(mp4))[0], num_frames=9, generator=torch.Generator().manual_seed(2),
               output_type="latent", **GEN).frames
    assert img.shape == (1, 16, 3, 4, 4)


def test_conditioning_latents_stay_clean_and_kv_cache_is_exact(pipe):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    kw = dict(video=video, num_cond_frames=5, num_frames=13, output_type="latent", **GEN)
    a = pipe("a fox", generator=torch.Generator().manual_seed(3), **kw).frames
    b = pipe("a fox", generator=torch.Generator().manual_seed(3), use_kv_cache=False, **kw).frames
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    from diffusers_wan_ext.utils.media import encode_video

    cond = encode_video(pipe.vae, torch.from_numpy(video[-5:]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)
    torch.testing.assert_close(a[:, :, :2], cond, rtol=1e-4, atol=1e-4)
    c = pipe("a fox", generator=torch.Generator().manual_seed(3), cfg_zero_star=False, **kw).frames
    assert (a - c)[:, :, 2:].abs().max() > 1e-4  # CFG-Zero* is live


def test_save_and_reload_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    again = DiffusionPipeline.from_pretrained(str(tmp_path / "saved"))
    assert isinstance(again, LongCatVideoPipeline)
    kw = dict(num_frames=5, output_type="latent", **GEN)
    a = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).frames
    b = again("a cat", generator=torch.Generator().manual_seed(0), **kw).frames
    assert torch.equal(a, b)


def test_fresh_interpreter_loads_with_trust_remote_code(folder):
    code = textwrap.dedent(f"""
        import sys, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert "diffusers_wan_ext" in sys.modules and type(pipe).__name__ == "LongCatVideoPipeline"
        out = pipe("a cat", num_frames=5, height=32, width=32, num_inference_steps=1, max_sequence_length=8,
                   output_type="latent").frames
        print(tuple(out.shape))
    """)
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(1, 16, 2, 4, 4)" in r.stdout


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_frames=10), "4n\\+1"),
        (dict(height=30), "multiple of 16"),
        (dict(num_cond_frames=5), "pass `video` too"),
        (dict(video="V", num_cond_frames=4), "num_cond_frames=4 must be 4n\\+1"),
        (dict(video="V", num_cond_frames=13), "only 9 frame"),
        (dict(video="V6"), "6 frames -- pass num_cond_frames"),
        (dict(video="V", num_cond_frames=9, num_frames=9), "num_frames must exceed them"),
        (dict(video="V", image="I"), "either `video`"),
        (dict(video="V16"), "16x16 .*resize"),
        (dict(prompt=None), "pass `prompt`"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries"),
    ],
)
def test_bad_inputs(pipe, kwargs, match):
    rng = np.random.default_rng(0)
    inputs = {"V": rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8),
              "V6": rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8),
              "V16": rng.integers(0, 255, (9, 16, 16, 3), dtype=np.uint8),
              "I": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)}
    kw = dict(prompt="a fox", num_frames=13, **GEN)
    kw.update({k: inputs.get(v, v) if isinstance(v, str) and k in ("video", "image") else v for k, v in kwargs.items()})
    with pytest.raises(ValueError, match=match):
        pipe(**kw)


def test_schedules():
    from diffusers_wan_ext.pipelines.pipeline_longcat_video import longcat_sigmas

    s = longcat_sigmas(50, 12.0, enhance_hf=True)
    assert np.allclose(s[-10:] * 1000, np.arange(500, 0, -50)) and (s[:-10] * 1000 > 500).all()
    assert len(longcat_sigmas(16, 12.0, use_distill=True)) == 16
    with pytest.raises(ValueError, match="cannot both"):
        longcat_sigmas(16, 12.0, enhance_hf=True, use_distill=True)


# ----------------------------------------------------------------------------------------------------- transformer


def test_golden_kv_cache_matches_reference():
    from golden_runners import load_case
    from golden_runners.core import GOLDENS_DIR

    if not (GOLDENS_DIR / "dit_longcat" / "manifest.json").is_file():
        pytest.skip("no dit_longcat fixture in WAN_GOLDENS_DIR")
    case = load_case("dit_longcat")
    if "longcat_latents" not in case.inputs or "velocity" not in case.outputs:
        pytest.skip("this fixture set's dit_longcat has no conditioning latents / velocity to check a K/V cache with")
    model = load_longcat_transformer_from_original(case.weights(), case.config)
    x = case.inputs
    k = x["longcat_latents"].shape[2]
    mask = (x["context"] != 0).any(-1)
    with torch.no_grad():
        cache = model.build_kv_cache(x["longcat_latents"])
        out = -model(x["latents"][:, :, k:], x["timestep"], x["context"], encoder_attention_mask=mask,
                     kv_cache=cache).sample
    tol = case.manifest["tolerance"]
    torch.testing.assert_close(out, case.outputs["velocity"][:, :, k:], rtol=tol["rtol"], atol=tol["atol"])


def test_per_frame_timesteps_and_conditioning_semantics():
    model = _tiny_model()
    x, ctx = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 5, 32)
    with torch.no_grad():
        a = model(x, torch.tensor([700.0]), ctx, num_cond_latents=1).sample
        b = model(x, torch.tensor([[0.0, 700.0, 700.0]]), ctx, num_cond_latents=1).sample
        x2 = x.clone()
        x2[:, :, 1:] = torch.randn_like(x2[:, :, 1:])
        c = model(x2, torch.tensor([700.0]), ctx, num_cond_latents=1).sample
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:, :, :1], c[:, :, :1])  # conditioning frames do not see the noisy ones
    with pytest.raises(ValueError, match="one per latent frame"):
        model(x, torch.zeros(1, 2), ctx)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(torch.randn(1, 16, 3, 5, 4), torch.tensor([1.0]), ctx)


def test_batched_rows_equal_single_rows_with_caption_masks():
    model = _tiny_model()
    x, ctx, t = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 6, 32), torch.tensor([300.0, 900.0])
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        # release setting (text_tokens_zero_pad): padding tokens become zeros but stay in the attention
        both = model(x, t, ctx, encoder_attention_mask=mask).sample
        row = model(x[1:], t[1:], ctx[1:], encoder_attention_mask=mask[1:]).sample
        torch.testing.assert_close(both[1:], row, rtol=1e-5, atol=1e-5)
        zeroed = ctx.clone()
        zeroed[1, 4:] = 0
        assert (model(x[1:], t[1:], zeroed[1:]).sample - row).abs().max() > 1e-4  # zeroing happens after y_proj
        # text_tokens_zero_pad=False: padding keys are masked out, as if the caption were cut to its length
        model.register_to_config(text_tokens_zero_pad=False)
        both = model(x, t, ctx, encoder_attention_mask=mask).sample
        cut = model(x[1:], t[1:], ctx[1:, :4]).sample
        torch.testing.assert_close(both[1:], cut, rtol=1e-5, atol=1e-5)
    model.register_to_config(text_tokens_zero_pad=True)


def test_gradient_checkpointing_lora_fusion_and_backend():
    from peft import LoraConfig

    model = _tiny_model()
    x, ctx, t = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 5, 32), torch.tensor([400.0])
    with torch.no_grad():
        ref = model(x, t, ctx, num_cond_latents=1).sample
    model.fuse_qkv_projections()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx, num_cond_latents=1).sample, ref, rtol=1e-5, atol=1e-5)
    model.unfuse_qkv_projections()
    model.set_attention_backend("native")
    model.train()
    model.enable_gradient_checkpointing()
    out = model(x, t, ctx, num_cond_latents=1).sample
    out.square().mean().backward()
    assert model.blocks[0].attn1.to_q.weight.grad is not None
    model.zero_grad()
    model.disable_gradient_checkpointing()
    model.eval()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]))
    with torch.no_grad():
        lora = model(x, t, ctx, num_cond_latents=1).sample
        assert (lora - ref).abs().max() > 1e-4
        model.disable_adapters()
        torch.testing.assert_close(model(x, t, ctx, num_cond_latents=1).sample, ref)


def test_first_block_cache_hook_runs():
    from diffusers.hooks import FirstBlockCacheConfig

    model = _tiny_model()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    x, ctx = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 5, 32)
    with torch.no_grad(), model.cache_context("cond"):
        a = model(x, torch.tensor([900.0]), ctx).sample
        b = model(x, torch.tensor([899.0]), ctx).sample
    assert a.shape == b.shape
    model.disable_cache()


_PARALLEL_WORKER = textwrap.dedent("""
    import json, sys, torch
    from diffusers import DiffusionPipeline
    from diffusers_wan_ext import LongCatVideoTransformer3DModel
    from diffusers_wan_ext.parallel import enable_parallelism, init_distributed

    folder, outdir = sys.argv[1], sys.argv[2]
    rank, world, device = init_distributed()
    res = {}
    torch.manual_seed(0)
    m = LongCatVideoTransformer3DModel(num_attention_heads=2, attention_head_dim=24, num_layers=2, text_dim=32,
                                       freq_dim=32, time_embed_dim=32, ffn_dim=256).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g), torch.tensor([600.0])
    odd = torch.randn(1, 16, 3, 6, 6, generator=g)  # 9 tokens per frame: no split over 2 ranks
    with torch.no_grad():
        ref = m(x, t, ctx, num_cond_latents=1).sample
        refkv = m(x[:, :, 1:], t, ctx, kv_cache=m.build_kv_cache(x[:, :, :1])).sample
    enable_parallelism(m, cfg_parallel=False)
    with torch.no_grad():
        out = m(x, t, ctx, num_cond_latents=1).sample
        outkv = m(x[:, :, 1:], t, ctx, kv_cache=m.build_kv_cache(x[:, :, :1])).sample
        try:
            m(odd, t, ctx)
            res["odd"] = "no error"
        except ValueError as e:
            res["odd"] = str(e)
    res["model"] = max((out - ref).abs().max().item(), (outkv - refkv).abs().max().item())

    pipe = DiffusionPipeline.from_pretrained(folder)
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=2, max_sequence_length=8, output_type="np",
              video=torch.rand(5, 3, 32, 32) * 2 - 1)
    single = pipe("a fox", generator=torch.Generator().manual_seed(0), **{**kw, "output_type": "latent"}).frames
    state = enable_parallelism(pipe, cfg_parallel=True)
    res["layout"] = [state.cfg_degree, state.ulysses_degree, state.ring_degree]
    latents = pipe("a fox", generator=torch.Generator().manual_seed(0), **{**kw, "output_type": "latent"}).frames
    res["pipeline"] = (latents - single).abs().max().item()
    res["decoded"] = pipe("a fox", generator=torch.Generator().manual_seed(0), **kw).frames.shape[-1] == 3
    json.dump(res, open(f"{outdir}/rank{rank}.json", "w"))
""")


@pytest.mark.slow
def test_enable_parallelism_two_ranks(folder, tmp_path):
    """The package's enable_parallelism over 2 gloo ranks (torchrun): Ulysses through the model's _cp_plan (with and
    without the KV cache) and CFG parallel in the pipeline give the single-process results; only rank 0 decodes."""
    import subprocess
    import sys

    from helpers import src_env

    (tmp_path / "worker.py").write_text(_PARALLEL_WORKER)
    env = src_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(tmp_path / "worker.py"), str(folder), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["model"] < 2e-5 and res["pipeline"] < 2e-5, (rank, res)
        assert "must divide by the degree" in res["odd"]
        assert res["layout"] == [2, 1, 1]
        assert res["decoded"] == (rank == 0)


# ----------------------------------------------------------------------------------------------------- LoRA


def _merge_original_lora(dit_sd: dict, lora_sd: dict) -> dict:
    """Reference: apply an original-format LoRA the way lora_utils.LoRAModule does (down -> per-chunk up blocks),
    merged into the original-layout weights."""
    from diffusers_wan_ext.conversion.longcat import LORA_HYPHEN, LORA_PREFIX

    out = dict(dit_sd)
    for name in {k.split(".", 1)[0] for k in lora_sd}:
        module = name[len(LORA_PREFIX):].replace(LORA_HYPHEN, ".")
        down = lora_sd[f"{name}.lora_down.weight"]
        ups = [v for k, v in sorted(lora_sd.items()) if k.startswith(f"{name}.lora_up.blocks.")]
        ups = ups or [lora_sd[f"{name}.lora_up.weight"]]
        r = down.shape[0] // len(ups)
        delta = torch.cat([up @ down[i * r:(i + 1) * r] for i, up in enumerate(ups)], dim=0)
        out[module + ".weight"] = out[module + ".weight"] + float(lora_sd[f"{name}.alpha_scale"]) * delta
    return out


@pytest.mark.parametrize("fused_single_up", [False, True])
def test_original_lora_loads_and_matches_merged_weights(release, fused_single_up):
    from diffusers_wan_ext.demo import make_tiny_longcat_lora
    from diffusers_wan_ext.pipelines.pipeline_longcat_video import LongCatVideoLoraLoaderMixin

    dit_sd = _dit_sd(release)
    lora = make_tiny_longcat_lora(dit_sd, seed=5, fused_single_up=fused_single_up)
    reference = load_longcat_transformer_from_original(_merge_original_lora(dit_sd, lora))
    model = load_longcat_transformer_from_original(dit_sd)
    peft_sd = LongCatVideoLoraLoaderMixin.lora_state_dict(lora)
    assert all(".lora_A." in k or ".lora_B." in k for k in peft_sd)
    model.load_lora_adapter(peft_sd, adapter_name="distill")
    x, ctx, t = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 5, 32), torch.tensor([500.0])
    with torch.no_grad():
        want = reference(x, t, ctx, num_cond_latents=1).sample
        got = model(x, t, ctx, num_cond_latents=1).sample
        base = load_longcat_transformer_from_original(dit_sd)(x, t, ctx, num_cond_latents=1).sample
    assert (want - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_pipeline_load_lora_weights_from_release_and_converted_folder(pipe, release, folder):
    kw = dict(num_frames=5, output_type="latent", **GEN)
    base = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).frames
    pipe.load_lora_weights(str(release / "lora"), weight_name="cfg_step_lora.safetensors", adapter_name="orig")
    orig = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).frames
    pipe.delete_adapters("orig")
    assert (folder / "lora" / "cfg_step_lora.safetensors").is_file()  # converted by the release converter
    pipe.load_lora_weights(str(folder / "lora"), weight_name="cfg_step_lora.safetensors", adapter_name="conv")
    conv = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).frames
    pipe.delete_adapters("conv")
    after = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).frames
    assert (orig - base).abs().max() > 1e-4
    torch.testing.assert_close(orig, conv)
    torch.testing.assert_close(after, base)


def test_example_script_runs_tiny(tmp_path):
    import importlib.util

    from diffusers.utils import load_video

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("longcat_example", ROOT / "examples" / "longcat_video.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--tiny", "--segments", "2", "--output", str(tmp_path / "a.mp4")])
    assert len(load_video(str(tmp_path / "a.mp4"))) == 9 + (9 - 5)
    example.main(["--tiny", "--video", str(tmp_path / "a.mp4"), "--distill", "--output", str(tmp_path / "b.mp4")])
    assert len(load_video(str(tmp_path / "b.mp4"))) == 13 + (9 - 5)


def test_lora_keys_that_do_not_fit_are_named(pipe):
    a = torch.zeros(4, 48)
    with pytest.raises(ValueError, match="transformer.blocks.7.attn1.to_q.lora_A.weight"):
        pipe.load_lora_weights({"transformer.blocks.7.attn1.to_q.lora_A.weight": a,
                                "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.zeros(48, 4)})
    with pytest.raises(ValueError, match="shapes that do not fit"):
        pipe.load_lora_weights({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 40),
                                "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(48, 4)})
    with pytest.raises(ConversionError, match="does not have"):
        pipe.load_lora_weights({"lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___"
                                "qkvx.lora_down.weight": a})
    assert not pipe.get_list_adapters().get("transformer")
