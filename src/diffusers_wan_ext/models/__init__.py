from .attention_processor import WanTextLenAttnProcessor
from .transformer_wan_ext import WanExtTransformer3DModel

__all__ = ["WanExtTransformer3DModel", "WanTextLenAttnProcessor"]
