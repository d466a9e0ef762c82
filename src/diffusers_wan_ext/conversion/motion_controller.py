"""The speed-control module ``DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1`` (``model.safetensors``) as a Diffusers
component (:class:`~diffusers_wan_ext.WanMotionControllerModel`).

The release keys are ``linear.{0,2,4}.{weight,bias}`` (no prefix); :class:`WanMotionControllerModel` keeps them, so
the key map is the identity table below and the config (``freq_dim``, ``dim``) is read from the shapes.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from ..models.motion_controller import WanMotionControllerModel
from ..utils.io import ConversionError, load_state_dict, raise_for_key_problems, strip_known_prefixes

__all__ = ["MOTION_CONTROLLER_KEY_MAP", "motion_controller_config_from_state_dict", "load_motion_controller_from_original"]

# (release key, Diffusers key)
MOTION_CONTROLLER_KEY_MAP: tuple[tuple[str, str], ...] = tuple(
    (f"linear.{i}.{p}", f"linear.{i}.{p}") for i in (0, 2, 4) for p in ("weight", "bias")
)


def motion_controller_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{"freq_dim", "dim"}`` of a release-layout motion controller; raises naming missing / unknown keys."""
    expected = {src for src, _ in MOTION_CONTROLLER_KEY_MAP}
    raise_for_key_problems(
        "WanMotionControllerModel (speed-control model.safetensors)",
        sorted(expected - set(sd)), sorted(set(sd) - expected), [],
    )
    dim, freq_dim = sd["linear.0.weight"].shape
    out = sd["linear.4.weight"].shape[0]
    if out != 6 * dim or tuple(sd["linear.2.weight"].shape) != (dim, dim):
        raise ConversionError(
            f"motion controller shapes do not fit MLP(freq_dim -> dim -> dim -> 6*dim): linear.0.weight "
            f"{tuple(sd['linear.0.weight'].shape)}, linear.2.weight {tuple(sd['linear.2.weight'].shape)}, "
            f"linear.4.weight {tuple(sd['linear.4.weight'].shape)}"
        )
    return {"freq_dim": int(freq_dim), "dim": int(dim)}


def load_motion_controller_from_original(
    sd_or_path: Mapping[str, torch.Tensor] | str | os.PathLike, torch_dtype: torch.dtype | None = None
):
    """Build :class:`~diffusers_wan_ext.WanMotionControllerModel` from the release file (or its state dict).

    Example:
        >>> mc = load_motion_controller_from_original("Wan2.1-1.3b-speedcontrol-v1/model.safetensors")  # doctest: +SKIP
    """
    sd = load_state_dict(sd_or_path) if isinstance(sd_or_path, (str, os.PathLike)) else dict(sd_or_path)
    sd = strip_known_prefixes(sd, "linear.")
    config = motion_controller_config_from_state_dict(sd)
    converted = {dst: sd[src] for src, dst in MOTION_CONTROLLER_KEY_MAP}
    if torch_dtype is not None:
        converted = {k: v.to(torch_dtype) for k, v in converted.items()}
    model = WanMotionControllerModel(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval()
