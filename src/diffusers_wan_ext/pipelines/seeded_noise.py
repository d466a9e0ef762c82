"""Initial noise drawn as DiffSynth-Studio draws it: every noise tensor from the same seeded state.

DiffSynth-Studio's ``BasePipeline.generate_noise`` makes a new ``torch.Generator(rand_device).manual_seed(seed)`` for
each noise tensor it draws (``torch.randn`` in float32 on ``rand_device``, the CPU by default, then cast to the
pipeline's dtype and moved to its device).  So two tensors of one call (MOVA: the video noise, then the audio noise)
and the noise of separate calls with one seed (Wan-Dancer: the global stage and every local segment, each a
``pipe(seed=...)`` call in its examples) all start from the same random state.

The pipelines here take a ``torch.Generator`` instead of a seed: :func:`seeded_noise` draws from a *copy* of a
generator snapshot, so every draw starts where the snapshot was.  With ``generator=torch.Generator("cpu")
.manual_seed(seed)`` the noise equals DiffSynth's for ``seed`` (and ``rand_device="cpu"``), value for value.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["copy_generator", "seeded_noise"]

GeneratorLike = torch.Generator | list[torch.Generator] | None


def copy_generator(generator: GeneratorLike) -> GeneratorLike:
    """A new generator (or list of them) on the same device with the same state; ``None`` for ``None``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> torch.equal(torch.randn(3, generator=copy_generator(g)), torch.randn(3, generator=g))
        True
    """
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        return [copy_generator(g) for g in generator]
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (or a list of them), got {type(generator).__name__}")
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def seeded_noise(shape: tuple[int, ...], start: GeneratorLike, device: torch.device | str) -> torch.Tensor:
    """Float32 standard normal noise of ``shape`` on ``device``, drawn from a copy of ``start`` (``start`` itself does
    not advance: every call with the same ``start`` begins at the same state).  A CPU generator draws on the CPU and
    the noise is moved to ``device`` (DiffSynth's ``rand_device="cpu"``); ``start=None`` draws fresh random noise."""
    return randn_tensor(tuple(shape), generator=copy_generator(start), device=torch.device(device),
                        dtype=torch.float32)
