"""Hopper GEMMs for the Wan blocks' linear layers through quack's CuTe-DSL kernels, with per-shape tile configs.

cuBLAS picks one kernel per shape by heuristic. At Wan's shapes on an H100 some of those picks leave a few percent on
the table, and the bias / GELU epilogue variants it picks are slower than its plain GEMM (the bias-epilogue 5120x5120
GEMM runs at 674 TFLOP/s, the same GEMM without bias at 699). quack (``quack-kernels``, which flash-attn 4 already
installs) has persistent warp-specialised sm90 GEMMs with bias and GELU epilogues and explicit tile / cluster
choices. :data:`HOPPER_GEMM_CONFIGS` is the measured table: for each (in_features, out_features, activation) of a
Wan release, the quack config that beat cuBLAS in a round-robin timing on an H100 (``benchmarks/probe_gemm.py
gemmrr``); shapes not in the table keep cuBLAS.

:func:`hopper_linear` is a ``torch.library`` custom op (one opaque node under ``torch.compile(fullgraph=True)``),
inference only (no autograd formula). :func:`hopper_gemm_unavailable_reason` says why it cannot run here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["HOPPER_GEMM_CONFIGS", "hopper_config", "hopper_gemm_unavailable_reason", "hopper_linear",
           "hopper_linear_op"]

#: (in_features, out_features, activation) -> (tile_m, tile_n, cluster_m, cluster_n, pingpong), measured on an H100
#: (round-robin against cuBLAS at the 720p / 480p token counts; speed-up over cuBLAS linear+bias in the comment).
HOPPER_GEMM_CONFIGS: dict[tuple[int, int, str | None], tuple[int, int, int, int, bool]] = {
    # Wan2.1 / 2.2 14B (dim 5120, ffn 13824), 75 600 tokens
    (5120, 15360, None): (256, 192, 1, 2, False),  # fused QKV, 1.034x
    (5120, 5120, None): (128, 256, 2, 1, False),  # attention out / cross q / cross out, 1.070x
    (13824, 5120, None): (128, 256, 2, 1, False),  # FFN down, 1.035x
    (5120, 13824, "gelu_tanh_approx"): (128, 192, 2, 1, True),  # FFN up + GELU, 1.065x over cuBLASLt's GELU epilogue
    # Wan2.1 1.3B (dim 1536, ffn 8960), 32 760 tokens
    (1536, 4608, None): (128, 192, 2, 1, True),  # fused QKV, 1.093x
    (1536, 1536, None): (128, 192, 2, 1, True),  # attention out / cross q / cross out, 1.127x
    (1536, 8960, None): (128, 192, 2, 1, True),  # FFN up (no activation), 1.106x
    (1536, 8960, "gelu_tanh_approx"): (128, 192, 2, 1, True),  # FFN up + GELU, 1.22x over cuBLASLt's GELU epilogue
}


@functools.lru_cache(maxsize=1)
def _quack():
    try:
        from quack.gemm_config import GemmConfig  # type: ignore[import-not-found]
        from quack.gemm_interface import gemm_act, gemm_tuned  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        return None, f"quack not installed ({type(exc).__name__}: {str(exc)[:80]}); pip install flash-attn-4"
    return (GemmConfig, gemm_tuned, gemm_act), None


def hopper_gemm_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when the quack Hopper GEMMs can run on ``device``; otherwise the reason."""
    if not torch.cuda.is_available():
        return "needs CUDA"
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return f"needs a CUDA device (got {device})"
    major = torch.cuda.get_device_capability(device)[0]
    if major != 9:
        return f"tuned for Hopper (sm90) only (this GPU is sm{major}x)"
    return _quack()[1]


def hopper_config(in_features: int, out_features: int, activation: str | None = None):
    """The measured config for a layer shape, or None (the layer keeps cuBLAS)."""
    return HOPPER_GEMM_CONFIGS.get((int(in_features), int(out_features), activation))


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
         config: tuple[int, int, int, int, bool]) -> torch.Tensor:
    mods, reason = _quack()
    if mods is None:
        raise RuntimeError(f"hopper_linear: {reason}")
    gemm_config, gemm_tuned, gemm_act = mods
    tile_m, tile_n, cluster_m, cluster_n, pingpong = config
    cfg = gemm_config(tile_m=tile_m, tile_n=tile_n, cluster_m=cluster_m, cluster_n=cluster_n, pingpong=pingpong,
                      swap_ab=False, device_capacity=9, is_dynamic_persistent=False)
    a = x.reshape(-1, x.shape[-1])
    if a.stride(-1) != 1:
        a = a.contiguous()
    out = torch.empty(a.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
    if activation is None:
        gemm_tuned.fn(a, weight.t(), out, None, bias=bias, config=cfg)
    else:
        gemm_act(a, weight.t(), bias=bias, activation=activation, postact_out=out, store_preact=False, tuned=False,
                 config=cfg)
    return out.view(*x.shape[:-1], weight.shape[0])


if hasattr(torch, "library") and hasattr(torch.library, "custom_op"):

    @torch.library.custom_op("diffusers_wan_ext::hopper_linear", mutates_args=())
    def hopper_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                          tile_m: int, tile_n: int, cluster_m: int, cluster_n: int, pingpong: bool) -> torch.Tensor:
        """The quack GEMM with an explicit config (no checks: see :func:`hopper_linear`)."""
        return _run(x, weight, bias, activation, (tile_m, tile_n, cluster_m, cluster_n, pingpong))

    @hopper_linear_op.register_fake
    def _(x, weight, bias, activation, tile_m, tile_n, cluster_m, cluster_n, pingpong):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

else:  # pragma: no cover - very old torch

    def hopper_linear_op(x, weight, bias, activation, tile_m, tile_n, cluster_m, cluster_n, pingpong):
        return _run(x, weight, bias, activation, (tile_m, tile_n, cluster_m, cluster_n, pingpong))


_ACTIVATIONS = {None: lambda y: y, "gelu_tanh_approx": lambda y: F.gelu(y, approximate="tanh")}


def hopper_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, config: tuple[int, int, int, int, bool] | None = None
                  ) -> torch.Tensor:
    """``activation(x @ weight.T + bias)`` with a quack sm90 GEMM (bias / activation in the epilogue).

    Args:
        x: (..., in_features), bf16/fp16 on a Hopper GPU.
        weight, bias: the ``nn.Linear`` parameters.
        activation: None or ``"gelu_tanh_approx"``.
        config: (tile_m, tile_n, cluster_m, cluster_n, pingpong); default :func:`hopper_config` of the shape.

    Where the kernel cannot run (no quack, not sm90, no config for the shape) this is the PyTorch expression.

    Example:
        >>> y = hopper_linear(x, layer.weight, layer.bias)  # doctest: +SKIP
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(map(str, _ACTIVATIONS))}, got {activation!r}")
    config = config or hopper_config(weight.shape[1], weight.shape[0], activation)
    if config is None or not x.is_cuda or hopper_gemm_unavailable_reason(x.device) is not None:
        return _ACTIVATIONS[activation](F.linear(x, weight, bias))
    return hopper_linear_op(x, weight, bias, activation, *config)
