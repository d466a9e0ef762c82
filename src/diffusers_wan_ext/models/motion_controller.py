"""Speed control for Wan2.1-T2V-1.3B (``DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1``).

:class:`WanMotionControllerModel` maps ``motion_bucket_id`` (larger = more motion) to an offset of the transformer's
6 x dim block modulation: ``MLP(sinusoid(10 * motion_bucket_id))``.  The offset is added to the output of the
transformer's ``condition_embedder`` (its ``timestep_proj``, the input of every block's modulation; not the head's
``temb``) by :class:`MotionControlHook`, a Diffusers ``ModelHook`` -- so the base transformer stays the stock
``WanTransformer3DModel`` and other hooks (offloading, caching) keep working.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.loaders import PeftAdapterMixin
from diffusers.utils import BaseOutput

from ..utils.shims import ShimSaveMixin

__all__ = [
    "MotionControlHook",
    "WanMotionControllerModel",
    "WanMotionControllerOutput",
    "apply_motion_control",
    "motion_sinusoid",
]

MOTION_CONTROL_HOOK = "wan_motion_control"


def motion_sinusoid(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``[cos(v * w), sin(v * w)]`` with ``w_j = 10000^(-j / (dim/2))``, computed in float64 (as the reference)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=values.device).div(half))
    args = torch.outer(values.reshape(-1).to(torch.float64), freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


@dataclass
class WanMotionControllerOutput(BaseOutput):
    """Output of :class:`WanMotionControllerModel`.

    Args:
        offset (`torch.Tensor` of shape `(B, 6 * dim)`): the offset added to the transformer's block modulation.
    """

    offset: torch.Tensor


class WanMotionControllerModel(ShimSaveMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    Motion-bucket embedding of the Wan2.1 speed-control model.

    Args:
        freq_dim (`int`, defaults to 256): width of the sinusoidal embedding of ``10 * motion_bucket_id``.
        dim (`int`, defaults to 1536): transformer width; the output has ``6 * dim`` values.

    Parameter names are the release's (``linear.0`` / ``linear.2`` / ``linear.4``).  LoRA adapters load as on the
    transformers (``PeftAdapterMixin``; ``motion_controller.*`` keys of ``WanSpeedControlPipeline.load_lora_weights``).
    Under layerwise casting the input layer ``linear.0`` stays in the model's dtype (as stock Wan keeps its
    embedders): the sinusoid enters in that dtype, the later layers compute in the compute dtype.

    Example:
        >>> import torch
        >>> from diffusers_wan_ext import WanMotionControllerModel
        >>> mc = WanMotionControllerModel(freq_dim=32, dim=48)
        >>> tuple(mc(torch.tensor([100.0])).offset.shape)
        (1, 288)
    """

    _supports_gradient_checkpointing = False
    _skip_layerwise_casting_patterns = [r"^linear\.0$"]
    _no_split_modules: list[str] = []  # any split between its layers works (device_map="auto")

    @register_to_config
    def __init__(self, freq_dim: int = 256, dim: int = 1536) -> None:
        super().__init__()
        self.linear = nn.Sequential(
            nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim * 6)
        )

    def forward(
        self, motion_bucket_id: torch.Tensor | float | int, return_dict: bool = True
    ) -> WanMotionControllerOutput | tuple[torch.Tensor]:
        """
        Args:
            motion_bucket_id (`torch.Tensor` of shape `(B,)`, or a number): the motion bucket (larger = more motion).
            return_dict (`bool`, defaults to `True`): return a :class:`WanMotionControllerOutput` instead of a tuple.

        Returns:
            The ``[B, 6 * dim]`` modulation offset, as ``WanMotionControllerOutput.offset`` or ``(offset,)``.
        """
        first = self.linear[0]
        ids = torch.as_tensor(motion_bucket_id).reshape(-1)
        if first.weight.device.type != "meta":  # (offload hooks keep the weights on meta and move the input)
            ids = ids.to(first.weight.device)
        if not torch.compiler.is_compiling() and not torch.isfinite(ids.to(torch.float64)).all():
            raise ValueError(f"motion_bucket_id must be finite, got {motion_bucket_id!r}")
        emb = motion_sinusoid(ids.to(torch.float64) * 10, self.config.freq_dim)
        offset = self.linear(emb.to(first.weight.dtype))
        if not return_dict:
            return (offset,)
        return WanMotionControllerOutput(offset=offset)


class MotionControlHook(ModelHook):
    """Adds a fixed ``[B or 1, 6 * dim]`` offset to ``timestep_proj`` of a Wan ``condition_embedder``'s output."""

    def __init__(self, offset: torch.Tensor):
        super().__init__()
        self.offset = offset

    def post_forward(self, module: nn.Module, output):
        temb, timestep_proj, *rest = output
        offset = self.offset.to(device=timestep_proj.device, dtype=timestep_proj.dtype)
        if timestep_proj.ndim == 3:  # per-token timesteps: [B, L, 6 * dim]
            offset = offset.unsqueeze(1)
        if offset.shape[-1] != timestep_proj.shape[-1]:
            raise ValueError(
                f"motion controller gives {offset.shape[-1]} modulation values but the transformer expects "
                f"{timestep_proj.shape[-1]} (6 x its width): the motion controller does not belong to this transformer"
            )
        return (temb, timestep_proj + offset, *rest)


@contextlib.contextmanager
def apply_motion_control(transformer: nn.Module, offset: torch.Tensor | WanMotionControllerOutput | None):
    """Within the ``with`` block, every forward of ``transformer`` adds ``offset`` (a tensor, or a motion controller's
    output) to its block modulation."""
    if isinstance(offset, WanMotionControllerOutput):
        offset = offset.offset
    if offset is None:
        yield
        return
    embedder = transformer.condition_embedder
    registry = HookRegistry.check_if_exists_or_initialize(embedder)
    registry.register_hook(MotionControlHook(offset), MOTION_CONTROL_HOOK)
    try:
        yield
    finally:
        registry.remove_hook(MOTION_CONTROL_HOOK, recurse=False)
