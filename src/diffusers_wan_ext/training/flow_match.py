"""Flow-matching training objective of DiffSynth-Studio for Wan (``FlowMatchSFTLoss`` + ``FlowMatchScheduler("Wan")``).

The reference (``diffsynth/diffusion/loss.py`` and ``flow_match.py``) trains every Wan model with:

* a grid of ``N = 1000`` training timesteps: ``u = linspace(1, 0, N + 1)[:N]``, the Wan shift
  ``sigma = shift * u / (1 + (shift - 1) * u)`` (shift 5), ``t = 1000 * sigma`` (descending, float32);
* per step, an index ``k ~ U{floor(min_b * N), ..., floor(max_b * N) - 1}`` (``--min/--max_timestep_boundary``:
  index space, so ``max_b = 0.417`` keeps the ``t >= 875`` high-noise part of Wan2.2 A14B), ``t = t_k`` cast to the
  training dtype (bf16: the model sees the rounded value), and ``sigma`` / weight taken at the grid point nearest to
  that rounded ``t`` (``argmin |t_grid - t|``, first index on ties), exactly as the reference's ``add_noise`` and
  ``training_weight`` look them up;
* ``x_t = (1 - sigma) * x0 + sigma * noise`` with ``noise ~ N(0, 1)``, target ``noise - x0``;
* ``loss = mse(prediction.float(), target.float()) * w(t)`` with the weight
  ``w~ = exp(-2 ((t - 500) / 1000)^2)``, ``w = (w~ - min w~) * N / sum(w~ - min w~)`` over the grid (mean 1; mid
  timesteps weigh most, ``t = 1000`` about 0).

Example:
    >>> import torch
    >>> schedule = FlowMatchTrainingSchedule()
    >>> len(schedule.timesteps), round(float(schedule.weights.mean()), 4)
    (1000, 1.0)
    >>> s = schedule.sample(torch.Generator().manual_seed(0), timestep_dtype=torch.bfloat16)
    >>> 0 <= s.index < 1000 and float(s.timestep) == float(torch.tensor(float(s.timestep)).bfloat16())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FlowMatchTrainingSchedule", "TimestepSample", "expert_timestep_boundaries"]


@dataclass(frozen=True)
class TimestepSample:
    """One sampled training timestep.

    Attributes:
        index: the grid index drawn (before rounding).
        timestep: the timestep the model sees (``t_index`` rounded to the training dtype), float32 scalar tensor.
        sigma: the noise level used for ``x_t`` (grid point nearest to ``timestep``).
        weight: the loss weight at that grid point.
    """

    index: int
    timestep: torch.Tensor
    sigma: float
    weight: float


class FlowMatchTrainingSchedule:
    r"""
    DiffSynth-Studio's Wan training grid: shifted timesteps, their loss weights and the boundary-restricted sampling.

    Args:
        shift (`float`, defaults to 5.0): the flow shift of the training grid (the reference always uses 5).
        num_train_timesteps (`int`, defaults to 1000): grid size and timestep scale.
        min_boundary (`float`, defaults to 0.0), max_boundary (`float`, defaults to 1.0):
            the sampled index range ``[floor(min_boundary * N), floor(max_boundary * N))`` (index 0 = most noise).

    Example:
        >>> schedule = FlowMatchTrainingSchedule(min_boundary=0.0, max_boundary=0.417)
        >>> float(schedule.timesteps[schedule.index_range[1] - 1]) >= 875
        True
    """

    def __init__(
        self,
        shift: float = 5.0,
        num_train_timesteps: int = 1000,
        min_boundary: float = 0.0,
        max_boundary: float = 1.0,
    ) -> None:
        if not 0.0 <= min_boundary < max_boundary <= 1.0:
            raise ValueError(
                f"timestep boundaries must satisfy 0 <= min < max <= 1 (fractions of the {num_train_timesteps}-step "
                f"grid, 0 = most noise); got min={min_boundary}, max={max_boundary}"
            )
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        n = int(num_train_timesteps)
        self.num_train_timesteps = n
        self.shift = float(shift)
        u = torch.linspace(1.0, 0.0, n + 1)[:-1]
        self.sigmas = shift * u / (1 + (shift - 1) * u)
        self.timesteps = self.sigmas * n
        w = torch.exp(-2 * ((self.timesteps - n / 2) / n) ** 2)
        w = w - w.min()
        self.weights = w * (n / w.sum())
        lo, hi = int(min_boundary * n), int(max_boundary * n)
        if hi <= lo:
            raise ValueError(
                f"timestep boundaries [{min_boundary}, {max_boundary}) select no grid index out of {n}; widen them"
            )
        self.index_range = (lo, hi)

    def nearest_index(self, timestep: float | torch.Tensor) -> int:
        """Grid index nearest to ``timestep`` (first on ties), as the reference's ``argmin`` lookups."""
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(())
        return int(torch.argmin((self.timesteps - t).abs()))

    def sample(self, generator: torch.Generator, timestep_dtype: torch.dtype = torch.float32) -> TimestepSample:
        """Draw a timestep with ``generator`` (a CPU generator) inside the boundaries."""
        lo, hi = self.index_range
        index = int(torch.randint(lo, hi, (1,), generator=generator))
        t = self.timesteps[index].to(timestep_dtype).to(torch.float32)
        k = self.nearest_index(t)
        return TimestepSample(index=index, timestep=t, sigma=float(self.sigmas[k]), weight=float(self.weights[k]))

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """``x_t = (1 - sigma) * x0 + sigma * noise``."""
        return (1 - sigma) * x0 + sigma * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity target ``noise - x0``."""
        return noise - x0

    @staticmethod
    def loss(prediction: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
        """``mse(prediction.float(), target.float()) * weight``."""
        return torch.nn.functional.mse_loss(prediction.float(), target.float()) * weight


def expert_timestep_boundaries(
    boundary_ratio: float, expert: str, shift: float = 5.0, num_train_timesteps: int = 1000
) -> tuple[float, float]:
    """``(min, max)`` timestep boundaries that train one Wan2.2 expert: ``transformer`` (high noise) takes the grid
    points with ``t >= boundary_ratio * 1000``, ``transformer_2`` the rest -- the split the pipelines sample with.

    DiffSynth-Studio's scripts pass ``--max_timestep_boundary 0.417`` / ``--min_timestep_boundary 0.417`` for the
    T2V-A14B boundary 0.875 at shift 5; this computes the same fraction from the pipeline's ``boundary_ratio``
    (rounded to the grid, so ``int(fraction * num_train_timesteps)`` is the split index).

    Example:
        >>> expert_timestep_boundaries(0.875, "transformer")
        (0.0, 0.417)
        >>> expert_timestep_boundaries(0.875, "transformer_2")
        (0.417, 1.0)
    """
    if expert not in ("transformer", "transformer_2"):
        raise ValueError(f"expert must be 'transformer' (high noise) or 'transformer_2' (low noise), got {expert!r}")
    if not 0.0 < boundary_ratio < 1.0:
        raise ValueError(f"boundary_ratio must be in (0, 1), got {boundary_ratio}")
    grid = FlowMatchTrainingSchedule(shift, num_train_timesteps).timesteps
    high = int((grid >= boundary_ratio * num_train_timesteps).sum())  # indices [0, high) are high-noise
    split = high / num_train_timesteps
    while int(split * num_train_timesteps) < high:  # float representation: make int() land on ``high``
        split = math.nextafter(split, 2.0)
    return (0.0, split) if expert == "transformer" else (split, 1.0)
