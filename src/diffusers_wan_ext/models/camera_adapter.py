"""The camera ``control_adapter`` of Wan-Fun Control-Camera checkpoints (VideoX-Fun / DiffSynth ``SimpleAdapter``).

Per latent frame: ``PixelUnshuffle(downscale_factor)`` of the packed Plücker map (24 channels = 6 Plücker channels x
4 sub-frames), a non-overlapping ``Conv2d`` with the transformer's spatial patch size, and residual blocks
(conv 3x3, ReLU, conv 3x3, + input).  The output ``[B, dim, F, H/16, W/16]`` is added to the patch embeddings.
Parameter names (``conv``, ``residual_blocks.N.conv1`` / ``conv2``) are the release names.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WanCameraControlAdapter"]


class WanCameraResidualBlock(nn.Module):
    """``x + conv2(relu(conv1(x)))`` with 3x3 convolutions."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


class WanCameraControlAdapter(nn.Module):
    """Camera adapter: ``[B, in_channels, F, H, W]`` pixel-rate camera map -> ``[B, dim, F, H/(d*k), W/(d*k)]``.

    Args:
        in_channels: channels of the packed camera map (24 in every release).
        out_channels: transformer width.
        kernel_size: spatial patch size of the transformer (``(2, 2)``).
        downscale_factor: pixel-unshuffle factor (8, the VAE's spatial factor).
        num_residual_blocks: residual blocks after the convolution (1 in every release).
    """

    def __init__(
        self,
        in_channels: int = 24,
        out_channels: int = 1536,
        kernel_size: tuple[int, int] = (2, 2),
        downscale_factor: int = 8,
        num_residual_blocks: int = 1,
    ):
        super().__init__()
        self.downscale_factor = int(downscale_factor)
        self.pixel_unshuffle = nn.PixelUnshuffle(self.downscale_factor)
        self.conv = nn.Conv2d(
            in_channels * self.downscale_factor**2, out_channels, kernel_size=tuple(kernel_size),
            stride=tuple(kernel_size),
        )
        self.residual_blocks = nn.Sequential(*[WanCameraResidualBlock(out_channels) for _ in range(num_residual_blocks)])

    def forward(self, camera_latents: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = camera_latents.shape
        x = camera_latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        x = self.residual_blocks(self.conv(self.pixel_unshuffle(x)))
        return x.reshape(b, f, *x.shape[1:]).permute(0, 2, 1, 3, 4)
