"""DiffSynth-Studio's direct distillation (``--task direct_distill``, its ``DirectDistillLoss``) for Wan.

The teacher is the dataset: each clip was sampled offline by the teacher (many steps, classifier-free guidance) from a
seeded noise, and the metadata names that noise and the student's step count in DiffSynth-Studio's columns
(``--extra_inputs seed,rand_device,num_inference_steps,cfg_scale``).  One training step then

* draws the row's noise exactly as the reference pipeline does: ``randn(latent shape, float32,
  generator=torch.Generator(rand_device).manual_seed(seed))``, cast to the compute dtype (without a ``seed`` column
  the run's per-step generator draws it, so a resumed run still repeats the losses);
* runs the student sampler with gradients through every step: the Wan grid of ``num_inference_steps`` points
  ``u = linspace(1, 0, N + 1)[:N]``, ``sigma = shift * u / (1 + (shift - 1) * u)`` (shift 5, ``--timestep_shift``),
  ``t = 1000 * sigma`` (the model sees ``t`` rounded to the compute dtype), Euler steps
  ``x <- x + v * (sigma_next - sigma)`` with ``sigma_next = 0`` after the last point, the positive prompt only
  (the reference's loss calls the model without guidance, whatever ``cfg_scale`` says);
* compares the sampled latents with the clip's latents: ``loss = mse(x.float(), x0.float())`` -- unweighted.

TI2V-5B with ``input_image``: the clean first latent frame replaces frame 0 of the noise and the model sees
timestep 0 there (as in the reference, the frame is not restored between steps and stays in the loss).
VACE with reference images: the noise is drawn at the full latent length (references included) in one piece; the
reference pipeline draws the same numbers but moves the last reference-length frames to the front, so with the same
seed those rows start from a permuted noise here (same distribution, another sample).

Example:
    >>> sigmas, timesteps = student_sampling_schedule(4)
    >>> [round(float(s), 4) for s in sigmas]
    [1.0, 0.9375, 0.8333, 0.625]
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .dataset import DatasetRowError, read_metadata
from .inputs import ModelInputs

__all__ = ["DISTILL_COLUMNS", "DistillRows", "DistillSettings", "direct_distill_loss", "student_sampling_schedule"]

#: DiffSynth-Studio's direct-distillation columns (passed with ``--extra_inputs``).
DISTILL_COLUMNS = ("seed", "rand_device", "num_inference_steps", "cfg_scale")


@dataclass(frozen=True)
class DistillSettings:
    """The student sampling of one clip (its metadata row).

    Attributes:
        num_inference_steps: the student's step count.
        seed: the seed of the clip's noise, or ``None`` (the run's per-step generator draws it).
        rand_device: the device of the noise generator (``cpu``: the same noise on any machine).
        cfg_scale: the teacher's guidance scale, recorded; the student samples without guidance.
    """

    num_inference_steps: int
    seed: int | None = None
    rand_device: str = "cpu"
    cfg_scale: float = 1.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "DistillSettings":
        return cls(**json.loads(text))


def _integer(value: Any, label: str, name: str, low: int) -> int:
    try:
        number = float(value)
        if not (math.isfinite(number) and number == int(number) and number >= low):
            raise ValueError
    except (TypeError, ValueError):
        raise DatasetRowError(f"{label}: column {name!r} must be an integer >= {low}, got {value!r}") from None
    return int(number)


def _settings(values: Mapping[str, Any], label: str, columns: Sequence[str]) -> DistillSettings:
    """The settings of one row; every listed column must be there and valid (errors name the row and column)."""
    missing = [c for c in columns if values.get(c) in (None, "")]
    if missing:
        raise DatasetRowError(f"{label}: no value in column(s) {missing} (--extra_inputs {','.join(columns)})")
    seed = _integer(values["seed"], label, "seed", 0) if "seed" in columns else None
    if seed is not None and seed >= 2**63:
        raise DatasetRowError(f"{label}: column 'seed' must be below 2**63, got {seed}")
    device = str(values["rand_device"]).strip() if "rand_device" in columns else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        raise DatasetRowError(f"{label}: column 'rand_device' {device!r} is not a device of this machine "
                              f"(cpu{', cuda' if torch.cuda.is_available() else ''})")
    cfg = 1.0
    if "cfg_scale" in columns:
        try:
            cfg = float(values["cfg_scale"])
        except (TypeError, ValueError):
            raise DatasetRowError(f"{label}: column 'cfg_scale' must be a number, got {values['cfg_scale']!r}") \
                from None
    steps = _integer(values["num_inference_steps"], label, "num_inference_steps", 1)
    return DistillSettings(num_inference_steps=steps, seed=seed, rand_device=device, cfg_scale=cfg)


class DistillRows:
    """The :class:`DistillSettings` of every row of a metadata file, read and checked before any model loads.

    Args:
        metadata_path: the ``--dataset_metadata_path`` file.
        columns: the distillation columns given in ``--extra_inputs`` (``num_inference_steps`` required).
        skip_bad_rows: leave rows with bad values out (the dataset skips them too) instead of failing.
    """

    def __init__(self, metadata_path: str | os.PathLike, columns: Sequence[str], skip_bad_rows: bool = False) -> None:
        if "num_inference_steps" not in columns:
            raise ValueError("--task direct_distill: the student's step count comes from the metadata; add "
                             "num_inference_steps to --extra_inputs (DiffSynth-Studio: seed,rand_device,"
                             "num_inference_steps,cfg_scale)")
        self.settings: dict[int, DistillSettings] = {}
        for row in read_metadata(metadata_path):
            try:
                self.settings[row.index] = _settings(row.values, row.label, columns)
            except DatasetRowError:
                if not skip_bad_rows:
                    raise

    def __getitem__(self, row: int) -> DistillSettings:
        if row not in self.settings:
            raise DatasetRowError(f"metadata row {row}: no direct-distillation settings (a bad row)")
        return self.settings[row]


def student_sampling_schedule(num_inference_steps: int, shift: float = 5.0,
                              num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas, timesteps)`` of the student's sampler: DiffSynth-Studio's ``FlowMatchScheduler("Wan")`` at
    ``num_inference_steps`` steps and denoising strength 1 (float32, descending, without the final 0)."""
    u = torch.linspace(1.0, 0.0, int(num_inference_steps) + 1)[:-1]
    sigmas = shift * u / (1 + (shift - 1) * u)
    return sigmas, sigmas * num_train_timesteps


