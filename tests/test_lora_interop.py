"""LoRA interop (issue 6, part 3): Diffusers PEFT <-> original / ComfyUI <-> Kohya / musubi <-> DiffSynth-Studio.

Real PEFT adapters on tiny Wan transformers, real safetensors files, stock Diffusers ``WanPipeline`` loading what we
export, our pipelines loading every format, exact round trips, the stock converters as a parity reference, and the
errors (keys that match nothing are named, never dropped).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel, WanVACETransformer3DModel
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from diffusers_wan_ext import (  # noqa: E402
    WanAnimateExtPipeline,
    WanExtPipeline,
    WanFunCameraControlPipeline,
    WanFunControlPipeline,
    WanFunInpaintPipeline,
    WanFunTransformer3DModel,
    WanImageToVideoReferencePipeline,
    WanMotionControllerModel,
    WanSpeedControlPipeline,
    WanVideoToVideoReferencePipeline,
)
from diffusers_wan_ext_cli import main as cli_main  # noqa: E402
from diffusers_wan_ext.conversion.dit import rename_dit_key  # noqa: E402
from diffusers_wan_ext.lora import (  # noqa: E402
    LORA_FORMATS,
    WanLoraInteropMixin,
    check_lora_state_dict,
    convert_lora_state_dict,
    detect_lora_format,
    export_lora,
    load_lora_file,
    map_lora_target_modules,
    peft_lora_state_dict,
    save_lora_file,
)

DIM, HEADS, FFN, TEXT, FREQ = 48, 2, 96, 32, 32


def assert_same(a: dict, b: dict):
    """Same keys, same dtypes, bit-identical tensors."""
    assert list(a) == list(b) or set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def tiny_transformer(seed=0, cls=WanTransformer3DModel, clip=True, **kw):
    torch.manual_seed(seed)
    args = dict(num_attention_heads=HEADS, attention_head_dim=DIM // HEADS, in_channels=36 if clip else 16,
                out_channels=16, text_dim=TEXT, freq_dim=FREQ, ffn_dim=FFN, num_layers=2,
                image_dim=32 if clip else None, added_kv_proj_dim=DIM if clip else None)
    args.update(kw)
    return cls(**args).eval()


def add_lora(model, targets, r=4, alpha=None, bias=False, seed=1, name="default"):
    """A real PEFT adapter with random A and B (``init_lora_weights=False``), scaled so its effect is visible."""
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha or r, target_modules=targets, init_lora_weights=False,
                                 lora_bias=bias), adapter_name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(0.5)
    return model


def forward(model, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 2, 8, 8, generator=g)
    # 512 text tokens: the image branch splits the context as [257 image tokens; 512 text tokens]
    kwargs = dict(encoder_hidden_states=torch.randn(1, 512, TEXT, generator=g), return_dict=False)
    if cfg.image_dim:
        kwargs["encoder_hidden_states_image"] = torch.randn(1, 257, cfg.image_dim, generator=g)
    kwargs.update(extra)
    with torch.no_grad():
        return model(x, torch.tensor([600.0]), **kwargs)[0]


ALL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2",
               "proj_out", "patch_embedding", "condition_embedder.time_proj",
               "condition_embedder.time_embedder.linear_1", "condition_embedder.text_embedder.linear_2",
               "condition_embedder.image_embedder.ff.net.0.proj"]


# ------------------------------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def t2v_parts(converted):
    """Components of a converted tiny Wan2.1 T2V folder, plus the prompt embeddings (encoded once)."""
    pipe = WanPipeline.from_pretrained(converted("t2v"))
    with torch.no_grad():
        embeds = pipe.encode_prompt("a red fox", "blurry", do_classifier_free_guidance=True, device="cpu")
    return {**pipe.components, "embeds": embeds}


def make_pipe(cls, parts, transformer=None, transformer_2=None, boundary_ratio=None, **extra):
    kw = dict(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
              scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
              transformer=transformer if transformer is not None else copy.deepcopy(parts["transformer"]), **extra)
    if transformer_2 is not None:
        kw.update(transformer_2=transformer_2, boundary_ratio=boundary_ratio)
    pipe = cls(**kw)
    pipe.test_embeds = parts["embeds"]  # (prompt_embeds, negative_prompt_embeds) for run()
    return pipe


def run(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt_embeds=pipe.test_embeds[0], negative_prompt_embeds=pipe.test_embeds[1], height=32, width=32,
                num_frames=5, num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    if isinstance(pipe, WanExtPipeline):
        args["cfg_batching"] = False  # stock's loop, so outputs compare bit for bit with stock WanPipeline
    args.update(kw)
    return pipe(**args).frames


def test_our_pipelines_load_every_format():
    for cls in (WanExtPipeline, WanAnimateExtPipeline, WanFunInpaintPipeline, WanFunControlPipeline,
                WanFunCameraControlPipeline, WanSpeedControlPipeline, WanImageToVideoReferencePipeline,
                WanVideoToVideoReferencePipeline):
        assert issubclass(cls, WanLoraInteropMixin), cls
        assert cls.load_lora_weights is WanLoraInteropMixin.load_lora_weights, cls


def test_peft_lora_saved_with_stock_loads_in_stock_diffusers(t2v_parts, tmp_path):
    base = run(make_pipe(WanPipeline, t2v_parts))
    pipe = make_pipe(WanPipeline, t2v_parts)
    add_lora(pipe.transformer, ["to_q", "to_v", "ffn.net.0.proj", "proj_out"])
    with_peft = run(pipe)
    WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))

    stock = make_pipe(WanPipeline, t2v_parts)
    stock.load_lora_weights(tmp_path)
    out = run(stock)
    assert (out - base).abs().max() > 1e-2
    torch.testing.assert_close(out, with_peft, rtol=0, atol=1e-6)
    # the stock-saved file is Diffusers format; every other format round-trips to the same tensors
    saved = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert detect_lora_format(saved) == "diffusers"
    for fmt in LORA_FORMATS:
        assert_same(convert_lora_state_dict(convert_lora_state_dict(saved, fmt), "diffusers"), saved)


def test_export_loads_into_stock_and_every_format_into_ours(t2v_parts, tmp_path):
    pipe = make_pipe(WanPipeline, t2v_parts)
    add_lora(pipe.transformer, ["to_q", "to_k", "to_out.0", "ffn.net.2", "patch_embedding", "time_proj"], r=4, alpha=2)
    with_peft = run(pipe)
    paths = export_lora(peft_lora_state_dict(pipe.transformer), tmp_path / "lora")
    assert set(paths) == set(LORA_FORMATS)
    assert paths["diffusers"].name == "pytorch_lora_weights.safetensors"
    assert next(iter(load_file(str(paths["original"])))).startswith("diffusion_model.")
    assert next(iter(load_file(str(paths["kohya"])))).startswith("lora_unet_")
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in load_file(str(paths["diffsynth"])))

    stock = make_pipe(WanPipeline, t2v_parts)
    stock.load_lora_weights(tmp_path / "lora")  # the folder: stock finds pytorch_lora_weights.safetensors
    expected = run(stock)
    torch.testing.assert_close(expected, with_peft, rtol=0, atol=1e-5)  # alpha / r = 1/2 folded into A

    reference = load_file(str(paths["diffusers"]))
    for fmt, path in paths.items():
        assert_same(WanExtPipeline.lora_state_dict(str(path)), reference)
        ours = make_pipe(WanExtPipeline, t2v_parts)
        ours.load_lora_weights(str(path), adapter_name=fmt)
        assert torch.equal(run(ours), expected), fmt


def test_round_trips_every_format_pair():
    model = add_lora(tiny_transformer(), ALL_TARGETS, r=3)
    sd = peft_lora_state_dict(model)
    assert len(sd) == 2 * (2 * 12 + 6)  # 12 LoRA layers per block (q, k, v, o x 2, k_img, v_img, ffn x 2) + 6 others
    for a in LORA_FORMATS:
        xa = convert_lora_state_dict(sd, a)
        assert detect_lora_format(xa) == a
        for b in LORA_FORMATS:
            xb = convert_lora_state_dict(xa, b)
            assert_same(convert_lora_state_dict(xb, "diffusers"), sd)  # diffusers -> a -> b -> diffusers
            assert_same(convert_lora_state_dict(convert_lora_state_dict(xb, "diffusers"), b), xb)  # b -> diffusers -> b
    kohya = convert_lora_state_dict(sd, "kohya")
    assert "lora_unet_blocks_1_cross_attn_k_img.lora_down.weight" in kohya
    assert "lora_unet_img_emb_proj_1.alpha" in kohya
    assert "blocks.0.ffn.0.lora_A.default.weight" in convert_lora_state_dict(sd, "diffsynth")
    # bf16 files keep their dtype, alpha included (as Kohya / musubi save it)
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    orig = convert_lora_state_dict(bf16, "original")
    assert orig["diffusion_model.head.head.alpha"].dtype == torch.bfloat16
    assert_same(convert_lora_state_dict(orig, "diffusers"), bf16)


def _lightx2v_style_file(model, g):
    """An original / ComfyUI LoRA as LightX2V / kijai ship them: lora_down/up with alpha != rank, diff_b, full
    ``diff`` on a Linear and a Conv3d, a bias-only module and all-zero norm / modulation diffs."""
    sd = {}
    for i in range(2):
        for orig, lin in (("self_attn.q", model.blocks[i].attn1.to_q), ("cross_attn.v", model.blocks[i].attn2.to_v),
                          ("ffn.0", model.blocks[i].ffn.net[0].proj)):
            p = f"diffusion_model.blocks.{i}.{orig}"
            sd[f"{p}.lora_down.weight"] = torch.randn(8, lin.in_features, generator=g) * 0.2
            sd[f"{p}.lora_up.weight"] = torch.randn(lin.out_features, 8, generator=g) * 0.2
            sd[f"{p}.alpha"] = torch.tensor(4.0)  # scale 1/2
            sd[f"{p}.diff_b"] = torch.randn(lin.out_features, generator=g) * 0.1
        sd[f"diffusion_model.blocks.{i}.norm3.diff"] = torch.zeros(DIM)
        sd[f"diffusion_model.blocks.{i}.norm3.diff_b"] = torch.zeros(DIM)
        sd[f"diffusion_model.blocks.{i}.modulation.diff"] = torch.zeros(1, 6, DIM)
    sd["diffusion_model.head.head.diff"] = torch.randn(64, DIM, generator=g) * 0.05
    sd["diffusion_model.head.head.diff_b"] = torch.randn(64, generator=g) * 0.05
    sd["diffusion_model.patch_embedding.diff"] = torch.randn(DIM, 36, 1, 2, 2, generator=g) * 0.05
    sd["diffusion_model.time_projection.1.diff_b"] = torch.randn(6 * DIM, generator=g) * 0.05
    return sd


def _merged_reference(model, sd):
    """The deltas of an original-layout file merged into a copy of the weights, computed by hand (ComfyUI's rule:
    ``W += alpha / rank * up @ down``, ``W += diff``, ``b += diff_b``)."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for key, value in sd.items():
            module_key, _, suffix = key[len("diffusion_model."):].rpartition(".")
            if suffix in ("alpha", "weight") or "norm" in module_key or "modulation" in module_key:
                continue
            module = rename_dit_key(module_key)
            if suffix == "diff":
                params[f"{module}.weight"] += value
            elif suffix == "diff_b":
                params[f"{module}.bias"] += value
        for key in sd:
            if key.endswith(".lora_down.weight"):
                p = key[: -len(".lora_down.weight")]
                down, up, alpha = sd[key], sd[p + ".lora_up.weight"], float(sd[p + ".alpha"])
                module = rename_dit_key(p[len("diffusion_model."):])
                params[f"{module}.weight"] += alpha / down.shape[0] * up @ down
    return ref


