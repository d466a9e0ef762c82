"""Wan2.2-Animate-2: release-layout converter, ``WanAnimate2ExtTransformer3DModel`` (dense generation attention,
``log_scale``, CLIP width from the config), the family's variants and the tiny release -> ``diffusers-wan convert`` ->
``from_pretrained`` in a fresh interpreter, and stock Diffusers' modular ``WanAnimate2Blocks`` pipeline loading and
running the converted folder.  Parity with DiffSynth is the ``dit_animate2`` golden
(tests/golden_runners/animate2.py); here its reference-pass K/V cache is checked too."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import imageio
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, WanAnimate2Transformer3DModel
from diffusers.models.transformers.transformer_wan_animate_2 import rope_apply
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers_wan_ext_cli import main
from diffusers_wan_ext.conversion.animate2 import (
    animate2_config_from_state_dict,
    convert_animate2_state_dict,
    export_animate2_state_dict,
    load_animate2_transformer_from_original,
)
from diffusers_wan_ext.demo import make_tiny_dataset, make_tiny_release
from diffusers_wan_ext.families import family, get_variant
from diffusers_wan_ext.families.animate2 import convert_animate2_release, make_tiny_animate2_dit
from diffusers_wan_ext.models import WanAnimate2ExtTransformer3DModel
from diffusers_wan_ext.models.transformer_wan_animate2 import (
    WanAnimate2DenseAttnProcessor,
    frame_attention,
    frame_attention_op,
)
from diffusers_wan_ext.pipelines.pipeline_wan_animate2 import plan_clips, zigzag_indices
from diffusers_wan_ext.training import parse_args, run_training
from diffusers_wan_ext.utils.media import encode_video
from diffusers_wan_ext.utils.io import ConversionError
from helpers import ROOT, src_env

TINY_CFG = dict(text_len=16, dim=48, ffn_dim=96, freq_dim=32, text_dim=32, num_heads=2, num_layers=2, clip_dim=40)


def _inputs(model, frames=3, h=4, w=4, seed=0):
    """Generation / reference inputs for a clip of ``frames`` reference latent frames of ``h x w`` latents."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        latents=r(16, frames + 1, h, w), y=r(c.in_dim - 16, frames + 1, h, w), ref=r(16, frames, h, w),
        ref_y=r(c.in_dim - 16, frames, h, w), context=r(c.text_len, c.text_dim), clip=r(1, 257, c.clip_dim),
        t=torch.tensor([700.0]),
    )


