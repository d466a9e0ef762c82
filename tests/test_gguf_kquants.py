"""K-quant GGUF blocks computed with torch (``diffusers_wan_ext.utils.gguf_kquants``) and the K-quant file types of
``write_gguf`` (city96's patched ``llama-quantize`` rules for architecture ``wan``).  CPU, small arrays.

Bounds, relative RMS error of N(0, 0.02) weights read back with ``gguf.quants.dequantize`` (measured: Q6_K 0.018,
Q5_K 0.036, Q4_K 0.071, Q3_K 0.15; Q8_0 0.005): Q6_K 2.5e-2, Q5_K 5e-2, Q4_K 0.1, Q3_K 0.2, Q8_0 1e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from diffusers_wan_ext.utils.gguf_files import KQUANT_MIXES, write_gguf  # noqa: E402
from diffusers_wan_ext.utils.gguf_kquants import BLOCK_BYTES, quantize_blocks  # noqa: E402

BOUNDS = {"Q8_0": 1e-2, "Q6_K": 2.5e-2, "Q5_K": 5e-2, "Q4_K": 0.1, "Q3_K": 0.2}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def dequantize(packed: torch.Tensor, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(packed.numpy(), gguf.GGMLQuantizationType[qtype]).copy())


def test_blocks_read_back_by_gguf_within_each_types_error():
    torch.manual_seed(0)
    x = torch.randn(16, 512) * 0.02
    special = torch.zeros(3, 512)  # an all-zero row, a constant block, an all-positive row
    special[1, :256] = 0.5
    special[2] = torch.rand(512)
    errors = {}
    for qtype, bound in BOUNDS.items():
        packed = quantize_blocks(x, qtype)
        block = 32 if qtype == "Q8_0" else 256
        assert packed.dtype == torch.uint8 and packed.shape == (16, 512 // block * BLOCK_BYTES[qtype])
        assert packed.shape[1] // (512 // block) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
        errors[qtype] = rel_rms(dequantize(packed, qtype), x)
        assert errors[qtype] < bound, (qtype, errors[qtype])
        back = dequantize(quantize_blocks(special, qtype), qtype)
        assert torch.equal(back[0], special[0]), qtype  # zeros stay exactly zero
        assert rel_rms(back[1:], special[1:]) < bound, qtype
    assert errors["Q8_0"] < errors["Q6_K"] < errors["Q5_K"] < errors["Q4_K"] < errors["Q3_K"], errors


def test_q8_0_bytes_equal_gguf_quantize():
    torch.manual_seed(1)
    x = torch.randn(8, 256) * 0.05
    x[0, :32] = 0
    x[1, :32] = torch.arange(32) - 15.5  # halves: ggml's roundf rounds them away from zero
    ref = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(quantize_blocks(x, "Q8_0").numpy(), ref)


def test_rows_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_blocks(torch.zeros(4, 96), "Q4_K")
    with pytest.raises(ValueError, match="Q4_0"):
        quantize_blocks(torch.zeros(4, 256), "Q4_0")


def wan_like() -> dict[str, torch.Tensor]:
    """Three blocks' worth of Wan keys, each tensor small (rows of 256, a few rows)."""
    torch.manual_seed(2)
    sd = {"patch_embedding.weight": torch.randn(8, 4, 1, 2, 2), "text_embedding.0.weight": torch.randn(8, 256),
          "time_projection.1.weight": torch.randn(12, 256), "head.head.weight": torch.randn(8, 256)}
    for i in range(3):
        p = f"blocks.{i}."
        sd.update({p + "modulation": torch.randn(1, 6, 256), p + "norm3.weight": torch.randn(256),
                   p + "self_attn.q.weight": torch.randn(5, 256), p + "self_attn.v.weight": torch.randn(5, 256),
                   p + "cross_attn.v.weight": torch.randn(5, 256), p + "ffn.0.weight": torch.randn(5, 256),
                   p + "ffn.2.weight": torch.randn(5, 256), p + "conv.weight": torch.randn(4, 256, 3)})
    sd["blocks.0.narrow.weight"] = torch.randn(16, 96)  # rows not a multiple of 256: city96's fallback is F16
    return {k: v * 0.02 for k, v in sd.items()}


# mix -> (main type, the six .v.weight types in file order, .ffn.2.weight type): lcpp.patch img_tensor_get_type
RULES = {"Q6_K": ("Q6_K", ["Q6_K"] * 6, "Q6_K"), "Q5_K_M": ("Q5_K", ["Q6_K"] * 6, "Q6_K"),
         "Q5_K_S": ("Q5_K", ["Q5_K"] * 6, "Q5_K"), "Q4_K_M": ("Q4_K", ["Q6_K"] * 6, "Q6_K"),
         "Q4_K_S": ("Q4_K", ["Q5_K"] * 4 + ["Q4_K"] * 2, "Q5_K"), "Q4_K": ("Q4_K", ["Q4_K"] * 6, "Q4_K"),
         "Q3_K_L": ("Q3_K", ["Q5_K"] * 6, "Q5_K"), "Q3_K_M": ("Q3_K", ["Q5_K"] * 2 + ["Q4_K"] * 4, "Q4_K"),
         "Q3_K_S": ("Q3_K", ["Q3_K"] * 6, "Q3_K")}


@pytest.mark.parametrize("mix", sorted(RULES))
def test_write_gguf_kquant_mix_types_follow_city96(tmp_path, mix):
    assert mix in KQUANT_MIXES
    sd = wan_like()
    stored = write_gguf(tmp_path / "m.gguf", sd, mix)
    main, v_types, ffn_down = RULES[mix]
    assert [stored[k] for k in sd if k.endswith(".v.weight")] == v_types
    assert {stored[k] for k in sd if k.endswith(".ffn.2.weight")} == {ffn_down}
    assert {stored[k] for k in sd if k.endswith((".q.weight", ".ffn.0.weight"))} == {main}
    assert all(stored[k] == "F32" for k in sd if k.endswith(("modulation", "norm3.weight", "patch_embedding.weight")))
    assert all(stored[k] == "F16" for k in ("text_embedding.0.weight", "time_projection.1.weight",
                                            "head.head.weight", "blocks.0.conv.weight", "blocks.0.narrow.weight"))
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert {t.name: t.tensor_type.name for t in reader.tensors} == stored
    file_type = reader.get_field("general.file_type").contents()
    assert gguf.LlamaFileType(file_type).name == ("MOSTLY_" + mix if "_K_" in mix or mix == "Q6_K" else
                                                  f"MOSTLY_{mix}_S")
    for t in reader.tensors:
        back = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(sd[t.name].shape)
        bound = BOUNDS.get(t.tensor_type.name, 1e-3)
        assert rel_rms(back, sd[t.name]) < bound, (mix, t.name, t.tensor_type.name)
