"""Tell Diffusers' hook registries about the block and processor classes Wan models use.

Diffusers' cache, layer-skip and offload hooks look blocks and attention processors up in
``TransformerBlockRegistry`` / ``AttentionProcessorRegistry``; stock registers only its own classes.
"""

from __future__ import annotations

from diffusers.hooks._helpers import (
    AttentionProcessorMetadata,
    AttentionProcessorRegistry,
    TransformerBlockMetadata,
    TransformerBlockRegistry,
)
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from diffusers.models.transformers.transformer_wan_animate import WanAttnProcessor as WanAnimateAttnProcessor
from diffusers.models.transformers.transformer_wan_animate import WanTransformerBlock as WanAnimateBlock
from diffusers.models.transformers.transformer_wan_vace import WanVACETransformerBlock

from ..models.attention_processor import WanTextLenAttnProcessor
from ..models.transformer_longcat import LongCatVideoAttnProcessor, LongCatVideoTransformerBlock
from ..models.transformer_wan_s2v import WanS2VTransformerBlock
from ..models.transformer_wan_vap import WanVideoAsPromptMoTBlock, WanVideoAsPromptReferenceBlock

__all__ = ["register_hook_metadata", "skip_attention_output"]


def register_hook_metadata() -> None:
    """Tell Diffusers' hook registries about the block and processor classes Wan models use, so cache, layer-skip
    and offload hooks find them in our transformers and in stock VACE:

    * ``WanVACETransformerBlock`` (stock has no entry): returns ``(hint, control_hidden_states)`` and carries its
      stream in ``control_hidden_states``;
    * ``WanAttnProcessor`` (stock registers only the deprecated ``WanAttnProcessor2_0`` alias, whose ``__new__``
      returns a ``WanAttnProcessor``) and our :class:`~diffusers_wan_ext.WanTextLenAttnProcessor`;
    * LongCat-Video's ``LongCatVideoTransformerBlock`` and ``LongCatVideoAttnProcessor``;
    * Wan-Animate's block: ``diffusers.models.transformers.transformer_wan_animate`` defines its own
      ``WanTransformerBlock`` class (stock registers only ``transformer_wan``'s), whose ``forward`` takes
      ``hidden_states`` first and returns the hidden states alone (the face adapter runs between blocks, in the
      model), and its own ``WanAttnProcessor``.

    Our Fun transformer reuses stock ``WanTransformerBlock`` (already registered), so it needs no entry; the S2V
    block (a ``WanTransformerBlock`` subclass with two modulation segments) and the Video-As-Prompt blocks (MoT
    layer and reference block: ``WanTransformerBlock`` subclasses that return the hidden states alone) get the
    stock block's metadata.
    """
    TransformerBlockRegistry._register()
    blocks = (LongCatVideoTransformerBlock, WanS2VTransformerBlock, WanAnimateBlock, WanVideoAsPromptMoTBlock,
              WanVideoAsPromptReferenceBlock)
    for block in blocks:
        if block in TransformerBlockRegistry._registry:
            continue
        TransformerBlockRegistry.register(
            block,
            TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
        )
    if WanVACETransformerBlock not in TransformerBlockRegistry._registry:
        TransformerBlockRegistry.register(
            WanVACETransformerBlock,
            TransformerBlockMetadata(
                return_hidden_states_index=1,
                return_encoder_hidden_states_index=None,
                hidden_states_argument_name="control_hidden_states",
            ),
        )
    AttentionProcessorRegistry._register()
    for processor in (WanAttnProcessor, WanAnimateAttnProcessor, WanTextLenAttnProcessor, LongCatVideoAttnProcessor):
        if processor not in AttentionProcessorRegistry._registry:
            AttentionProcessorRegistry.register(
                processor, AttentionProcessorMetadata(skip_processor_output_fn=skip_attention_output)
            )


def skip_attention_output(attn, hidden_states, *args, **kwargs):
    """Layer skip of a Wan attention: the processor's output is its input ``hidden_states``."""
    return hidden_states
