"""Write release-size GGUF DiT files quickly for the benchmarks: the project's ``write_gguf`` with the weights on
the GPU, so that Q8_0 and the K-quants are packed there by ``diffusers_wan_ext.utils.gguf_kquants`` (torch,
ggml's reference quantizers; gguf-py would take minutes in numpy for a 14B model and cannot quantize K-quants).

``qtype``: any ``write_gguf`` type; ``"Q4_K"`` puts every tensor city96's rules quantize in Q4_K (``"Q4_K_M"`` is
city96's mix: attention ``.v.weight`` and ``ffn.2`` in Q6_K).  ``python gguf_fast.py`` checks that the GPU
packing equals the CPU one and reads back with ``gguf.quants.dequantize`` within each type's error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:  # run from a checkout: the package's sources
    sys.path.insert(0, str(SRC))

from diffusers_wan_ext.utils.gguf_files import write_gguf  # noqa: E402
from diffusers_wan_ext.utils.gguf_kquants import quantize_blocks  # noqa: E402


def write_gguf_fast(path, state_dict, qtype: str = "Q8_0", arch: str = "wan") -> dict[str, str]:
    """``write_gguf(path, state_dict, qtype)``, the tensors moved to the GPU first when one is there."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return write_gguf(path, {k: v.to(device) for k, v in state_dict.items()}, qtype, arch=arch)


def _check() -> None:
    """GPU packing == CPU packing (where a GPU is there) and gguf-py's dequantization within each type's bound."""
    import gguf

    torch.manual_seed(0)
    x = torch.randn(64, 512) * 0.05
    for qtype, tol in (("Q8_0", 0.01), ("Q6_K", 0.025), ("Q5_K", 0.05), ("Q4_K", 0.1), ("Q3_K", 0.2)):
        data = quantize_blocks(x, qtype)
        if torch.cuda.is_available():
            same = (quantize_blocks(x.cuda(), qtype).cpu() == data).all(dim=1).float().mean().item()
            print(f"{qtype}: GPU blocks equal to CPU's: {same:.4f}")
        back = torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[qtype])).reshape(x.shape)
        err = ((back - x).norm() / x.norm()).item()
        print(f"{qtype}: relative error {err:.3e} (bound {tol})")
        assert err < tol, (qtype, err)


if __name__ == "__main__":
    _check()
