"""Write release-size GGUF DiT files quickly for the benchmarks: Q8_0 and Q4_K blocks packed with torch (on the
GPU when the weights are there) instead of ``gguf.quants`` in numpy (minutes for a 14B model; and gguf-py cannot
quantize K-quants at all).

The packing follows ggml's block layouts (``block_q8_0``: fp16 d + 32 int8; ``block_q4_K``: fp16 d, fp16 dmin,
12 bytes of 6-bit sub-block scales/mins, 128 bytes of 4-bit values). The Q4_K quantizer is a simple one (per
sub-block min/max, no search as llama.cpp's ``make_qkx2_quants`` does), so its error is a little above a real
Q4_K_M file's; ``python gguf_fast.py`` checks both layouts against ``gguf.quants.dequantize``.
Tensors are typed as the project's ``write_gguf`` types them (small / 1-D / modulation tensors F32, widths that do
not fit a block F16).
"""

from __future__ import annotations

import torch

BLOCK = {"Q8_0": 32, "Q4_K": 256}
KEEP_F32 = (".modulation",)


def pack_q8_0(x: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` float -> ``[rows, cols // 32 * 34]`` uint8 (ggml ``block_q8_0``)."""
    rows = x.shape[0]
    blocks = x.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(d > 0, blocks / d.clamp(min=1e-30), torch.zeros_like(blocks)).round().clamp(-127, 127)
    packed = torch.cat([d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)
    return packed.reshape(rows, -1)


def _scales_6bit(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins per super-block -> ggml's 12-byte ``scales`` field (``get_scale_min_k4``)."""
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    out = torch.zeros(sc.shape[0], 12, dtype=torch.int32, device=sc.device)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out.to(torch.uint8)


def pack_q4_k(x: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` float -> ``[rows, cols // 256 * 144]`` uint8 (ggml ``block_q4_K``):
    ``value = d * sc_j * q - dmin * m_j`` with 4-bit ``q`` and 6-bit ``sc_j`` / ``m_j`` per 32 values."""
    rows = x.shape[0]
    sub = x.float().reshape(-1, 8, 32)
    lo = sub.amin(dim=2).clamp(max=0)                    # offsets are subtracted: min <= 0
    hi = sub.amax(dim=2)
    step = ((hi - lo) / 15).clamp(min=1e-12)             # per sub-block step and offset
    d = step.amax(dim=1, keepdim=True) / 63
    dmin = (-lo).amax(dim=1, keepdim=True) / 63
    d16, dmin16 = d.half(), dmin.half()
    d, dmin = d16.float().clamp(min=1e-12), dmin16.float()
    sc = (step / d).round().clamp(1, 63)
    m = torch.where(dmin > 0, -lo / dmin.clamp(min=1e-12), torch.zeros_like(lo)).round().clamp(0, 63)
    scale = (d * sc).unsqueeze(2)
    offset = (dmin * m).unsqueeze(2)
    q = ((sub + offset) / scale).round().clamp(0, 15).to(torch.uint8).reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    packed = torch.cat([d16.view(torch.uint8), dmin16.view(torch.uint8), _scales_6bit(sc, m), qs], dim=1)
    return packed.reshape(rows, -1)


def stored_type(key: str, t: torch.Tensor, qtype: str) -> str:
    if t.ndim <= 1 or t.numel() <= 1024 or any(s in key for s in KEEP_F32) or t.ndim > 4:
        return "F32"
    return qtype if t.shape[-1] % BLOCK[qtype] == 0 else "F16"


def write_gguf_fast(path, state_dict, qtype: str = "Q8_0", arch: str = "wan") -> dict[str, str]:
    """Like ``diffusers_wan_ext.utils.gguf_files.write_gguf`` for ``Q8_0`` / ``Q4_K``, packing with torch."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(gguf.LlamaFileType, {"Q8_0": "MOSTLY_Q8_0", "Q4_K": "MOSTLY_Q4_K_M"}[qtype]))
    stored = {}
    for key, t in state_dict.items():
        kind = stored_type(key, t, qtype)
        t = t.detach()
        if kind == "F32":
            data = t.float().cpu().numpy()
        elif kind == "F16":
            data = t.half().cpu().numpy()
        else:
            flat = t.reshape(-1, t.shape[-1])
            packed = pack_q8_0(flat) if kind == "Q8_0" else pack_q4_k(flat)
            data = packed.reshape(*t.shape[:-1], packed.shape[-1]).cpu().numpy()
        writer.add_tensor(key, data, raw_dtype=gguf.GGMLQuantizationType[kind])
        stored[key] = kind
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _check() -> None:
    """Both packings against gguf-py's reference dequantization (CPU)."""
    import gguf

    torch.manual_seed(0)
    x = torch.randn(4, 512) * 0.05
    for qtype, pack, tol in (("Q8_0", pack_q8_0, 0.01), ("Q4_K", pack_q4_k, 0.12)):
        data = pack(x).numpy()
        back = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])).reshape(x.shape)
        err = ((back - x).norm() / x.norm()).item()
        print(f"{qtype}: relative error {err:.3e} (bound {tol})")
        assert err < tol, (qtype, err)


if __name__ == "__main__":
    _check()
