"""diffusers_wan_ext: the Wan video-generation family, first-class in Hugging Face Diffusers.

Importing the package registers its classes with Diffusers, so ``DiffusionPipeline.from_pretrained`` and
``AutoModel.from_pretrained`` resolve them (see :mod:`diffusers_wan_ext._registration`).

Example:
    >>> import diffusers_wan_ext  # doctest: +SKIP
    >>> from diffusers import DiffusionPipeline  # doctest: +SKIP
    >>> pipe = DiffusionPipeline.from_pretrained("converted/Wan2.1-T2V-1.3B")  # doctest: +SKIP
"""

from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin  # loadable bases, looked up by Diffusers

from .models import WanExtTransformer3DModel, WanTextLenAttnProcessor

__version__ = "0.1.0"

__all__ = [
    "WanExtTransformer3DModel",
    "WanTextLenAttnProcessor",
]

try:  # schedulers / pipelines are being added; keep the import tolerant while they land
    from .schedulers import *  # noqa: F401,F403
    from .schedulers import __all__ as _sched_all

    __all__ += list(_sched_all)
except ImportError as _e:  # pragma: no cover
    if getattr(_e, "name", None) not in (f"{__name__}.schedulers", None) or "schedulers" not in str(_e):
        raise
try:
    from .pipelines import *  # noqa: F401,F403
    from .pipelines import __all__ as _pipe_all

    __all__ += list(_pipe_all)
except ImportError as _e:  # pragma: no cover
    if getattr(_e, "name", None) not in (f"{__name__}.pipelines", None) or "pipelines" not in str(_e):
        raise

from ._registration import register as _register  # noqa: E402

_register()
