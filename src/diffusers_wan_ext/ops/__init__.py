"""Custom GPU kernels (Triton), used only when CUDA and Triton are present.

:mod:`._triton` is the one place that imports Triton; its names are re-exported here for kernels outside this
package (the VAE's fused norm, :mod:`diffusers_wan_ext.vae.norm_kernel`).
"""

from ._triton import interpreting, pow2_groups, tl, triton, triton_available, uses_triton

__all__ = ["interpreting", "pow2_groups", "tl", "triton", "triton_available", "uses_triton"]
