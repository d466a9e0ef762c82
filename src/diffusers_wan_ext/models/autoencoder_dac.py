"""``AutoencoderDac``: MOVA's audio VAE (openmoss/MOVA-720p ``audio_vae/``), a continuous DAC autoencoder.

The architecture is the Descript Audio Codec's convolutional encoder / decoder (Snake activations, dilated residual
units, strided ``Conv1d`` down- and ``ConvTranspose1d`` up-sampling) with a KL bottleneck instead of residual vector
quantization (DiffSynth-Studio's ``DacVAE`` with ``continuous=True``, weight norm removed): mono 48 kHz audio
``[B, 1, T]`` -> ``quant_conv`` -> a diagonal Gaussian over ``latent_dim`` (128) channels at ``sample_rate / hop``
(50) latents per second, ``hop = prod(encoder_rates)`` (960); decode = ``post_quant_conv`` -> decoder -> ``tanh``
waveform in ``[-1, 1]``, ``L * hop`` samples for ``L`` latents.  Module names are the release's, so its
``diffusion_pytorch_model.safetensors`` loads as it is (:mod:`diffusers_wan_ext.conversion.mova_audio_vae` fuses
``weight_g`` / ``weight_v`` pairs when a file still has weight norm).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook

from ..utils.shims import ShimSaveMixin

__all__ = ["AutoencoderDac", "DacDecoder", "DacDecoderBlock", "DacEncoder", "DacEncoderBlock", "DacResidualUnit", "Snake1d"]


class Snake1d(nn.Module):
    """``x + sin(alpha * x)^2 / (alpha + 1e-9)`` per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.to(x.dtype)
        return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


class DacResidualUnit(nn.Module):
    """Snake -> dilated ``Conv1d`` (kernel 7) -> Snake -> ``Conv1d`` (kernel 1), plus the input."""

    def __init__(self, dim: int, dilation: int = 1) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim), nn.Conv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Snake1d(dim), nn.Conv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        pad = (x.shape[-1] - y.shape[-1]) // 2
        if pad > 0:
            x = x[..., pad:-pad]
        return x + y


class DacEncoderBlock(nn.Module):
    """Three residual units at ``dim // 2`` channels, Snake, then a strided ``Conv1d`` to ``dim`` channels."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            DacResidualUnit(dim // 2, 1), DacResidualUnit(dim // 2, 3), DacResidualUnit(dim // 2, 9),
            Snake1d(dim // 2),
            nn.Conv1d(dim // 2, dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DacDecoderBlock(nn.Module):
    """Snake, a strided ``ConvTranspose1d`` to ``output_dim`` channels, then three residual units."""

    def __init__(self, input_dim: int, output_dim: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(input_dim),
            nn.ConvTranspose1d(input_dim, output_dim, kernel_size=2 * stride, stride=stride,
                               padding=math.ceil(stride / 2), output_padding=stride % 2),
            DacResidualUnit(output_dim, 1), DacResidualUnit(output_dim, 3), DacResidualUnit(output_dim, 9),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DacEncoder(nn.Module):
    """Waveform ``[B, 1, T]`` -> features ``[B, latent_dim, T / prod(rates)]`` (``block`` as in the release)."""

    def __init__(self, d_model: int, strides: tuple[int, ...], d_latent: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(1, d_model, kernel_size=7, padding=3)]
        for stride in strides:
            d_model *= 2
            layers.append(DacEncoderBlock(d_model, stride))
        layers += [Snake1d(d_model), nn.Conv1d(d_model, d_latent, kernel_size=3, padding=1)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DacDecoder(nn.Module):
    """Latents ``[B, C, L]`` -> waveform ``[B, 1, L * prod(rates)]`` in ``[-1, 1]`` (``model`` as in the release)."""

    def __init__(self, input_channel: int, channels: int, rates: tuple[int, ...], d_out: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(input_channel, channels, kernel_size=7, padding=3)]
        output_dim = channels
        for i, stride in enumerate(rates):
            output_dim = channels // 2 ** (i + 1)
            layers.append(DacDecoderBlock(channels // 2**i, output_dim, stride))
        layers += [Snake1d(output_dim), nn.Conv1d(output_dim, d_out, kernel_size=7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class AutoencoderDac(ShimSaveMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    MOVA's continuous DAC audio VAE.

    Args:
        encoder_dim (`int`, defaults to 128): width of the first encoder convolution (doubles per stage).
        encoder_rates (`tuple[int]`, defaults to ``(2, 3, 4, 5, 8)``): encoder strides (hop = their product).
        latent_dim (`int`, defaults to 128): latent channels.
        decoder_dim (`int`, defaults to 2048): width of the first decoder convolution (halves per stage).
        decoder_rates (`tuple[int]`, defaults to ``(8, 5, 4, 3, 2)``): decoder strides.
        sample_rate (`int`, defaults to 48000): waveform sample rate.

    Example:
        >>> import torch
        >>> from diffusers_wan_ext import AutoencoderDac
        >>> vae = AutoencoderDac(encoder_dim=4, encoder_rates=(2, 2), latent_dim=8, decoder_dim=16,
        ...     decoder_rates=(2, 2), sample_rate=400)
        >>> tuple(vae.decode(torch.randn(1, 8, 5)).sample.shape)
        (1, 1, 20)
    """

    _supports_gradient_checkpointing = False
    _no_split_modules = ["DacResidualUnit"]

    @register_to_config
    def __init__(
        self,
        encoder_dim: int = 128,
        encoder_rates: tuple[int, ...] = (2, 3, 4, 5, 8),
        latent_dim: int = 128,
        decoder_dim: int = 2048,
        decoder_rates: tuple[int, ...] = (8, 5, 4, 3, 2),
        sample_rate: int = 48000,
    ) -> None:
        super().__init__()
        if math.prod(encoder_rates) != math.prod(decoder_rates):
            raise ValueError(f"encoder_rates {tuple(encoder_rates)} and decoder_rates {tuple(decoder_rates)} must "
                             "have the same product (the hop length)")
        self.encoder = DacEncoder(encoder_dim, tuple(encoder_rates), latent_dim)
        self.quant_conv = nn.Conv1d(latent_dim, 2 * latent_dim, 1)
        self.post_quant_conv = nn.Conv1d(latent_dim, latent_dim, 1)
        self.decoder = DacDecoder(latent_dim, decoder_dim, tuple(decoder_rates))

    @property
    def hop_length(self) -> int:
        """Waveform samples per latent."""
        return math.prod(self.config.encoder_rates)

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Posterior of waveform ``x`` ``[B, 1, T]`` (``T`` right-padded with zeros to a multiple of the hop)."""
        pad = -x.shape[-1] % self.hop_length
        if pad:
            x = nn.functional.pad(x, (0, pad))
        posterior = DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Waveform ``[B, 1, L * hop]`` of latents ``z`` ``[B, latent_dim, L]``."""
        audio = self.decoder(self.post_quant_conv(z))
        if not return_dict:
            return (audio,)
        return DecoderOutput(sample=audio)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None) -> DecoderOutput | tuple:
        """Encode and decode ``sample`` ``[B, 1, T]`` (the posterior mean unless ``sample_posterior``)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