def distill_noise(shape: Sequence[int], settings: DistillSettings, generator: torch.Generator) -> torch.Tensor:
    """The clip's starting noise (float32, on ``settings.rand_device``): seeded by the row, else by ``generator``."""
    if settings.seed is None:
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    seeded = torch.Generator(settings.rand_device).manual_seed(settings.seed)
    return torch.randn(tuple(shape), generator=seeded, device=settings.rand_device, dtype=torch.float32)


def _first_frame_timesteps(t: torch.Tensor, latents: torch.Tensor, patch_size) -> torch.Tensor:
    """TI2V: timestep 0 for the tokens of latent frame 0, ``t`` for the others (``[1, tokens]``)."""
    _, _, frames, h, w = latents.shape
    mask = torch.ones(frames, h // patch_size[1], w // patch_size[2], device=latents.device)
    mask[0] = 0
    return (mask * t).flatten().unsqueeze(0)


def direct_distill_loss(
    module: nn.Module,
    inputs: ModelInputs,
    settings: DistillSettings,
    generator: torch.Generator,
    dtype: torch.dtype,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    shift: float = 5.0,
) -> torch.Tensor:
    """DiffSynth-Studio's ``DirectDistillLoss`` for batch-1 ``inputs`` (see the module docstring): the student
    samples ``settings.num_inference_steps`` Euler steps from the row's noise with gradients through all of them,
    and the loss is the mean squared error between the result and the clip's latents ``inputs.latents``."""
    if inputs.joint_latents:
        raise ValueError(f"direct distillation of a model that denoises {sorted(inputs.joint_latents)} latents with "
                         f"the video is not supported; train it with --task sft")
    device = inputs.latents.device
    sigmas, timesteps = student_sampling_schedule(settings.num_inference_steps, shift)
    latents = distill_noise(inputs.latents.shape, settings, generator).to(device=device, dtype=dtype)
    if inputs.first_frame_latents is not None:
        latents[:, :, :1] = inputs.first_frame_latents.to(dtype)
    kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.transformer_kwargs.items()}
    context = inputs.prompt_embeds.to(dtype)
    image = None if inputs.image_embeds is None else inputs.image_embeds.to(dtype)
    y = None if inputs.y is None else inputs.y.to(dtype)
    for i in range(len(timesteps)):
        t = timesteps[i].to(dtype).to(torch.float32).to(device)
        timestep = _first_frame_timesteps(t, latents, patch_size) if inputs.first_frame_latents is not None \
            else t.reshape(1)
        model_input = latents if y is None else torch.cat([latents, y], dim=1)
        velocity = module(model_input, timestep, context, image, component_inputs=inputs.component_inputs or None,
                          **kwargs)
        sigma_next = float(sigmas[i + 1]) if i + 1 < len(sigmas) else 0.0
        latents = latents + velocity.to(dtype) * (sigma_next - float(sigmas[i]))
    return torch.nn.functional.mse_loss(latents.float(), inputs.latents.float())