def test_original_file_with_alpha_diff_and_diff_b():
    model = tiny_transformer(seed=2)
    sd = _lightx2v_style_file(model, torch.Generator().manual_seed(5))
    expected = forward(_merged_reference(model, sd))

    converted = WanExtPipeline.lora_state_dict(sd)
    assert not any("norm" in k or "scale_shift" in k for k in converted)  # all-zero norm diffs dropped (no effect)
    assert converted["transformer.proj_out.lora_B.weight"].shape == (64, 48)  # diff -> exact rank-48 LoRA
    loaded = copy.deepcopy(model)
    loaded.load_lora_adapter(check_lora_state_dict(loaded, converted), prefix="transformer", adapter_name="x")
    out = forward(loaded)
    assert (out - forward(model)).abs().max() > 1e-2
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    # original <-> kohya keeps everything (alpha, diff, diff_b, the zero norm diffs) bit for bit
    assert_same(convert_lora_state_dict(sd, "original"), sd)
    assert_same(convert_lora_state_dict(convert_lora_state_dict(sd, "kohya"), "original"), sd)
    # via diffusers: diff / diff_b come back identical, alpha = 8 != rank is folded (alpha = rank afterwards), the
    # all-zero norm / modulation diffs are gone
    back = convert_lora_state_dict(convert_lora_state_dict(sd, "diffusers"), "original")
    assert set(back) == {k for k in sd if "norm3" not in k and "modulation" not in k}
    for key in back:
        if key.endswith(("diff", "diff_b")):
            assert torch.equal(back[key], sd[key]), key
        elif key.endswith(".lora_down.weight"):
            p = key[: -len(".lora_down.weight")]
            assert float(back[p + ".alpha"]) == 8.0
            torch.testing.assert_close(back[p + ".lora_up.weight"] @ back[key],
                                       0.5 * sd[p + ".lora_up.weight"] @ sd[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="diff_b.*diffsynth|bias delta.*diffsynth"):
        convert_lora_state_dict(sd, "diffsynth")
    bad = dict(sd, **{"diffusion_model.blocks.0.norm3.diff": torch.ones(DIM)})
    with pytest.raises(ValueError, match="transformer.blocks.0.norm2"):
        convert_lora_state_dict(bad, "diffusers")


def test_alpha_folding_matches_stock_converters():
    from diffusers.loaders.lora_conversion_utils import (
        _convert_musubi_wan_lora_to_diffusers,
        _convert_non_diffusers_wan_lora_to_diffusers,
    )

    model = tiny_transformer(seed=3)
    g = torch.Generator().manual_seed(7)
    orig = {}
    for i in range(2):
        for name, attn in (("self_attn", model.blocks[i].attn1), ("cross_attn", model.blocks[i].attn2)):
            for o in ("q", "k", "v", "o"):
                p = f"diffusion_model.blocks.{i}.{name}.{o}"
                orig[f"{p}.lora_down.weight"] = torch.randn(8, DIM, generator=g)
                orig[f"{p}.lora_up.weight"] = torch.randn(DIM, 8, generator=g)
                orig[f"{p}.alpha"] = torch.tensor(1.0 if o == "q" else 6.0)  # 1/8: split into A and B
                orig[f"{p}.diff_b"] = torch.randn(DIM, generator=g)
        for o, (i_f, o_f) in (("ffn.0", (DIM, FFN)), ("ffn.2", (FFN, DIM))):
            p = f"diffusion_model.blocks.{i}.{o}"
            orig[f"{p}.lora_down.weight"] = torch.randn(8, i_f, generator=g)
            orig[f"{p}.lora_up.weight"] = torch.randn(o_f, 8, generator=g)
            orig[f"{p}.alpha"] = torch.tensor(8.0)
    assert_same(convert_lora_state_dict(orig, "diffusers"), _convert_non_diffusers_wan_lora_to_diffusers(dict(orig)))
    no_bias = {k: v for k, v in orig.items() if not k.endswith("diff_b")}
    kohya = convert_lora_state_dict(no_bias, "kohya")
    assert_same(convert_lora_state_dict(kohya, "diffusers"), _convert_musubi_wan_lora_to_diffusers(dict(kohya)))
    # alpha survives original <-> kohya untouched
    assert_same(convert_lora_state_dict(kohya, "original"), no_bias)


def test_unmatched_keys_raise_naming_them(t2v_parts, tmp_path):
    pipe = make_pipe(WanExtPipeline, t2v_parts)
    good = peft_lora_state_dict(add_lora(tiny_transformer(clip=False), ["to_q"]))
    with pytest.raises(ValueError, match=r"transformer\.blocks\.7\.attn1\.to_q\.lora_A\.weight"):
        pipe.load_lora_weights({**good, "transformer.blocks.7.attn1.to_q.lora_A.weight": torch.zeros(4, DIM),
                                "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.zeros(DIM, 4)})
    with pytest.raises(ValueError, match=r"diffusion_model\.blocks\.0\.self_attn\.zz\.lora_down\.weight"):
        pipe.load_lora_weights({**convert_lora_state_dict(good, "original"),
                                "diffusion_model.blocks.0.self_attn.zz.lora_down.weight": torch.zeros(4, DIM)})
    with pytest.raises(ValueError, match=r"shapes.*blocks\.0\.attn1\.to_q\.lora_A\.weight \(4, 40\)"):
        pipe.load_lora_weights({**good, "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 40)})
    with pytest.raises(ValueError, match="no transformer_2"):
        pipe.load_lora_weights({**good, **{k.replace("transformer.", "transformer_2.", 1): v for k, v in good.items()}})
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        pipe.load_lora_weights({**good, "transformer.blocks.0.attn1.to_q.lora_magnitude_vector": torch.ones(DIM)})
    i2v_only = peft_lora_state_dict(add_lora(tiny_transformer(clip=True), ["add_k_proj"]))
    path = save_lora_file(convert_lora_state_dict(i2v_only, "kohya"), tmp_path / "i2v.safetensors")
    with pytest.raises(ValueError, match=r"match no LoRA-able layer.*add_k_proj"):
        pipe.load_lora_weights(str(path))  # an I2V LoRA on a T2V model
    assert not getattr(pipe.transformer, "peft_config", None)  # nothing was loaded by the failed calls
    with pytest.raises(ValueError, match="not a Wan LoRA in a known format.*foo.weight"):
        detect_lora_format({"foo.weight": torch.zeros(1)})
    pipe.load_lora_weights(good)  # the good part alone loads
    assert "default_0" in pipe.transformer.peft_config


def test_two_experts(t2v_parts, tmp_path):
    t1 = copy.deepcopy(t2v_parts["transformer"])
    t2 = copy.deepcopy(t2v_parts["transformer"])
    with torch.no_grad():
        for p in t2.parameters():
            p.add_(torch.randn_like(p) * 0.01)

    def fresh(cls):  # boundary 0.9: step 1 (t = 1000) runs transformer, step 2 transformer_2
        return make_pipe(cls, t2v_parts, transformer=copy.deepcopy(t1), transformer_2=copy.deepcopy(t2),
                         boundary_ratio=0.9)

    base = run(fresh(WanPipeline))
    pipe = fresh(WanPipeline)
    add_lora(pipe.transformer, ["to_q", "ffn.net.2"], seed=1)
    add_lora(pipe.transformer_2, ["to_v", "proj_out"], seed=2, r=2)
    with_peft = run(pipe)
    sd = {**peft_lora_state_dict(pipe.transformer),
          **peft_lora_state_dict(pipe.transformer_2, component="transformer_2")}
    paths = export_lora(sd, tmp_path)
    assert set(paths) == {"diffusers", "diffusers_transformer_2", "original", "original_transformer_2", "kohya",
                          "kohya_transformer_2", "diffsynth", "diffsynth_transformer_2"}
    combined = load_file(str(paths["diffusers"]))
    assert {k.split(".")[0] for k in combined} == {"transformer", "transformer_2"}

    ours = fresh(WanExtPipeline)
    ours.load_lora_weights(str(paths["diffusers"]))  # both experts in one call
    out = run(ours)
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(out, with_peft, rtol=0, atol=1e-6)

    stock = fresh(WanPipeline)  # stock: the combined file's transformer part, then the split file into transformer_2
    stock.load_lora_weights(str(paths["diffusers"]), adapter_name="lora")
    assert not getattr(stock.transformer_2, "peft_config", None)
    assert (run(stock) - out).abs().max() > 1e-4  # the low-noise expert's LoRA matters
    stock.load_lora_weights(str(paths["diffusers_transformer_2"]), adapter_name="lora", load_into_transformer_2=True)
    assert torch.equal(run(stock), out)

    for fmt in ("original", "kohya", "diffsynth"):  # one file per expert, as ComfyUI / DiffSynth use them
        ours = fresh(WanExtPipeline)
        ours.load_lora_weights(str(paths[fmt]), adapter_name="lora")
        ours.load_lora_weights(str(paths[f"{fmt}_transformer_2"]), adapter_name="lora", load_into_transformer_2=True)
        assert torch.equal(run(ours), out), fmt
        single = load_lora_file(paths[fmt + "_transformer_2"])
        assert_same(convert_lora_state_dict(single, "diffusers", transformer_name="transformer_2"),
                    {k: v for k, v in combined.items() if k.startswith("transformer_2.")})
    with pytest.raises(ValueError, match="transformer_2 besides transformer"):
        convert_lora_state_dict(combined, "original")


def test_vace_blocks_lora():
    model = tiny_transformer(seed=4, cls=WanVACETransformer3DModel, clip=False, vace_layers=[0, 1],
                             vace_in_channels=24)
    targets = ["to_q", "ffn.net.0.proj", "vace_blocks.0.proj_in", "vace_blocks.1.proj_out", "vace_patch_embedding"]
    base_model = copy.deepcopy(model)
    add_lora(model, targets)
    control = torch.randn(1, 24, 2, 8, 8, generator=torch.Generator().manual_seed(9))
    expected = forward(model, control_hidden_states=control)
    sd = peft_lora_state_dict(model)
    diffsynth = convert_lora_state_dict(sd, "diffsynth")
    for key in ("vace_blocks.0.before_proj.lora_A.default.weight", "vace_blocks.1.after_proj.lora_B.default.weight",
                "vace_blocks.1.self_attn.q.lora_A.default.weight", "vace_patch_embedding.lora_A.default.weight"):
        assert key in diffsynth, key
    for fmt in LORA_FORMATS:
        assert_same(convert_lora_state_dict(convert_lora_state_dict(diffsynth, fmt), "diffusers"), sd)
    loaded = copy.deepcopy(base_model)
    sd_loaded = check_lora_state_dict(loaded, WanExtPipeline.lora_state_dict(diffsynth))
    loaded.load_lora_adapter(sd_loaded, prefix="transformer")
    out = forward(loaded, control_hidden_states=control)
    assert (out - forward(base_model, control_hidden_states=control)).abs().max() > 1e-3
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_fun_extra_modules_through_the_fun_pipeline(t2v_parts, tmp_path):
    fun = tiny_transformer(seed=5, cls=WanFunTransformer3DModel, in_channels=32, clip=True, text_len=512,
                           ref_conv_in_channels=16, control_adapter_in_channels=24, control_adapter_downscale_factor=2)
    targets = ["to_q", "ref_conv", "control_adapter.conv", "control_adapter.residual_blocks.0.conv1",
               "condition_embedder.image_embedder.ff.net.2", "add_v_proj"]
    pipe = make_pipe(WanFunCameraControlPipeline, t2v_parts, transformer=copy.deepcopy(fun), image_encoder=None,
                     image_processor=None)
    g = torch.Generator().manual_seed(3)
    extra = dict(reference_latents=torch.randn(1, 16, 1, 8, 8, generator=g),
                 control_camera_latents=torch.randn(1, 24, 2, 16, 16, generator=g))
    expected = forward(add_lora(fun, targets), **extra)
    kohya = convert_lora_state_dict(peft_lora_state_dict(fun), "kohya")
    assert "lora_unet_control_adapter_residual_blocks_0_conv1.lora_down.weight" in kohya
    assert "lora_unet_img_emb_proj_3.lora_up.weight" in kohya
    pipe.load_lora_weights(str(save_lora_file(kohya, tmp_path / "fun_kohya.safetensors")), adapter_name="fun")
    assert "fun" in pipe.transformer.control_adapter.residual_blocks[0].conv1.lora_A
    torch.testing.assert_close(forward(pipe.transformer, **extra), expected, rtol=0, atol=1e-6)


def test_motion_controller_lora(t2v_parts):
    torch.manual_seed(0)
    mc = WanMotionControllerModel(freq_dim=FREQ, dim=DIM).eval()
    pipe = make_pipe(WanSpeedControlPipeline, t2v_parts, motion_controller=copy.deepcopy(mc))
    transformer = add_lora(copy.deepcopy(pipe.transformer), ["to_q"])
    add_lora(mc, ["linear.0", "linear.4"])
    mc_sd = peft_lora_state_dict(mc, component="motion_controller")
    assert {k.split(".")[0] for k in mc_sd} == {"motion_controller"}
    pipe.load_lora_weights({**mc_sd, **peft_lora_state_dict(transformer)}, adapter_name="speed")  # both at once
    with torch.no_grad():
        assert torch.equal(pipe.motion_controller(torch.tensor([50.0])).offset, mc(torch.tensor([50.0])).offset)
    torch.testing.assert_close(forward(pipe.transformer), forward(transformer), rtol=0, atol=1e-6)
    diffsynth = convert_lora_state_dict(mc_sd, "diffsynth", transformer_name="motion_controller")
    assert "linear.4.lora_B.default.weight" in diffsynth
    assert_same(convert_lora_state_dict(diffsynth, "diffusers", transformer_name="motion_controller"), mc_sd)
    with pytest.raises(ValueError, match="no motion_controller"):
        make_pipe(WanExtPipeline, t2v_parts).load_lora_weights(mc_sd)


def test_adapter_metadata_alpha(t2v_parts, tmp_path):
    """A Diffusers file whose PEFT metadata has lora_alpha != r (as Diffusers' training scripts save it)."""
    pipe = make_pipe(WanPipeline, t2v_parts)
    add_lora(pipe.transformer, ["to_k", "to_out.0"], r=4, alpha=16)
    config = pipe.transformer.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                  transformer_lora_adapter_metadata=config)
    with_peft = run(pipe)
    stock = make_pipe(WanPipeline, t2v_parts)
    stock.load_lora_weights(tmp_path)
    torch.testing.assert_close(run(stock), with_peft, rtol=0, atol=1e-6)
    ours = make_pipe(WanExtPipeline, t2v_parts)
    ours.load_lora_weights(str(tmp_path))  # metadata passed on to PEFT as stock does
    torch.testing.assert_close(run(ours), with_peft, rtol=0, atol=1e-6)
    folded = load_lora_file(tmp_path)  # scale 4 folded into the factors
    assert_same(folded, peft_lora_state_dict(pipe.transformer))
    paths = export_lora(get_peft_model_state_dict(pipe.transformer), tmp_path / "raw", formats=["diffusers"],
                        adapter_config=config)  # raw PEFT tensors + their config: the same fold
    assert_same(load_file(str(paths["diffusers"])), folded)
    plain = make_pipe(WanPipeline, t2v_parts)
    plain.load_lora_weights(convert_lora_state_dict(folded, "original"))
    torch.testing.assert_close(run(plain), with_peft, rtol=1e-5, atol=1e-5)


def test_map_lora_target_modules_wraps_the_same_layers_as_diffsynth():
    assert map_lora_target_modules("q,k,v,o,ffn.0,ffn.2") == [
        "to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    assert map_lora_target_modules(["k_img", "self_attn.o", "attn1.to_q", "head.head", "to_q"]) == [
        "add_k_proj", "attn1.to_out.0", "attn1.to_q", "proj_out", "to_q"]
    with pytest.raises(ValueError, match="qq"):
        map_lora_target_modules("q,qq")
    # DiffSynth's PEFT suffix matching on original names == ours on Diffusers names, layer for layer
    model = tiny_transformer()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def hits(names, targets):
        return {n for n in names if any(n == t or n.endswith("." + t) for t in targets)}

    diffsynth_names = "q,k,v,o,ffn.0,ffn.2,k_img".split(",")
    original_hits = hits([rename_dit_key(n, reverse=True) for n in linear], diffsynth_names)
    add_lora(model, map_lora_target_modules(diffsynth_names))
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert {rename_dit_key(n, reverse=True) for n in wrapped} == original_hits
    assert len(wrapped) == 2 * 11  # q, k, v, o in both attentions, k_img, ffn.0, ffn.2


def test_cli_convert_info_export(tmp_path, capsys):
    sd = peft_lora_state_dict(add_lora(tiny_transformer(), ["to_q", "add_v_proj", "ffn.net.2"]))
    src = save_lora_file(sd, tmp_path / "pytorch_lora_weights.safetensors", metadata={"note": "test"})
    assert cli_main(["lora", "convert", str(src), str(tmp_path / "c.safetensors"), "--to", "original"]) == 0
    assert cli_main(["lora", "convert", str(tmp_path / "c.safetensors"), str(tmp_path / "k.safetensors"),
                     "--to", "kohya"]) == 0
    assert cli_main(["lora", "convert", str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors"),
                     "--to", "diffsynth"]) == 0
    assert cli_main(["lora", "convert", str(tmp_path / "d.safetensors"), str(tmp_path / "back.safetensors"),
                     "--to", "diffusers", "--from", "diffsynth"]) == 0
    assert_same(load_file(str(tmp_path / "back.safetensors")), sd)
    capsys.readouterr()
    assert cli_main(["lora", "info", str(tmp_path / "k.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "format: kohya" in text and "rank 4" in text and "blocks.N.attn2.add_v_proj" in text
    assert cli_main(["lora", "info", str(tmp_path / "d.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "diffsynth"
    assert cli_main(["lora", "export", str(src), str(tmp_path / "all"), "--formats", "original", "diffsynth"]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["lora_diffsynth.safetensors",
                                                                    "lora_original.safetensors"]
    # exists: a one-line error (exit 2), the file untouched
    assert cli_main(["lora", "convert", str(src), str(tmp_path / "c.safetensors"), "--to", "original"]) == 2
    bad = save_lora_file({"blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(2, DIM)},
                         tmp_path / "bad.safetensors")
    assert cli_main(["lora", "convert", str(bad), str(tmp_path / "x.safetensors"), "--to", "original"]) == 2
    assert "only the down" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
