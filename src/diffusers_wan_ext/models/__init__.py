from .autoencoder_dac import AutoencoderDac
from .attention_processor import WanFusedQKRopeAttnProcessor, WanTextLenAttnProcessor
from .camera_adapter import WanCameraControlAdapter
from .motion_controller import MotionControlHook, WanMotionControllerModel, apply_motion_control
from .mova_bridge import MovaDualTowerBridge
from .transformer_mova_audio import MovaAudioTransformer1DModel
from .transformer_longcat import LongCatKVCache, LongCatVideoTransformer3DModel
from .transformer_wan_animate2 import WanAnimate2ExtTransformer3DModel
from .transformer_wan_animate_ext import WanAnimateExtTransformer3DModel
from .transformer_wan_dancer import WanDancerTransformer3DModel
from .transformer_wan_ext import WanExtTransformer3DModel
from .transformer_wan_fun import WanFunTransformer3DModel
from .transformer_wan_s2v import WanS2VTransformer3DModel
from .transformer_wan_vap import WanVideoAsPromptTransformer3DModel

__all__ = [
    "AutoencoderDac",
    "LongCatKVCache",
    "LongCatVideoTransformer3DModel",
    "MotionControlHook",
    "MovaAudioTransformer1DModel",
    "MovaDualTowerBridge",
    "WanAnimate2ExtTransformer3DModel",
    "WanAnimateExtTransformer3DModel",
    "WanCameraControlAdapter",
    "WanDancerTransformer3DModel",
    "WanExtTransformer3DModel",
    "WanFunTransformer3DModel",
    "WanFusedQKRopeAttnProcessor",
    "WanMotionControllerModel",
    "WanS2VTransformer3DModel",
    "WanTextLenAttnProcessor",
    "WanVideoAsPromptTransformer3DModel",
    "apply_motion_control",
]
