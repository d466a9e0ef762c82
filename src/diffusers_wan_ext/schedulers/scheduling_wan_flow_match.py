"""``WanFlowMatchScheduler``: DiffSynth-Studio's flow-matching Euler schedule for Wan (template ``"Wan"``).

DiffSynth-Studio (``diffsynth.diffusion.flow_match.FlowMatchScheduler("Wan")``) samples every Wan model with

* ``sigmas = linspace(denoising_strength, 0, N + 1)[:N]`` (float32), then the shift
  ``sigma <- shift * sigma / (1 + (shift - 1) * sigma)`` and ``timesteps = 1000 * sigma`` (float timesteps);
* the Euler step ``x_next = x + v * (sigma_next - sigma)`` with a final ``sigma_N = 0``;
* noising ``x_sigma = (1 - sigma) * x0 + sigma * noise`` (video-to-video starts at ``sigma_0 = shift(strength)``).

Where stock Diffusers differs:

* ``FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(N)`` takes ``N`` points ``linspace(1, sigma_min, N)``
  where ``sigma_min = shift(1/1000)`` is already shifted (the last sigma of its training schedule), shifts them
  and appends 0.  It never uses ``linspace(1, 0, N + 1)[:N]``, so every sigma after the first differs
  (N = 4, shift 5: stock 1.0, 0.9097, 0.7173, 0.0244 vs Wan 1.0, 0.9375, 0.8333, 0.625).  Passing
  ``sigmas=linspace(1, 0, N + 1)[:N]`` to stock ``set_timesteps`` gives the Wan schedule up to float rounding
  (numpy vs torch float32), but the stock pipelines call ``set_timesteps(N)``.
  Stock also casts the stepped latents to the model output's dtype (bf16 latents after the first step of a bf16
  transformer); this scheduler keeps the latents' dtype and steps in float32.
* ``UniPCMultistepScheduler(use_flow_sigmas=True)`` is a different (multistep) solver; for the original Wan
  code's UniPC schedule see :class:`~diffusers_wan_ext.schedulers.WanFlowUniPCScheduler`.

``denoising_strength`` (set_timesteps argument) is DiffSynth's video-to-video strength: all ``N`` steps run on the
shorter schedule ``linspace(strength, 0, N + 1)[:N]``.  Stock ``WanVideoToVideoPipeline``'s ``strength`` instead keeps
the full schedule and drops its first steps; use
:class:`~diffusers_wan_ext.pipelines.WanVideoToVideoReferencePipeline` (``denoising_strength=``) for DiffSynth's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..utils.shims import ShimSaveMixin

__all__ = ["WanFlowMatchScheduler", "WanFlowMatchSchedulerOutput"]


@dataclass
class WanFlowMatchSchedulerOutput(BaseOutput):
    """Output of :meth:`WanFlowMatchScheduler.step`.

    Args:
        prev_sample (`torch.Tensor`): the sample at the next (lower) noise level, in the input sample's dtype.
    """

    prev_sample: torch.Tensor


class WanFlowMatchScheduler(ShimSaveMixin, SchedulerMixin, ConfigMixin):
    r"""
    Flow-matching Euler scheduler with DiffSynth-Studio's Wan schedule; a drop-in scheduler for the stock Diffusers Wan
    pipelines (``WanPipeline``, ``WanImageToVideoPipeline``, ``WanVideoToVideoPipeline``, ``WanVACEPipeline``).

    Schedule for ``N`` steps and ``denoising_strength`` ``s`` (float32, as DiffSynth computes it):
    ``sigma_i = shift * u_i / (1 + (shift - 1) * u_i)`` with ``u = linspace(s, 0, N + 1)[:N]``,
    ``timesteps = num_train_timesteps * sigma`` and ``sigmas`` (``N + 1`` entries) ending with ``0``.  ``step`` is the
    Euler update ``x + v * (sigma_{i+1} - sigma_i)``; ``add_noise`` / ``scale_noise`` give
    ``(1 - sigma) * x0 + sigma * noise``.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            Timestep scale: ``timestep = num_train_timesteps * sigma``.
        shift (`float`, defaults to 5.0):
            Flow shift (Wan's ``sample_shift`` / DiffSynth's ``sigma_shift``): 5.0 for most Wan tasks, 3.0 for
            Wan2.1 I2V at 480p, 12.0 for Wan2.2 T2V-A14B, 16.0 for FLF2V / VACE.

    Example:
        >>> import torch
        >>> from diffusers_wan_ext.schedulers import WanFlowMatchScheduler
        >>> scheduler = WanFlowMatchScheduler(shift=5.0)
        >>> scheduler.set_timesteps(4)
        >>> scheduler.timesteps
        tensor([1000.0000,  937.5000,  833.3333,  625.0000])
        >>> scheduler.set_timesteps(4, denoising_strength=0.6)  # DiffSynth video-to-video: all 4 steps, from 0.88
        >>> [round(float(s), 4) for s in scheduler.sigmas]
        [0.8824, 0.8036, 0.6818, 0.4688, 0.0]

        Drop it into a stock pipeline (``dir`` is a Diffusers-format Wan folder):

        >>> from diffusers import WanPipeline  # doctest: +SKIP
        >>> pipe = WanPipeline.from_pretrained(dir, scheduler=WanFlowMatchScheduler(shift=5.0))  # doctest: +SKIP
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 5.0) -> None:
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        # Until set_timesteps is called: the training schedule (DiffSynth's set_timesteps(1000, training=True)),
        # so that add_noise works for any timestep of it.
        self.sigmas, self.timesteps = self._schedule(num_train_timesteps, 1.0)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ------------------------------------------------------------------------------------------------ schedule
    def _schedule(self, num_inference_steps: int, denoising_strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """DiffSynth's ``set_timesteps_wan``, float32 on CPU: ``(sigmas [N + 1] ending in 0, timesteps [N])``."""
        shift = self.config.shift
        sigmas = torch.linspace(float(denoising_strength), 0.0, num_inference_steps + 1, dtype=torch.float32)[:-1]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        timesteps = sigmas * self.config.num_train_timesteps
        return torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | torch.Tensor | None = None,
        mu: float | None = None,
        timesteps: list[float] | torch.Tensor | None = None,
        denoising_strength: float = 1.0,
    ) -> None:
        """Set the sampling schedule (call before the denoising loop).

        Args:
            num_inference_steps (`int`, *optional*):
                Number of Euler steps ``N`` (required unless ``sigmas`` or ``timesteps`` is given).
            device (`str` or `torch.device`, *optional*):
                Device of ``timesteps``.  ``sigmas`` stay on the CPU (read as Python floats by the pipelines).
            sigmas (`list[float]`, *optional*):
                Custom sigmas *before* the shift (decreasing, in ``(0, 1]``), shifted like the default schedule --
                the convention of ``FlowMatchEulerDiscreteScheduler``.  The default is
                ``linspace(denoising_strength, 0, N + 1)[:N]``.
            mu (`float`, *optional*):
                Resolution-dependent shifting is not part of the Wan schedule; must be ``None``.
            timesteps (`list[float]`, *optional*):
                Custom final timesteps (already shifted), used as given; ``sigmas = timesteps / num_train_timesteps``.
            denoising_strength (`float`, defaults to 1.0):
                DiffSynth's ``denoising_strength`` for video-to-video: the schedule starts at ``shift(strength)``
                and still has ``N`` steps.  ``1.0`` is text-to-video.
        """
        if mu is not None:
            raise ValueError("WanFlowMatchScheduler uses a fixed `shift`; dynamic shifting (`mu`) is not supported")
        if sigmas is not None and timesteps is not None:
            raise ValueError("pass either custom `sigmas` (shifted by the scheduler) or `timesteps` (used as given)")
        custom = sigmas if sigmas is not None else timesteps
        if custom is not None:
            if denoising_strength != 1.0:
                raise ValueError("`denoising_strength` only applies to the default schedule, not to custom ones")
            values = torch.as_tensor(custom, dtype=torch.float32).detach().cpu().flatten()
            if num_inference_steps is not None and num_inference_steps != len(values):
                raise ValueError(f"num_inference_steps={num_inference_steps} but {len(values)} custom values given")
            if sigmas is not None:
                shift = self.config.shift
                values = shift * values / (1 + (shift - 1) * values)
                new_timesteps = values * self.config.num_train_timesteps
            else:
                new_timesteps = values
                values = values / self.config.num_train_timesteps
            new_sigmas = torch.cat([values, values.new_zeros(1)])
        else:
            if num_inference_steps is None:
                raise ValueError("`num_inference_steps` is required when neither `sigmas` nor `timesteps` is given")
            if not 0.0 <= float(denoising_strength) <= 1.0:
                raise ValueError(f"`denoising_strength` must be in [0, 1], got {denoising_strength}")
            new_sigmas, new_timesteps = self._schedule(int(num_inference_steps), denoising_strength)
        self.sigmas = new_sigmas
        self.timesteps = new_timesteps.to(device=device)
        self.num_inference_steps = len(new_timesteps)
        self._step_index = None
        self._begin_index = None

    # --------------------------------------------------------------------------------------------- step index
    @property
    def step_index(self) -> int | None:
        """Index of the current timestep; advanced by one after every :meth:`step`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first timestep, set by pipelines through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the step counter at ``begin_index`` (pipelines call this to avoid a timestep look-up)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Index of the schedule timestep nearest to ``timestep`` (DiffSynth's ``argmin |timesteps - t|``)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        t = torch.as_tensor(timestep).to(schedule_timesteps.device, torch.float64)
        return int(torch.argmin((schedule_timesteps.to(torch.float64) - t).abs()).item())

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        self._step_index = self.index_for_timestep(timestep) if self.begin_index is None else self._begin_index

    # --------------------------------------------------------------------------------------------------- step
    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Flow matching does not scale the model input; returns ``sample``."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> WanFlowMatchSchedulerOutput | tuple[torch.Tensor]:
        """One Euler step ``sample + model_output * (sigma_next - sigma)`` (deterministic; ``generator`` unused).

        The update runs in float32 and the result keeps ``sample``'s dtype (the original Wan code keeps float32
        latents; stock ``FlowMatchEulerDiscreteScheduler`` would return ``model_output``'s dtype).
        """
        if self.num_inference_steps is None:
            raise ValueError("call `set_timesteps` before `step`")
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= len(self.timesteps):
            raise IndexError(f"step {i} is past the end of the {len(self.timesteps)}-step schedule")
        dt = self.sigmas[i + 1] - self.sigmas[i]
        prev_sample = sample.to(torch.float32) + model_output.to(torch.float32) * dt.to(sample.device)
        prev_sample = prev_sample.to(sample.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return WanFlowMatchSchedulerOutput(prev_sample=prev_sample)

    # ------------------------------------------------------------------------------------------------ noising
    def _sigmas_for(self, timesteps: float | torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timesteps).flatten()
        if self.begin_index is None:
            indices = [self.index_for_timestep(x) for x in t]
        elif self.step_index is not None:  # called inside the loop (inpainting-style re-noising)
            indices = [self.step_index] * len(t)
        else:  # called before the first step (video-to-video start latents)
            indices = [self.begin_index] * len(t)
        sigma = self.sigmas[indices].to(device=sample.device, dtype=sample.dtype)
        return sigma.reshape(-1, *([1] * (sample.ndim - 1)))

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: float | torch.Tensor
    ) -> torch.Tensor:
        """``(1 - sigma) * original_samples + sigma * noise`` at the schedule sigma of each timestep (per batch row or
        one for all); argument order of ``DDPMScheduler.add_noise``, as ``WanVideoToVideoPipeline`` calls it."""
        sigma = self._sigmas_for(timesteps, original_samples)
        return (1 - sigma) * original_samples + sigma * noise

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The same as :meth:`add_noise` with ``FlowMatchEulerDiscreteScheduler.scale_noise``'s argument order."""
        return self.add_noise(sample, noise, timestep)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
