"""Loaders for the umT5 encoder and the Wan2.1 VAE as the non-Wan releases ship them (LongCat-Video, MOVA).

Those releases hold either a Transformers / Diffusers folder (``text_encoder/``, ``vae/`` with a ``config.json``) or
the original Wan files (``models_t5_umt5-xxl-enc-bf16.pth``, ``Wan2.1_VAE.pth``); both load here.  A folder that does
not load, or a VAE of another version, is a one-line :class:`~diffusers_wan_ext.utils.io.ConversionError`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from transformers import UMT5EncoderModel

from ..utils.io import ConversionError, load_state_dict
from .text_encoder import load_t5_from_original
from .vae import detect_vae_version, load_vae_from_original

__all__ = ["load_umt5_component", "load_wan21_vae_component"]

WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_VAE_FILE = "Wan2.1_VAE.pth"


def load_umt5_component(path: Path, torch_dtype: torch.dtype) -> UMT5EncoderModel:
    """The umT5 encoder from a Transformers folder or the Wan ``.pth`` (``path`` the file or its folder)."""
    if path.is_dir() and (path / "config.json").is_file():
        try:
            return UMT5EncoderModel.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True).eval()
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{path}: cannot load a UMT5EncoderModel ({type(e).__name__}: {e})") from e
    return load_t5_from_original(path / WAN_T5_FILE if path.is_dir() else path, torch_dtype=torch_dtype)


def load_wan21_vae_component(path: Path, model_name: str) -> AutoencoderKLWan:
    """The Wan2.1 VAE in float32 from a Diffusers folder or ``Wan2.1_VAE.pth``; ``model_name`` names the release in
    the error for a VAE of another version."""
    if path.is_dir() and (path / "config.json").is_file():
        try:
            return AutoencoderKLWan.from_pretrained(str(path), dtype=torch.float32).eval()
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{path}: cannot load an AutoencoderKLWan ({type(e).__name__}: {e})") from e
    sd = load_state_dict(path / WAN_VAE_FILE if path.is_dir() else path)
    if detect_vae_version(sd) != "wan2.1":
        raise ConversionError(f"{path}: a {detect_vae_version(sd)} VAE, but {model_name} uses the Wan2.1 VAE "
                              f"({WAN_VAE_FILE})")
    return load_vae_from_original(sd, torch_dtype=torch.float32)