def _run(model, x, origin_len, origin_area, **kw):
    grid_ref = torch.tensor([[x["ref"].shape[1], x["ref"].shape[2] // 2, x["ref"].shape[3] // 2]])
    grid = torch.tensor([[x["latents"].shape[1], x["latents"].shape[2] // 2, x["latents"].shape[3] // 2]])
    cache = model.new_kv_cache()
    with torch.no_grad():
        model([x["ref"]], x["t"], [x["context"]], [x["ref_y"]], cache, "extract", seq_len=int(grid_ref.prod()),
              encoder_hidden_states_image=x["clip"], offset_grid_sizes=grid_ref)
        out = model([x["latents"]], x["t"], [x["context"]], [x["y"]], cache, "cached", seq_len=int(grid.prod()),
                    encoder_hidden_states_image=x["clip"], reference_grid_sizes=grid_ref, origin_len=origin_len,
                    origin_area=origin_area, return_dict=False, **kw)[0][0]
    return out, cache


def _tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = WanAnimate2ExtTransformer3DModel(**{**TINY_CFG, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# ------------------------------------------------------------------------------------------------ converter
def test_release_layout_round_trip_and_config():
    model = _tiny_model()
    release = export_animate2_state_dict(model.state_dict())
    assert "blocks.1.block.cross_attn.k_img.weight" in release and "blocks.0.block.self_attn.o.bias" in release
    assert convert_animate2_state_dict(release).keys() == model.state_dict().keys()
    assert export_animate2_state_dict(convert_animate2_state_dict(release)).keys() == release.keys()
    cfg = animate2_config_from_state_dict(release, {"num_heads": 2, "text_len": 16})
    assert {k: cfg[k] for k in TINY_CFG} == TINY_CFG and cfg["in_dim"] == 36 and cfg["out_dim"] == 16
    loaded = load_animate2_transformer_from_original(release, {"num_heads": 2, "text_len": 16})
    x = _inputs(model)
    assert torch.equal(_run(model, x, 9, [64, 64])[0], _run(loaded, x, 9, [64, 64])[0])


def test_converter_errors_name_the_keys():
    release = export_animate2_state_dict(_tiny_model().state_dict())
    with pytest.raises(ConversionError, match="blocks.0.block.extra.weight"):
        convert_animate2_state_dict({**release, "blocks.0.block.extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="missing key.*patch_embedding.weight"):
        animate2_config_from_state_dict({k: v for k, v in release.items() if k != "patch_embedding.weight"})
    with pytest.raises(ConversionError, match="config.json says dim=64"):
        animate2_config_from_state_dict(release, {"dim": 64, "num_heads": 2})
    with pytest.raises(ConversionError, match="num_heads 5"):
        animate2_config_from_state_dict(release, {"num_heads": 5})
    gap = {k: v for k, v in release.items() if not k.startswith("blocks.0.")}
    with pytest.raises(ConversionError, match="blocks.0.block"):
        animate2_config_from_state_dict(gap, {"num_heads": 2})


# -------------------------------------------------------------------------------------------------- model
def _reference_attention(q, k, v, k_ref, v_ref, frames, hw, ref_frames, ref_hw, of, ohw, log_scale):
    """The reference's packed buffers and BlockMask logic, evaluated densely."""
    def pack(x, n, per, total):
        out = x.new_zeros(1, total, *x.shape[2:])
        out[:, : n * ohw].view(1, n, ohw, *x.shape[2:])[:, :, :per] = x.view(1, n, per, *x.shape[2:])
        return out

    q_len, k_len = (of + 1) * ohw, of * ohw
    q_tot, k_tot = math.ceil(q_len / 128) * 128, math.ceil(k_len / 128) * 128
    qp = pack(q, frames, hw, q_tot)
    kp = torch.cat([pack(k, frames, hw, q_tot), pack(k_ref, ref_frames, ref_hw, k_tot)], 1)
    vp = torch.cat([pack(v, frames, hw, q_tot), pack(v_ref, ref_frames, ref_hw, k_tot)], 1)
    qi, ki = torch.arange(q_tot)[:, None], torch.arange(q_tot + k_tot)[None]
    first = ki < q_tot
    kv_frame = torch.where(first, ki // ohw, (ki - q_tot) // ohw + 1)
    kv_valid = torch.where(first, ki < q_len, (ki - q_tot) < k_len)
    mask = (qi < q_len) & ((ki < q_len) | ((qi // ohw == kv_frame) & kv_valid))
    scores = torch.einsum("bqhd,bkhd->bhqk", qp, kp) / math.sqrt(q.shape[-1])
    scores = scores + ((ki >= ohw) & (ki < 2 * ohw)).float() * log_scale
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1).nan_to_num(), vp)
    return out[:, : frames * ohw].view(1, frames, ohw, *q.shape[2:])[:, :, :hw].reshape(1, frames * hw, *q.shape[2:])


@pytest.mark.parametrize("log_scale", [0.0, -1.3])
def test_dense_processor_equals_the_block_mask(log_scale):
    """A clip smaller than the video geometry (2x2 tokens per frame in 4x4 slots, fewer frames): the zero slots
    count in the softmax exactly as in the reference's packed buffers."""
    torch.manual_seed(0)
    model = _tiny_model()
    attn = model.blocks[0].self_attn
    frames, h, w, ref_frames, of, ohw = 3, 2, 2, 2, 3, 16
    hidden = torch.randn(1, frames * h * w, 48)
    grid, grid_ref = torch.tensor([[frames, h, w]]), torch.tensor([[ref_frames, h, w]])
    cache = model.new_kv_cache().get(0)
    cache.store(torch.randn(1, ref_frames * h * w, 2, 24), torch.randn(1, ref_frames * h * w, 2, 24))
    freqs, freqs_ref = model._rope_freqs((0, 0, 0), "cpu"), model._rope_freqs((1, 0, w), "cpu")
    proc = attn.processor
    assert isinstance(proc, WanAnimate2DenseAttnProcessor)
    proc.log_scale = log_scale
    with torch.no_grad():
        ours = proc(attn, hidden, freqs, grid, cache, "cached", reference_rotary_emb=freqs_ref,
                    reference_grid_sizes=grid_ref, origin_latent_frames=of, origin_latent_hw=ohw)
        q, k, v = proc._project(attn, hidden)
        q, k = rope_apply(q, grid, freqs), rope_apply(k, grid, freqs)
        k_ref = rope_apply(cache.key, grid_ref, freqs_ref)
        ref = _reference_attention(q, k, v, k_ref, cache.value, frames, h * w, ref_frames, h * w, of, ohw, log_scale)
        ref = attn.to_out[0](ref.flatten(2))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_log_scale_and_uncond_change_the_output_and_do_not_stick():
    model = _tiny_model(num_layers=10)
    x = _inputs(model)
    base, _ = _run(model, x, 9, [64, 64])
    biased, _ = _run(model, x, 9, [64, 64], log_scale=0.7)
    uncond, _ = _run(model, x, 9, [64, 64], is_uncondtion=True)
    assert (biased - base).abs().max() > 1e-4 and (uncond - base).abs().max() > 1e-4
    assert all(b.self_attn.processor.log_scale == 0.0 for b in model.blocks)  # the last pass's value
    assert torch.equal(_run(model, x, 9, [64, 64])[0], base)


def test_clip_geometry_mismatch_is_one_clear_error():
    model = _tiny_model()
    with pytest.raises(ValueError, match="does not fit the video geometry"):
        _run(model, _inputs(model, frames=3), 5, [64, 64])  # origin 5 frames -> 2 latent frames < 3


def test_golden_reference_pass_fills_the_cache():
    """``dit_animate2``'s informative ``variant.k_cache`` / ``v_cache``: our extract pass caches the same K/V."""
    sys.path.insert(0, str(Path(__file__).parent))
    from golden_runners import load_case
    from golden_runners.core import GOLDENS_DIR

    if not (GOLDENS_DIR / "dit_animate2").is_dir():
        pytest.skip("no dit_animate2 golden in this fixture set")
    case = load_case("dit_animate2")
    if "k_cache" not in case.variants:
        pytest.skip("this fixture set has no k_cache variant")
    model = load_animate2_transformer_from_original(case.weights(), case.config)
    x = case.inputs
    f, h, w = x["condition_latents"].shape[2:]
    pf, ph, pw = model.config.patch_size  # the fixture's patch size, never this set's (1, 2, 2)
    grid_ref = torch.tensor([[f // pf, h // ph, w // pw]])
    cache = model.new_kv_cache()
    with torch.no_grad():
        model([x["condition_latents"][0]], x["timestep"], [x["context_ref"][0]], [x["condition_y"]], cache, "extract",
              seq_len=int(grid_ref.prod()), encoder_hidden_states_image=x["clip_fea_ref"], offset_grid_sizes=grid_ref)
    keys = torch.stack([c.key for c in cache.layer_caches])
    values = torch.stack([c.value for c in cache.layer_caches])
    torch.testing.assert_close(keys, case.variants["k_cache"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(values, case.variants["v_cache"], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ family / release
def test_variants_rows():
    a, d = get_variant("wan2.2-animate-2-14b"), get_variant("wan2.2-animate-2-14b-distilled")
    assert a.release == d.release == "Wan-AI/Wan2.2-Animate-2-14B" and a.arch == d.arch == "animate2"
    assert (a.num_inference_steps, a.guidance_scale, a.fps) == (40, 3.0, 24)
    assert (d.num_inference_steps, d.guidance_scale) == (10, 1.0)
    assert get_variant("wan2.2-animate-2-14b-distillation") is d
    assert family("animate2").dit.arches == ("animate2",)


def test_release_width_converts_to_the_stock_class(tmp_path):
    """With the release's CLIP width (1280) the transformer folder is stock ``WanAnimate2Transformer3DModel``."""
    sd, config = make_tiny_animate2_dit(seed=1)
    sd = {k: v for k, v in sd.items() if not k.startswith("img_emb.")}
    g = torch.Generator().manual_seed(0)
    for name, shape in (("proj.0.weight", (1280,)), ("proj.0.bias", (1280,)), ("proj.1.weight", (1280, 1280)),
                        ("proj.1.bias", (1280,)), ("proj.3.weight", (48, 1280)), ("proj.3.bias", (48,)),
                        ("proj.4.weight", (48,)), ("proj.4.bias", (48,))):
        sd[f"img_emb.{name}"] = torch.randn(shape, generator=g) * 0.02
    (tmp_path / "wan_animate_2").mkdir()
    save_file(sd, str(tmp_path / "wan_animate_2" / "wan_animate_2_bf16.safetensors"))
    (tmp_path / "wan_animate_2" / "config.json").write_text(json.dumps(config))
    out = convert_animate2_release(tmp_path, tmp_path / "out", transformer_only=True, dtype="fp32", progress=False)
    assert json.loads((out / "config.json").read_text())["_class_name"] == "WanAnimate2Transformer3DModel"
    stock = WanAnimate2Transformer3DModel.from_pretrained(out)
    ours = load_animate2_transformer_from_original(sd, config)
    assert stock.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in stock.state_dict().items())
    assert WanAnimate2ExtTransformer3DModel.from_pretrained(out).config.clip_dim == 1280
    # the classic pipeline wraps the stock model (weights shared) into ours
    wrapped = WanAnimate2ExtTransformer3DModel.from_stock(stock.eval())
    assert type(wrapped) is WanAnimate2ExtTransformer3DModel and wrapped.config.clip_dim == 1280
    assert wrapped.blocks[0].self_attn.to_q.weight.data_ptr() == stock.blocks[0].self_attn.to_q.weight.data_ptr()
    x = _inputs(ours)
    assert torch.equal(_run(wrapped, x, 9, [64, 64])[0], _run(ours, x, 9, [64, 64])[0])


def test_missing_components_are_one_line(tmp_path, capsys):
    sd, config = make_tiny_animate2_dit()
    (tmp_path / "rel" / "wan_animate_2").mkdir(parents=True)
    save_file(sd, str(tmp_path / "rel" / "wan_animate_2" / "wan_animate_2_bf16.safetensors"))
    (tmp_path / "rel" / "wan_animate_2" / "config.json").write_text(json.dumps(config))
    rc = main(["convert", str(tmp_path / "rel"), str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "missing component(s) for Wan2.2-Animate-2: text_encoder, tokenizer, vae, image_encoder" in err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def a2_release(tmp_path_factory) -> Path:
    return make_tiny_release(tmp_path_factory.mktemp("a2") / "rel", arch="animate2")


@pytest.fixture(scope="module")
def a2_folder(a2_release, tmp_path_factory) -> Path:
    """The tiny release converted by the CLI (fp32)."""
    dst = tmp_path_factory.mktemp("a2-converted") / "out"
    assert main(["convert", str(a2_release), str(dst), "--image-encoder-heads", "2", "--dtype", "fp32"]) == 0
    return dst


def test_tiny_release_converts_and_loads_in_a_fresh_interpreter(a2_release, a2_folder, tmp_path):
    release, dst = a2_release, a2_folder
    assert (release / "wan_animate_2" / "wan_animate_2_bf16.safetensors").is_file()
    assert not (release / "diffusion_pytorch_model.safetensors").exists()
    for sub in ("transformer", "text_encoder", "tokenizer", "vae", "image_encoder", "scheduler"):
        assert (dst / sub).is_dir(), sub
    index = json.loads((dst / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_wan_ext", "WanAnimate2Pipeline"] and index["log_scale"] == 0.0
    assert index["transformer"] == ["diffusers_wan_ext", "WanAnimate2ExtTransformer3DModel"]  # tiny CLIP width
    assert json.loads((dst / "wan_variant.json").read_text())["name"] == "wan2.2-animate-2-14b"
    sd = load_file(str(release / "wan_animate_2" / "wan_animate_2_bf16.safetensors"))
    cfg = json.loads((release / "wan_animate_2" / "config.json").read_text())
    expected = load_animate2_transformer_from_original(sd, cfg)
    x = _inputs(expected)
    ref, _ = _run(expected, x, 9, [64, 64])
    torch.save({"x": x, "ref": ref}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        import numpy as np
        from PIL import Image
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from diffusers import DiffusionPipeline
        # our classic pipeline, without importing diffusers_wan_ext first (the folder's re-export shims)
        classic = DiffusionPipeline.from_pretrained({str(dst)!r}, trust_remote_code=True)
        assert "diffusers_wan_ext" in type(classic).__module__ and "WanAnimate2Pipeline" == type(classic).__name__
        from test_animate2 import _run
        io = torch.load({str(tmp_path / "io.pt")!r})
        out, _ = _run(classic.transformer.eval(), io["x"], 9, [64, 64])
        assert torch.equal(out, io["ref"]), (out - io["ref"]).abs().max()
        frame = lambda i: Image.fromarray(np.random.RandomState(i).randint(0, 255, (32, 32, 3), np.uint8))
        video = classic(image=frame(99), driving_video=[frame(i) for i in range(5)], prompt="a person dancing",
                        height=32, width=32, num_frames=5, num_inference_steps=1, max_sequence_length=16).frames
        assert video.shape == (1, 5, 32, 32, 3) and np.isfinite(video).all(), video.shape
        # stock Diffusers' modular pipeline loads the same folder
        from diffusers.modular_pipelines import WanAnimate2Blocks
        pipe = WanAnimate2Blocks().init_pipeline({str(dst)!r})
        pipe.load_components()
        names = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "image_encoder")
        assert all(getattr(pipe, n, None) is not None for n in names), names
        video = pipe(prompt="a person dancing", image=frame(99), driving_video=[frame(i) for i in range(9)],
                     height=32, width=32, segment_frame_length=9, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0), output="videos")
        assert video.shape == (1, 9, 32, 32, 3) and np.isfinite(video).all(), video.shape
        print("ok", type(classic.transformer).__name__, type(pipe.transformer).__name__)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=src_env(HF_HUB_OFFLINE="1"))
    assert res.returncode == 0 and "ok WanAnimate2ExtTransformer3DModel WanAnimate2ExtTransformer3DModel" in res.stdout, res.stderr[-2000:]


def test_distilled_variant_picks_its_file(tmp_path, capsys):
    release = make_tiny_release(tmp_path / "rel", arch="animate2")
    common = ["--image-encoder-heads", "2", "--variant", "wan2.2-animate-2-14b-distilled"]
    rc = main(["convert", str(release), str(tmp_path / "none"), *common])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "wan_animate_2_bf16_distillation.safetensors" in err, err
    (release / "wan_animate_2" / "wan_animate_2_bf16.safetensors").rename(
        release / "wan_animate_2" / "wan_animate_2_bf16_distillation.safetensors")
    assert main(["convert", str(release), str(tmp_path / "d"), *common]) == 0
    assert json.loads((tmp_path / "d" / "wan_variant.json").read_text())["guidance_scale"] == 1.0
    index = json.loads((tmp_path / "d" / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_wan_ext", "WanAnimate2Pipeline"] and index["log_scale"] == -1.3
    assert main(["convert", str(release), str(tmp_path / "a"), "--image-encoder-heads", "2"]) == 0  # file name
    assert json.loads((tmp_path / "a" / "wan_variant.json").read_text())["name"] == "wan2.2-animate-2-14b-distilled"


# --------------------------------------------------------------------------------------------- the pipeline
def _frames(n: int, size: int = 16, seed: int = 0) -> list:
    rs = np.random.RandomState(seed)
    return [Image.fromarray(rs.randint(0, 255, (size, size, 3), np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def a2_pipe(a2_folder):
    pipe = DiffusionPipeline.from_pretrained(str(a2_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, **kw):
    args = dict(image=_frames(1, seed=99)[0], driving_video=_frames(5), prompt="a person dancing", height=16,
                width=16, num_frames=5, num_inference_steps=2, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return pipe(**args).frames


def _diffsynth_mask(lat_t, lat_h, lat_w, mask_len):
    """DiffSynth's ``animate2_get_i2v_mask``."""
    msk = torch.zeros(1, (lat_t - 1) * 4 + 1, lat_h, lat_w)
    msk[:, :mask_len] = 1
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    return msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]


def _pixels(images, size=16):
    """DiffSynth's ``preprocess_video`` of PIL frames resized to ``size``: ``[3, F, H, W]`` in [-1, 1]."""
    arr = np.stack([np.array(f.resize((size, size)), dtype=np.float32) for f in images])
    return torch.from_numpy(arr).permute(3, 0, 1, 2) * (2 / 255) - 1


def test_pipeline_runs_the_reference_units(a2_pipe):
    """One clip as DiffSynth's units build it (written here from wan_video.py): y = [ref image | zeros] with masks,
    the driving clip's latents + all-ones mask into the reference pass, CLIP of the image / of the clip's frame 0,
    block 9 skipped in the negative branch, log_scale in both, DiffSynth's shifted linspace(1, 0) Euler steps."""
    pipe, image, video = a2_pipe, _frames(1, seed=99)[0], _frames(5)
    steps, cfg, log_scale, shift = 2, 2.5, -1.3, 5.0
    noise = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    ours = _call(pipe, image=image, driving_video=video, negative_prompt="blurry", prompt_ref="moving",
                 guidance_scale=cfg, log_scale=log_scale, num_inference_steps=steps, latents=noise,
                 output_type="latent")
    with torch.no_grad():
        enc = lambda x: encode_video(pipe.vae, x[None])[0]  # noqa: E731  (normalized posterior mode)
        ref_img, clip_px = _pixels([image]), _pixels(video)
        y = torch.cat([torch.cat([_diffsynth_mask(1, 2, 2, 1), enc(ref_img)]),
                       torch.cat([_diffsynth_mask(2, 2, 2, 0), enc(torch.zeros(3, 5, 16, 16))])], dim=1)
        cond = enc(clip_px)
        cond_y = torch.cat([_diffsynth_mask(2, 2, 2, 5), cond])
        ctx = {n: pipe.encode_text(p, 16, "cpu") for n, p in (("pos", "a person dancing"), ("neg", "blurry"),
                                                              ("ref", "moving"))}
        model = pipe.transformer
        cache = model.new_kv_cache()
        grid_ref = torch.tensor([[2, 1, 1]])
        model([cond], torch.tensor([1000.0]), [ctx["ref"][0]], [cond_y], cache, "extract", seq_len=2,
              encoder_hidden_states_image=pipe.encode_clip(clip_px[:, 0][None], "cpu"), offset_grid_sizes=grid_ref)
        sigmas = torch.linspace(1, 0, steps + 1)[:steps].double()
        sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).tolist() + [0.0]
        x = noise[0]
        for i in range(steps):
            kw = dict(kv_cache=cache, kv_cache_mode="cached", seq_len=3, reference_grid_sizes=grid_ref,
                      encoder_hidden_states_image=pipe.encode_clip(ref_img[:, 0][None], "cpu"), origin_len=5,
                      origin_area=[16, 16], log_scale=log_scale, return_dict=False)
            t = torch.tensor([sigmas[i] * 1000], dtype=torch.float32)
            pos = model([x], t, [ctx["pos"][0]], [y], **kw)[0][0]
            neg = model([x], t, [ctx["neg"][0]], [y], is_uncondtion=True, **kw)[0][0]
            x = x + (neg + cfg * (pos - neg)) * (sigmas[i + 1] - sigmas[i])
    torch.testing.assert_close(ours[0], x[:, 1:], rtol=1e-4, atol=1e-5)


def _diffsynth_long_video_plan(real_len, clip_len, first_num=1):
    """DiffSynth's ``generate_long_video`` (examples/.../Wan2.2-Animate-2-14B.py): the padded frame indices and the
    clip starts."""
    def zigzag_padding(array, target_len):
        if len(array) == 1:
            return [array[0]] * target_len
        idx, flip, out = 0, False, []
        while len(out) < target_len:
            out.append(array[idx])
            idx += -1 if flip else 1
            if idx == 0 or idx == len(array) - 1:
                flip = not flip
        return out[:target_len]

    step = clip_len - first_num
    num_clips = 1 if real_len <= clip_len else (real_len - clip_len + step - 1) // step + 1
    target_len = clip_len + (num_clips - 1) * step
    cond = list(range(real_len))
    if real_len < target_len:
        cond = zigzag_padding(cond, target_len)
    return cond, [i * step for i in range(num_clips)]


@pytest.mark.parametrize("real_len,clip_len,first", [(1, 5, 1), (3, 5, 1), (5, 5, 1), (6, 5, 1), (12, 5, 1),
                                                     (13, 5, 1), (30, 9, 1), (30, 9, 5), (200, 81, 1)])
def test_clip_plan_is_diffsynths(real_len, clip_len, first):
    indices, starts = _diffsynth_long_video_plan(real_len, clip_len, first)
    target, ours = plan_clips(real_len, clip_len, first)
    assert ours == starts and target == max(len(indices), real_len)
    assert zigzag_indices(real_len, target)[: len(indices)] == indices


def test_long_video_chains_the_clips(a2_pipe, monkeypatch):
    """7 driving frames in clips of 5: two clips (0..4 and 4..8 of the video zigzag-padded to 9 frames); the second
    is conditioned on the 8-bit last frame of the first, and the output is 7 frames long."""
    seen = []
    real = a2_pipe.clip_condition

    def spy(image_latents, clip_pixels, tail):
        seen.append((clip_pixels.clone(), None if tail is None else tail.clone()))
        return real(image_latents, clip_pixels, tail)

    decoded = []
    real_decode = a2_pipe.decode
    monkeypatch.setattr(a2_pipe, "clip_condition", spy)
    monkeypatch.setattr(a2_pipe, "decode", lambda lat: decoded.append(real_decode(lat)) or decoded[-1])
    video = _frames(7)
    out = _call(a2_pipe, driving_video=video, long_video=True, output_type="pt", num_inference_steps=1)
    assert out.shape == (1, 7, 3, 16, 16) and len(seen) == 2 and seen[0][1] is None
    px = _pixels(video)
    for (clip, _), idx in zip(seen, ([0, 1, 2, 3, 4], [4, 5, 6, 5, 4])):
        torch.testing.assert_close(clip, px[:, idx])
    tail = seen[1][1]
    expected = (((decoded[0][:, -1:] + 1) * 127.5).clamp(0, 255).to(torch.uint8).float() * (2 / 255) - 1)
    assert tail.shape == (3, 1, 16, 16) and torch.equal(tail, expected)
    # the output: clip 0 whole, then clip 1 without its first frame, trimmed to 7
    stitched = torch.cat([decoded[0], decoded[1][:, 1:]], dim=1)[:, :7]
    torch.testing.assert_close(out[0], ((stitched.permute(1, 0, 2, 3) + 1) / 2).clamp(0, 1))


def test_bad_inputs_are_one_line_errors(a2_pipe, tmp_path):
    cases = [
        (dict(image=None), "image is required"),
        (dict(driving_video=None), "driving_video is required"),
        (dict(driving_video=_frames(3)), "driving_video has 3 frames but num_frames=5"),
        (dict(num_frames=6), "num_frames"),
        (dict(prompt=["a", "b"]), "prompt must be one string"),
        (dict(prev_clip_frames=5), "prev_clip_frames must be an integer in \\[1, num_frames\\)"),
        (dict(long_video=True, refert_images=_frames(1)), "refert_images continues one clip"),
        (dict(driving_video=np.zeros((5, 8, 8, 3), np.uint8)), "driving_video frames are 8x8"),
        (dict(driving_video=str(tmp_path / "none.mp4")), "none.mp4"),
        (dict(max_sequence_length=10_000), "max_sequence_length=10000"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            _call(a2_pipe, **kw)
        assert "\n" not in str(e.value), str(e.value)


def test_runtime_declarations(a2_folder, tmp_path):
    """LoRA (a PEFT LoRA changes the output, the same LoRA in DiffSynth's Animate-2 layout gives the same output; a
    foreign key is named), VRAM plans and the offloaded K/V cache (same
    output), TeaCache and parallelism refused with the reason."""
    pipe = DiffusionPipeline.from_pretrained(str(a2_folder))
    pipe.set_progress_bar_config(disable=True)
    run = lambda **kw: _call(pipe, output_type="latent", num_inference_steps=1, **kw)  # noqa: E731
    base = run()
    assert torch.equal(run(offload_kv=True), base)
    pipe.enable_vram_management("8gb", device="cpu", height=16, width=16, num_frames=5,
                                overrides={"transformer": "group_offload"}, verbose=False)
    torch.testing.assert_close(run(), base)
    pipe.disable_vram_management()
    with pytest.raises(NotImplementedError, match="TeaCache is not supported for Wan2.2-Animate-2"):
        pipe.enable_teacache(0.1)
    with pytest.raises(NotImplementedError, match="frame-structured reference attention"):
        pipe.enable_parallelism()
    assert "frame-structured mask" in pipe.transformer._cp_unsupported_reason
    g = torch.Generator().manual_seed(1)
    lora = {}
    for name in ("self_attn.to_q", "self_attn.to_v"):
        lora[f"transformer.blocks.0.{name}.lora_A.weight"] = torch.randn(4, 48, generator=g)
        lora[f"transformer.blocks.0.{name}.lora_B.weight"] = torch.randn(48, 4, generator=g)
    with pytest.raises(ValueError, match="blocks.0.attn1.to_q"):
        pipe.load_lora_weights({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 48),
                                "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(48, 4)})
    pipe.load_lora_weights(lora, adapter_name="test")
    adapted = run()
    assert (adapted - base).abs().max() > 1e-4
    pipe.set_adapters("test", 0.0)
    torch.testing.assert_close(run(), base)
    # the same LoRA in DiffSynth-Studio's Animate-2 layout (release module names, ".default."), from a file
    release_names = {"self_attn.to_q": "self_attn.q", "self_attn.to_v": "self_attn.v"}
    diffsynth = {f"blocks.0.block.{release_names[mod]}.{ab}.default.weight": lora[f"transformer.blocks.0.{mod}.{ab}.weight"]
                 for mod in release_names for ab in ("lora_A", "lora_B")}
    save_file(diffsynth, str(tmp_path / "diffsynth_lora.safetensors"))
    pipe.load_lora_weights(str(tmp_path / "diffsynth_lora.safetensors"), adapter_name="diffsynth")
    pipe.set_adapters("diffsynth", 1.0)
    torch.testing.assert_close(run(), adapted)
    with pytest.raises(ValueError, match="blocks.0.block.self_attn.x.lora_A.weight"):
        pipe.load_lora_weights({"blocks.0.block.self_attn.x.lora_A.weight": torch.zeros(4, 48)})


def test_generate_cli_on_real_files(a2_folder, tmp_path, capsys):
    """``diffusers-wan generate`` on the converted folder with a png and an mp4 (the whole driving video, in clips
    of --num-frames), and examples/animate2.py."""
    rs = np.random.RandomState(0)
    Image.fromarray(rs.randint(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / "ref.png")
    imageio.mimwrite(tmp_path / "drive.mp4", [rs.randint(0, 255, (16, 16, 3), np.uint8) for _ in range(5)], fps=8)
    out = tmp_path / "out.mp4"
    common = ["generate", "--model", str(a2_folder), "--prompt", "a person", "--height", "16", "--width", "16",
              "--num-frames", "5", "--steps", "1", "--dtype", "fp32", "--output", str(out)]
    assert main([*common, "--image", str(tmp_path / "ref.png"), "--driving-video", str(tmp_path / "drive.mp4"),
                 "--prompt-ref", "moving", "--log-scale", "-1.3"]) == 0
    assert imageio.v3.imread(out).shape == (5, 16, 16, 3)
    assert main([*common, "--image", str(tmp_path / "ref.png"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "--driving-video" in err and "Traceback" not in err, err
    # examples/animate2.py on the same files
    spec = importlib.util.spec_from_file_location("animate2_example", ROOT / "examples" / "animate2.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main([str(a2_folder), str(tmp_path / "ref.png"), str(tmp_path / "drive.mp4"), "--height", "16", "--width",
                  "16", "--clip-frames", "5", "--steps", "1", "--guidance-scale", "1", "--dtype", "fp32", "--fps", "8",
                  "--output", str(tmp_path / "example.mp4")])
    assert imageio.v3.imread(tmp_path / "example.mp4").shape == (5, 16, 16, 3)


def test_lora_training_on_the_tiny_model(a2_folder, tmp_path):
    """``diffusers_wan_ext.training`` LoRA-trains the tiny Animate-2 with DiffSynth's columns (reference image,
    reference video, reference prompt); the LoRA loads into the pipeline and changes its output."""
    rs = np.random.RandomState(0)
    make_tiny_dataset(tmp_path / "data", num_videos=1, num_images=0, num_frames=5, size=(16, 16))
    Image.fromarray(rs.randint(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / "data" / "ref.png")
    imageio.mimwrite(tmp_path / "data" / "drive.mp4", [rs.randint(0, 255, (16, 16, 3), np.uint8)] * 5, fps=8)
    meta = tmp_path / "data" / "metadata.csv"
    rows = list(csv.DictReader(open(meta)))
    for r in rows:
        r.update(animate2_reference_image="ref.png", animate2_reference_video="drive.mp4", animate2_prompt_ref="go")
    with open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    argv = ["--dataset_base_path", tmp_path / "data", "--dataset_metadata_path", meta, "--model_path", a2_folder,
            "--height", "16", "--width", "16", "--num_frames", "5", "--max_sequence_length", "16", "--dtype", "fp32",
            "--report_to", "none", "--lora_base_model", "transformer", "--lora_rank", "4", "--lora_target_modules",
            "to_q,to_k,to_v", "--extra_inputs", "animate2_prompt_ref,animate2_reference_image,animate2_reference_video",
            "--learning_rate", "1e-1", "--max_train_steps", "1", "--output_path", tmp_path / "out"]
    out = run_training(parse_args([str(a) for a in argv]))
    loss = json.loads((out / "logs" / "losses.jsonl").read_text().splitlines()[0])["loss"]
    assert math.isfinite(loss) and loss > 0
    pipe = DiffusionPipeline.from_pretrained(str(a2_folder))
    pipe.set_progress_bar_config(disable=True)
    base = _call(pipe, output_type="latent", num_inference_steps=1)
    pipe.load_lora_weights(str(out))
    assert (_call(pipe, output_type="latent", num_inference_steps=1) - base).abs().max() > 0


@pytest.mark.parametrize("with_bias", [False, True])
def test_frame_attention_op_matches_the_differentiable_path(with_bias):
    """The no-grad op (one K / V buffer refilled per frame, opaque to torch.compile) against the per-frame
    concatenation the autograd path uses: same result, eager and traced."""
    g = torch.Generator().manual_seed(0)
    hw, stride, frames, ref_frames, heads, dim = 3, 5, 4, 3, 2, 8
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = r(1, frames * hw, heads, dim)
    k_gen, v_gen = r(1, (frames + 1) * stride, heads, dim), r(1, (frames + 1) * stride, heads, dim)
    k_ref, v_ref = r(1, ref_frames * stride, heads, dim), r(1, ref_frames * stride, heads, dim)
    bias = r((frames + 2) * stride) if with_bias else None
    inputs = (q, k_gen, v_gen, k_ref, v_ref, bias, hw, stride)
    ref = frame_attention(*inputs)
    torch.testing.assert_close(frame_attention_op(*inputs), ref, rtol=0, atol=0)
    traced = torch.compile(lambda *a: frame_attention_op(*a) * 1, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(traced(*inputs), ref, rtol=0, atol=0)
