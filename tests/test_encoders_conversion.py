"""Fast CPU tests of the umT5 / CLIP converters and the tiny umT5 tokenizer (no golden files needed)."""

from __future__ import annotations

import types

import pytest
import torch

from diffusers_wan_ext.conversion.image_encoder import (
    CLIP_MEAN,
    CLIP_STD,
    clip_image_features,
    clip_vision_config_from_state_dict,
    convert_clip_state_dict,
    export_clip_state_dict,
    load_clip_from_original,
    make_clip_image_processor,
    wan_clip_preprocess,
)
from diffusers_wan_ext.conversion.text_encoder import (
    convert_t5_state_dict,
    encode_prompt_context,
    export_t5_state_dict,
    load_t5_from_original,
    t5_config_from_state_dict,
)
from diffusers_wan_ext.conversion.tokenizer import load_umt5_tokenizer, make_tiny_umt5_tokenizer
from diffusers_wan_ext.utils import ConversionError


# ---------------------------------------------------------------------------------------------------------------------
# original-layout state dicts (shapes as in Wan's t5.py / open-clip's clip.py)
# ---------------------------------------------------------------------------------------------------------------------


def original_t5(vocab=40, dim=12, dim_attn=12, ffn=20, heads=3, layers=2, buckets=8, device=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.empty(*shape, device="meta") if device == "meta" else torch.randn(*shape, generator=g)

    sd = {"token_embedding.weight": r(vocab, dim), "norm.weight": r(dim)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": r(dim), p + "norm2.weight": r(dim)})
        sd.update({p + f"attn.{n}.weight": r(dim_attn, dim) for n in "qkv"})
        sd[p + "attn.o.weight"] = r(dim, dim_attn)
        sd[p + "pos_embedding.embedding.weight"] = r(buckets, heads)
        sd[p + "ffn.gate.0.weight"] = r(ffn, dim)
        sd[p + "ffn.fc1.weight"] = r(ffn, dim)
        sd[p + "ffn.fc2.weight"] = r(dim, ffn)
    return sd


def original_clip(dim=16, layers=2, image=28, patch=14, mlp=64, out_dim=8, text=True, device=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.empty(*shape, device="meta") if device == "meta" else torch.randn(*shape, generator=g)

    n = (image // patch) ** 2 + 1
    sd = {
        "visual.patch_embedding.weight": r(dim, 3, patch, patch),
        "visual.cls_embedding": r(1, 1, dim),
        "visual.pos_embedding": r(1, n, dim),
        "visual.pre_norm.weight": r(dim),
        "visual.pre_norm.bias": r(dim),
        "visual.post_norm.weight": r(dim),
        "visual.post_norm.bias": r(dim),
        "visual.head": r(dim, out_dim),
    }
    for i in range(layers):
        p = f"visual.transformer.{i}."
        for nm in ("norm1", "norm2"):
            sd[p + nm + ".weight"], sd[p + nm + ".bias"] = r(dim), r(dim)
        sd[p + "attn.to_qkv.weight"], sd[p + "attn.to_qkv.bias"] = r(3 * dim, dim), r(3 * dim)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(dim, dim), r(dim)
        sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"] = r(mlp, dim), r(mlp)
        sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"] = r(dim, mlp), r(dim)
    if text:
        sd.update({
            "textual.token_embedding.weight": r(10, 8),
            "textual.blocks.0.attn.q.weight": r(8, 8),
            "textual.head.0.weight": r(6, 8),
            "log_scale": r(()) if device == "meta" else torch.tensor(4.6),
        })
    return sd


def assert_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------------------------
# umT5
# ---------------------------------------------------------------------------------------------------------------------


def test_t5_round_trip_identical():
    sd = original_t5()
    ours = convert_t5_state_dict(sd)
    assert ours["encoder.embed_tokens.weight"] is ours["shared.weight"]
    assert_identical(export_t5_state_dict(ours), sd)
    # also without the tied alias (what a deduplicating save keeps)
    ours.pop("encoder.embed_tokens.weight")
    assert_identical(export_t5_state_dict(ours), sd)


def test_t5_model_round_trip_and_forward():
    sd = original_t5()
    model = load_t5_from_original(sd)
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
    assert_identical(export_t5_state_dict(model.state_dict()), sd)
    ids = torch.tensor([[5, 7, 9, 1, 0, 0], [3, 1, 0, 0, 0, 0]])
    mask = (torch.arange(6)[None] < torch.tensor([[4], [2]])).long()
    ctx = encode_prompt_context(model, ids, mask)
    with torch.no_grad():
        raw = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert ctx.shape == (2, 6, 12)
    assert torch.equal(ctx[0, :4], raw[0, :4]) and torch.equal(ctx[1, :2], raw[1, :2])
    assert ctx[0, 4:].abs().sum() == 0 and ctx[1, 2:].abs().sum() == 0
    # per element: batch 2 == two batch-1 calls
    for b in range(2):
        one = encode_prompt_context(model, ids[b : b + 1], mask[b : b + 1])
        torch.testing.assert_close(one[0], ctx[b], rtol=1e-5, atol=1e-6)


def test_t5_config_from_shapes():
    cfg = t5_config_from_state_dict(original_t5(dim=12, dim_attn=18, heads=3, ffn=20, layers=2, buckets=8))
    assert (cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff, cfg.num_layers) == (12, 6, 3, 20, 2)
    assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (8, 128)
    assert cfg.feed_forward_proj == "gated-gelu" and cfg.dense_act_fn == "gelu_new" and cfg.is_gated_act
    assert cfg.layer_norm_epsilon == 1e-6  # (tie_word_embeddings: False as in google/umt5-xxl; transformers 5 forces True)
    # release umT5-XXL encoder (meta tensors: shapes only)
    cfg = t5_config_from_state_dict(
        original_t5(vocab=256384, dim=4096, dim_attn=4096, ffn=10240, heads=64, layers=24, buckets=32, device="meta")
    )
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff, cfg.num_layers) == (
        256384, 4096, 64, 64, 10240, 24)
    with pytest.raises(ConversionError, match="num_heads=4"):
        t5_config_from_state_dict(original_t5(heads=3), num_heads=4)


def test_t5_unknown_and_missing_keys():
    sd = original_t5()
    sd["blocks.0.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"blocks\.0\.attn\.extra\.weight"):
        convert_t5_state_dict(sd)
    with pytest.raises(ConversionError, match=r"blocks\.0\.attn\.extra\.weight"):
        load_t5_from_original(sd)
    sd = original_t5()
    del sd["blocks.1.ffn.fc2.weight"]
    with pytest.raises(ConversionError, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight"):
        load_t5_from_original(sd)
    ours = convert_t5_state_dict(original_t5())
    ours["lm_head.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="lm_head.weight"):
        export_t5_state_dict(ours)


def test_t5_load_from_file_with_prefix(tmp_path):
    sd = original_t5()
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({"module." + k: v.to(torch.bfloat16) for k, v in sd.items()}, path)
    model = load_t5_from_original(path, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert_identical(export_t5_state_dict(model.state_dict()), {k: v.to(torch.bfloat16) for k, v in sd.items()})


# ---------------------------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------------------------


def test_clip_visual_round_trip_identical():
    sd = original_clip()
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    ours = convert_clip_state_dict(sd, with_projection=True)
    assert not any(k.startswith("textual") or k == "log_scale" for k in ours)
    assert ours["visual_projection.weight"].shape == (8, 16)
    q, k, v = (ours[f"vision_model.encoder.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(torch.cat([q, k, v]), sd["visual.transformer.0.attn.to_qkv.weight"])
    assert_identical(export_clip_state_dict(ours), visual)
    # CLIPVisionModel layout (what WanImageToVideoPipeline declares): everything but the unused head
    plain = convert_clip_state_dict(sd)
    assert "visual_projection.weight" not in plain
    visual.pop("visual.head")
    assert_identical(export_clip_state_dict(plain), visual)


def test_clip_model_round_trip_and_features():
    sd = original_clip()
    model = load_clip_from_original(sd, num_heads=2, with_projection=True)
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    assert_identical(export_clip_state_dict(model.state_dict()), visual)
    plain = load_clip_from_original({"model." + k: v for k, v in sd.items()}, num_heads=2)  # DiffSynth prefix
    assert type(plain).__name__ == "CLIPVisionModel" and plain.config.hidden_act == "gelu"
    x = torch.rand(1, 3, 20, 36) * 2 - 1
    pv = wan_clip_preprocess(x, size=28)
    feats = clip_image_features(plain, pv)
    out = plain(pixel_values=pv, output_hidden_states=True)
    assert feats.shape == (1, 5, 16) and torch.equal(feats, out.hidden_states[-2])
    assert len(out.hidden_states) == 2 + 1  # embeddings + one output per block


def test_clip_config_and_heads():
    cfg = clip_vision_config_from_state_dict(original_clip(dim=16, layers=2, image=42, mlp=48, out_dim=8), num_heads=4)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (16, 2, 4, 48)
    assert (cfg.image_size, cfg.patch_size, cfg.projection_dim, cfg.layer_norm_eps) == (42, 14, 8, 1e-5)
    with pytest.raises(ConversionError, match="num_heads"):
        clip_vision_config_from_state_dict(original_clip())
    # release ViT-H/14 (meta tensors): heads from the table of release sizes
    cfg = clip_vision_config_from_state_dict(
        original_clip(dim=1280, layers=32, image=224, mlp=5120, out_dim=1024, device="meta")
    )
    assert (cfg.num_attention_heads, cfg.image_size, cfg.intermediate_size, cfg.projection_dim) == (16, 224, 5120, 1024)


def test_clip_unknown_and_missing_keys():
    sd = original_clip()
    sd["visual.transformer.0.attn.rotary"] = torch.zeros(1)
    sd["visual.some_new_thing"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"visual\.some_new_thing.*visual\.transformer\.0\.attn\.rotary"):
        convert_clip_state_dict(sd)
    sd = original_clip()
    del sd["visual.transformer.1.mlp.2.bias"]
    with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_clip_from_original(sd, num_heads=2)
    ours = convert_clip_state_dict(original_clip())
    del ours["vision_model.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ConversionError, match="k_proj.weight"):
        export_clip_state_dict(ours)


def test_wan_clip_preprocess_reference_math():
    x = torch.rand(2, 3, 30, 50) * 2 - 1
    pv = wan_clip_preprocess(x, size=28)
    y = torch.nn.functional.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False) * 0.5 + 0.5
    want = (y - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert pv.shape == (2, 3, 28, 28) and torch.equal(pv, want)
    assert wan_clip_preprocess(x.half(), size=28).dtype == torch.float32


def test_clip_image_processor_config(tmp_path):
    proc = make_clip_image_processor(56)
    assert proc.do_center_crop is False and proc.size["height"] == proc.size["width"] == 56
    assert proc.resample == 3 and list(proc.image_mean) == list(CLIP_MEAN) and list(proc.image_std) == list(CLIP_STD)
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 72, 3), dtype=np.uint8))
    assert tuple(proc(images=img, return_tensors="pt")["pixel_values"].shape) == (1, 3, 56, 56)
    proc.save_pretrained(tmp_path)
    assert '"image_processor_type": "CLIPImageProcessor"' in (tmp_path / "preprocessor_config.json").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "google" / "umt5-xxl"
    make_tiny_umt5_tokenizer(d, vocab_size=256)
    return d


def test_tiny_tokenizer_layout_and_offline_load(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    assert {"spiece.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tiny_tokenizer_dir.iterdir()}
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True)
    assert len(tok) == 256
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    enc = tok(["a cat", "a dog runs in the park"], padding="max_length", max_length=16, truncation=True,
              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    assert ids.shape == mask.shape == (2, 16)
    lengths = mask.sum(1)
    for b in range(2):
        n = int(lengths[b])
        assert ids[b, n - 1] == 1 and (ids[b, n:] == 0).all() and (mask[b, :n] == 1).all()
    assert int(ids.max()) < 256
    # truncation keeps the EOS
    long = tok(["the quick brown fox " * 20], padding="max_length", max_length=8, truncation=True)
    assert len(long.input_ids[0]) == 8 and long.input_ids[0][-1] == 1
    # deterministic: building again gives the same model file
    again = tiny_tokenizer_dir.parent / "again"
    make_tiny_umt5_tokenizer(again, vocab_size=256)
    assert (again / "spiece.model").read_bytes() == (tiny_tokenizer_dir / "spiece.model").read_bytes()


def test_load_umt5_tokenizer(tiny_tokenizer_dir, tmp_path):
    tok = load_umt5_tokenizer(tiny_tokenizer_dir)
    assert tok("a cat").input_ids[-1] == 1
    # a Wan release folder holding google/umt5-xxl/
    assert len(load_umt5_tokenizer(tiny_tokenizer_dir.parent.parent)) == 256
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="spiece.model"):
        load_umt5_tokenizer(tmp_path)
    with pytest.raises(ConversionError, match="not found"):
        load_umt5_tokenizer(tmp_path / "missing")


def test_tokenizer_and_encoder_match_stock_wan_pipeline(tiny_tokenizer_dir):
    """Stock diffusers' ``_get_t5_prompt_embeds`` with our tokenizer + converted encoder == encode_prompt_context."""
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    tok = load_umt5_tokenizer(tiny_tokenizer_dir)
    te = load_t5_from_original(original_t5(vocab=len(tok), dim=12, heads=2, dim_attn=12))
    prompts = ["a cat sits on a mat", "a dog"]
    fake = types.SimpleNamespace(tokenizer=tok, text_encoder=te, _execution_device=torch.device("cpu"))
    stock = WanPipeline._get_t5_prompt_embeds(fake, prompts, max_sequence_length=16)
    enc = tok(prompts, padding="max_length", max_length=16, truncation=True, add_special_tokens=True,
              return_attention_mask=True, return_tensors="pt")
    ours = encode_prompt_context(te, enc.input_ids, enc.attention_mask)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)
