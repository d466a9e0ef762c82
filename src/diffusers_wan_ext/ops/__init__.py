"""Custom GPU kernels (Triton), used only when CUDA and Triton are present."""
