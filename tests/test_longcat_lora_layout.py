"""LongCat-Video's own LoRA layout (``longcat``: the original ``lora_down`` / ``lora_up.blocks.N`` keys) through
``diffusers-wan lora convert``: a Diffusers LoRA of a LongCat transformer converts to it (what
:func:`~diffusers_wan_ext.families.longcat.export_longcat_lora` writes, read back by the pipeline's own loader to the
same tensors) and back (detected); a LoRA of another model is refused in one line.  The trainer's
``--export_format longcat`` is tested in test_training_families_extra.py and test_training_startup_checks.py."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from diffusers_wan_ext.conversion.longcat import LORA_PREFIX
from diffusers_wan_ext.families import FAMILIES
from diffusers_wan_ext.families.longcat import export_longcat_lora
from diffusers_wan_ext.lora.convert import peft_lora_state_dict
from diffusers_wan_ext.pipelines import LongCatVideoPipeline
from diffusers_wan_ext_cli import main
from diffusers_wan_ext_cli.parser import FAMILY_LORA_FORMATS
from helpers import randomize_lora
from model_cases import model_cases

#: a fused qkv (3 parts), a partly trained kv_linear (k only: v gets zero factors) and single projections
TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "ffn.w1",
           "ffn.w3", "norm1.linear"]


@pytest.fixture(scope="module")
def lora() -> dict[str, torch.Tensor]:
    case = next(c for c in model_cases() if c.name == "longcat")
    transformer = case.model_class(**case.init_kwargs)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    randomize_lora(transformer)
    return peft_lora_state_dict(transformer)


def test_family_layouts_match_the_launcher():
    assert tuple(FAMILY_LORA_FORMATS) == tuple(sorted({fmt for f in FAMILIES for fmt in f.own_lora_formats}))


def test_lora_convert_to_longcat_and_back(lora, tmp_path, capsys):
    assert lora and all(k.startswith("transformer.blocks.") for k in lora)
    src = tmp_path / "diffusers.safetensors"
    save_file(lora, str(src))
    assert main(["lora", "convert", str(src), str(tmp_path / "lc.safetensors"), "--to", "longcat"]) == 0
    written = load_file(str(tmp_path / "lc.safetensors"))
    want = export_longcat_lora(lora)
    assert written.keys() == want.keys() and all(torch.equal(written[k], want[k]) for k in want)
    assert all(k.startswith(LORA_PREFIX) for k in written)
    assert any(k.endswith(".lora_up.blocks.2.weight") for k in written)  # attn.qkv
    back = LongCatVideoPipeline.lora_state_dict(str(tmp_path / "lc.safetensors"))  # what load_lora_weights reads
    assert set(lora) <= set(back)
    for k, v in lora.items():
        torch.testing.assert_close(back[k], v, msg=k)
    extra = set(back) - set(lora)  # the untrained v part of kv_linear: zero factors
    assert extra and all(".attn2.to_v." in k for k in extra) and all(not back[k].any() for k in extra
                                                                      if ".lora_B." in k)
    # ... and back: the layout is detected (and named with --from)
    for given in ([], ["--from", "longcat"]):
        out = tmp_path / f"back{len(given)}.safetensors"
        assert main(["lora", "convert", str(tmp_path / "lc.safetensors"), str(out), "--to", "diffusers", *given]) == 0
        again = load_file(str(out))
        for k, v in lora.items():
            torch.testing.assert_close(again[k], v, msg=k)


def test_lora_convert_to_longcat_refuses_another_models_lora(tmp_path, capsys):
    src = tmp_path / "wan.safetensors"
    save_file({"transformer.blocks.0.attn1.to_qq.lora_A.weight": torch.ones(4, 8),
               "transformer.blocks.0.attn1.to_qq.lora_B.weight": torch.ones(8, 4)}, str(src))
    assert main(["lora", "convert", str(src), str(tmp_path / "lc.safetensors"), "--to", "longcat"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "blocks.0.attn1.to_qq" in err, err
    assert not (tmp_path / "lc.safetensors").exists()


def test_lora_info_describes_a_longcat_file(lora, tmp_path, capsys):
    """``lora info`` detects LongCat-Video's own layout (or is told it with --from) and describes the LoRA through the
    Diffusers modules of its transformer; a file of another layout given --from longcat is refused in one line."""
    src = tmp_path / "lc.safetensors"
    original = export_longcat_lora(lora)
    save_file(original, str(src))
    for given in ([], ["--from", "longcat"]):
        capsys.readouterr()
        assert main(["lora", "info", str(src), *given]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"format: longcat ({len(original)} tensors; LongCat-Video's own layout, modules named as in " \
                           f"Diffusers)", lines
        assert lines[1].startswith("transformer: ") and "rank 4" in lines[1], lines
    assert main(["lora", "info", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["family"], info["tensors"], list(info["components"])) == (
        "longcat", "longcat", len(original), ["transformer"])
    targets = info["components"]["transformer"]["targets"]
    assert {"blocks.N.attn1.to_q", "blocks.N.attn2.to_v", "blocks.N.ffn.w1"} <= set(targets), targets
    wan = tmp_path / "wan.safetensors"
    save_file(lora, str(wan))
    assert main(["lora", "info", str(wan)]) == 0 and capsys.readouterr().out.startswith("format: diffusers (")
    assert main(["lora", "info", str(wan), "--from", "longcat"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an original LongCat-Video LoRA" in err, err


def test_lora_export_writes_the_longcat_layout(lora, tmp_path, capsys):
    """``lora export --formats longcat`` writes lora_longcat.safetensors through the family's export_own_lora, from a
    Diffusers LoRA of a LongCat-Video transformer or from a LongCat-layout file (whose default is diffusers +
    longcat); --overwrite guards it as the other files."""
    want = export_longcat_lora(lora)
    src = tmp_path / "diffusers.safetensors"
    save_file(lora, str(src))
    assert main(["lora", "export", str(src), str(tmp_path / "a"), "--formats", "diffusers", "longcat"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["lora_longcat.safetensors",
                                                                  "pytorch_lora_weights.safetensors"]
    written = load_file(str(tmp_path / "a" / "lora_longcat.safetensors"))
    assert written.keys() == want.keys() and all(torch.equal(written[k], want[k]) for k in want)
    original = tmp_path / "lc.safetensors"
    save_file(want, str(original))
    assert main(["lora", "export", str(original), str(tmp_path / "b")]) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["lora_longcat.safetensors",
                                                                  "pytorch_lora_weights.safetensors"]
    again = load_file(str(tmp_path / "b" / "lora_longcat.safetensors"))
    for k, v in want.items():
        torch.testing.assert_close(again[k], v, msg=k)
    diffusers = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    for k, v in lora.items():
        torch.testing.assert_close(diffusers[k], v, msg=k)
    capsys.readouterr()
    assert main(["lora", "export", str(original), str(tmp_path / "b"), "--formats", "longcat"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora_longcat.safetensors already exist" in err and "--overwrite" in err, err
    assert main(["lora", "export", str(original), str(tmp_path / "b"), "--formats", "longcat", "--overwrite"]) == 0


def test_lora_export_refuses_a_layout_of_another_family(lora, tmp_path, capsys):
    """One error line, nothing written: a LongCat-Video LoRA in a Wan DiT layout, a Wan DiT LoRA (original layout)
    or a Diffusers LoRA of modules LongCat-Video lacks in the longcat layout."""
    original = tmp_path / "lc.safetensors"
    save_file(export_longcat_lora(lora), str(original))
    wan = tmp_path / "wan_original.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 8),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(8, 4)}, str(wan))
    other = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.ffn.net.0.proj.lora_A.weight": torch.ones(4, 8),
               "transformer.blocks.0.ffn.net.0.proj.lora_B.weight": torch.ones(8, 4)}, str(other))
    cases = [
        (original, ["--formats", "original"], f"lora export --formats original: {original} is a LongCat-Video LoRA "
                                              f"(longcat layout), written in the diffusers, longcat layouts only"),
        (wan, ["--formats", "diffusers", "longcat"], f"lora export --formats longcat: the layout of LongCat-Video "
                                                     f"LoRAs only; {wan} is a Wan DiT LoRA (original layout)"),
        (other, ["--formats", "diffusers", "longcat"], f"lora export --formats longcat: {other} is not a LoRA of a "
                                                       f"LongCat-Video transformer"),
    ]
    for i, (src, extra, message) in enumerate(cases):
        dst = tmp_path / f"out{i}"
        assert main(["lora", "export", str(src), str(dst), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not dst.exists() or not any(dst.iterdir())
