"""diffusers_wan_ext: the Wan video-generation family, first-class in Hugging Face Diffusers.

Importing the package registers its classes with Diffusers, so ``DiffusionPipeline.from_pretrained`` and
``AutoModel.from_pretrained`` resolve them (see :mod:`diffusers_wan_ext.registration`).

Example:
    >>> import diffusers_wan_ext  # doctest: +SKIP
    >>> from diffusers import DiffusionPipeline  # doctest: +SKIP
    >>> pipe = DiffusionPipeline.from_pretrained("converted/Wan2.1-T2V-1.3B")  # doctest: +SKIP
"""

from .utils.import_noise import silence_quantizer_import_noise

# before Diffusers imports bitsandbytes / torchao (when installed): none of their import-time log lines on stderr
silence_quantizer_import_noise()

from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin  # noqa: E402, F401  (loadable bases for Diffusers)

from .utils.clip_processor import bind_clip_image_processor

# before Diffusers' Wan I2V / Animate modules import CLIPImageProcessor: no torchvision warning on stderr
bind_clip_image_processor()

from .models import (  # noqa: E402
    AutoencoderDac,
    LongCatKVCache,
    LongCatVideoTransformer3DModel,
    MovaAudioTransformer1DModel,
    MovaDualTowerBridge,
    WanAnimate2ExtTransformer3DModel,
    WanAnimateExtTransformer3DModel,
    WanDancerTransformer3DModel,
    WanExtTransformer3DModel,
    WanFunTransformer3DModel,
    WanFusedQKRopeAttnProcessor,
    WanMotionControllerModel,
    WanS2VTransformer3DModel,
    WanTextLenAttnProcessor,
    WanVideoAsPromptTransformer3DModel,
)
from .pipelines import (  # noqa: E402
    LongCatVideoPipeline,
    MovaPipeline,
    WanAnimate2Pipeline,
    WanAnimateExtPipeline,
    WanDancerPipeline,
    WanExtPipeline,
    WanFunCameraControlPipeline,
    WanFunControlPipeline,
    WanFunInpaintPipeline,
    WanImageToVideoReferencePipeline,
    WanSpeedControlPipeline,
    WanSpeechToVideoPipeline,
    WanStreamingPipeline,
    WanVideoAsPromptPipeline,
    WanVideoToVideoReferencePipeline,
)
from .families import hook_metadata, registered_classes  # noqa: E402
from .schedulers import WanFlowMatchScheduler, WanFlowUniPCScheduler  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AutoencoderDac",
    "LongCatKVCache",
    "LongCatVideoPipeline",
    "LongCatVideoTransformer3DModel",
    "MovaPipeline",
    "MovaAudioTransformer1DModel",
    "MovaDualTowerBridge",
    "WanAnimateExtPipeline",
    "WanAnimate2ExtTransformer3DModel",
    "WanAnimate2Pipeline",
    "WanAnimateExtTransformer3DModel",
    "WanDancerPipeline",
    "WanDancerTransformer3DModel",
    "WanExtPipeline",
    "WanExtTransformer3DModel",
    "WanFlowMatchScheduler",
    "WanFlowUniPCScheduler",
    "WanFunCameraControlPipeline",
    "WanFunControlPipeline",
    "WanFunInpaintPipeline",
    "WanFunTransformer3DModel",
    "WanFusedQKRopeAttnProcessor",
    "WanImageToVideoReferencePipeline",
    "WanMotionControllerModel",
    "WanS2VTransformer3DModel",
    "WanSpeedControlPipeline",
    "WanSpeechToVideoPipeline",
    "WanStreamingPipeline",
    "WanTextLenAttnProcessor",
    "WanVideoAsPromptPipeline",
    "WanVideoAsPromptTransformer3DModel",
    "WanVideoToVideoReferencePipeline",
]

from .registration import register  # noqa: E402

# every public class, and every class a family declares (the registry), is registered with Diffusers
register({**{name: globals()[name] for name in __all__}, **{cls.__name__: cls for cls in registered_classes()}},
         hook_metadata())
