"""``WanFlowUniPCScheduler``: stock UniPC with the ORIGINAL Wan code's flow schedule.

The original Wan2.1 / Wan2.2 code samples with ``FlowUniPCMultistepScheduler`` (``wan/utils/fm_solvers_unipc.py``, a
flow-matching port of Diffusers' UniPC), built as ``FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1,
use_dynamic_shifting=False)`` and then ``set_timesteps(N, shift=sample_shift)``.  Its schedule is

* ``sigma_max = float32(1 - 1/1000) = 0.999`` (from its training sigmas ``1 - linspace(1, 1/1000, 1000)[::-1]``),
  ``sigma_min = 0``;
* ``sigmas = linspace(sigma_max, sigma_min, N + 1)[:-1]`` in float64, shifted
  ``shift * s / (1 + (shift - 1) * s)``, with a final sigma of 0 (stored as float32);
* ``timesteps = int64(sigmas * 1000)`` -- truncated, and the model receives these integer timesteps.

Stock ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`` runs the same UniPC multistep update
(``bh2``, order 2, ``predict_x0``, ``lower_order_final``) but starts from ``linspace(1, 1/1000, N + 1)[:-1]``
(``scheduling_unipc_multistep.py``, the ``use_flow_sigmas`` branch of ``set_timesteps``): every pre-shift sigma is
``0.001 * (1 - i/N)`` higher (the first one, 1.0, becomes ``1 - 1e-6`` there) instead of starting at 0.999.  After
the shift that moves sigmas by up to ~1e-2 and changes about half of the int64 timesteps (N = 4, shift 5: stock
sigmas ``1.0, 0.9376, 0.8336, 0.6259``, timesteps ``[999, 937, 833, 625]``; original ``0.9998, 0.9373, 0.8331,
0.6247``, ``[999, 937, 833, 624]``; N = 50, shift 5: 27 of 50 timesteps differ, sigmas by up to 4.3e-3).

:class:`WanFlowUniPCScheduler` subclasses stock UniPC and overrides only ``set_timesteps`` (the sigma / timestep
computation); solver, state handling and ``add_noise`` are stock.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..utils.shims import ShimSaveMixin

__all__ = ["WanFlowUniPCScheduler"]


class WanFlowUniPCScheduler(ShimSaveMixin, UniPCMultistepScheduler):
    r"""
    UniPC multistep solver with the original Wan code's flow-matching schedule (``FlowUniPCMultistepScheduler``).

    The arguments are those of :class:`diffusers.UniPCMultistepScheduler`; only the defaults differ so that the class
    is the original Wan sampler out of the box: ``prediction_type="flow_prediction"``, ``use_flow_sigmas=True``,
    ``flow_shift=5.0`` (the Wan CLI default; 3.0 for Wan2.1 I2V at 480p, 12.0 for Wan2.2 T2V-A14B, 16.0 for FLF2V /
    VACE).  ``flow_shift`` is the original ``set_timesteps(..., shift=sample_shift)``; the original's constructor
    ``shift`` (always 1 in the Wan code) has no counterpart -- a constructor shift other than 1 would make the
    original shift ``sigma_max`` twice.  Karras / exponential / beta sigmas are not part of the original schedule and
    are rejected.

    Example:
        >>> from diffusers_wan_ext.schedulers import WanFlowUniPCScheduler
        >>> scheduler = WanFlowUniPCScheduler(flow_shift=5.0)
        >>> scheduler.set_timesteps(4)
        >>> scheduler.timesteps
        tensor([999, 937, 833, 624])

        In a stock pipeline (``dir`` is a Diffusers-format Wan folder; its UniPC config carries over):

        >>> from diffusers import WanPipeline  # doctest: +SKIP
        >>> pipe = WanPipeline.from_pretrained(dir)  # doctest: +SKIP
        >>> pipe.scheduler = WanFlowUniPCScheduler.from_config(pipe.scheduler.config)  # doctest: +SKIP
    """

    _compatibles = ["UniPCMultistepScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: Literal["epsilon", "sample", "v_prediction", "flow_prediction"] = "flow_prediction",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: Literal["bh1", "bh2"] = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],
        solver_p: SchedulerMixin | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = True,
        flow_shift: float = 5.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential"] = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ) -> None:
        if not use_flow_sigmas or prediction_type != "flow_prediction":
            raise ValueError(
                "WanFlowUniPCScheduler is the flow-matching Wan sampler: it needs use_flow_sigmas=True and "
                f"prediction_type='flow_prediction' (got {use_flow_sigmas!r}, {prediction_type!r})"
            )
        if use_karras_sigmas or use_exponential_sigmas or use_beta_sigmas:
            raise ValueError("Karras / exponential / beta sigmas are not part of the original Wan schedule")
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            solver_order=solver_order,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            sample_max_value=sample_max_value,
            predict_x0=predict_x0,
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            disable_corrector=disable_corrector,
            solver_p=solver_p,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            use_flow_sigmas=use_flow_sigmas,
            flow_shift=flow_shift,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            final_sigmas_type=final_sigmas_type,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            use_dynamic_shifting=use_dynamic_shifting,
            time_shift_type=time_shift_type,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            shift_terminal=shift_terminal,
        )

    @property
    def original_sigma_max(self) -> float:
        """The original's ``sigma_max``: ``1 - 1/num_train_timesteps`` rounded to float32 (0.999 -> 0.99900001)."""
        return float(np.float32(1.0 - 1.0 / self.config.num_train_timesteps))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | np.ndarray | None = None,
        mu: float | None = None,
        shift: float | None = None,
    ) -> None:
        """Set the original Wan schedule (call before the denoising loop).

        Args:
            num_inference_steps (`int`, *optional*):
                Number of steps ``N`` (required unless ``sigmas`` is given).
            device (`str` or `torch.device`, *optional*):
                Device of ``timesteps`` (int64).
            sigmas (`list[float]`, *optional*):
                Custom sigmas before the shift, as the original's ``set_timesteps(sigmas=...)`` takes them.  Default:
                ``linspace(0.999, 0, N + 1)[:-1]``.
            mu (`float`, *optional*):
                Shift parameter when the config has ``use_dynamic_shifting=True`` (exponential time shift).
            shift (`float`, *optional*):
                Overrides ``config.flow_shift`` for this schedule (the original's ``set_timesteps(..., shift=)``).
        """
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError("`num_inference_steps` is required when `sigmas` is not given")
            # the original: np.linspace(self.sigma_max, self.sigma_min, N + 1)[:-1] with sigma_min = 0 (float64)
            sigmas = np.linspace(self.original_sigma_max, 0.0, num_inference_steps + 1)[:-1].copy()
        else:
            sigmas = np.asarray(sigmas, dtype=np.float64).copy()
        if self.config.use_dynamic_shifting:
            sigmas = self.time_shift(mu, 1.0, sigmas)
        else:
            s = self.config.flow_shift if shift is None else shift
            sigmas = s * sigmas / (1 + (s - 1) * sigmas)
        if self.config.shift_terminal:
            sigmas = self.stretch_shift_to_terminal(sigmas)
        # Not in the original (which would produce log(0) there); only reachable with custom sigmas starting at 1.
        if np.fabs(sigmas[0] - 1) < 1e-6:
            sigmas[0] -= 1e-6
        timesteps = sigmas * self.config.num_train_timesteps
        if self.config.final_sigmas_type == "zero":
            sigma_last = 0.0
        elif self.config.final_sigmas_type == "sigma_min":
            sigma_last = sigmas[-1]  # stock's flow rule (the original's branch reads a missing attribute)
        else:
            raise ValueError(f"`final_sigmas_type` must be 'zero' or 'sigma_min', got {self.config.final_sigmas_type}")

        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)  # truncation, as original
        self.num_inference_steps = len(timesteps)
        # solver state, reset as stock UniPC's set_timesteps does
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self.last_sample = None
        if self.solver_p:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)
        self._step_index = None
        self._begin_index = None
        self.sigmas = self.sigmas.to("cpu")
