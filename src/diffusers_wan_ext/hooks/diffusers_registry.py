"""Tell Diffusers' hook registries about the block and processor classes Wan models use.

Diffusers' cache, layer-skip and offload hooks look blocks and attention processors up in
``TransformerBlockRegistry`` / ``AttentionProcessorRegistry``; stock registers only its own classes.  The families
declare theirs (``ModelFamily.hook_blocks`` / ``hook_block_metadata`` / ``hook_processors``, e.g. the S2V, LongCat,
Video-As-Prompt and Animate blocks, stock VACE's block, stock ``WanAttnProcessor`` -- stock registers only the
deprecated ``WanAttnProcessor2_0`` alias) and :mod:`diffusers_wan_ext.registration` passes them here.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from diffusers.hooks._helpers import (
    AttentionProcessorMetadata,
    AttentionProcessorRegistry,
    TransformerBlockMetadata,
    TransformerBlockRegistry,
)

__all__ = ["register_hook_metadata", "skip_attention_output"]


def register_hook_metadata(
    blocks: Iterable[type] = (),
    block_metadata: Mapping[type, Mapping[str, Any]] | None = None,
    processors: Iterable[type] = (),
) -> None:
    """Register block and processor classes with Diffusers' hook registries (idempotent).

    Args:
        blocks: blocks that behave like stock ``WanTransformerBlock`` for the hooks: ``hidden_states`` first, the
            hidden states returned alone (``return_hidden_states_index=0``).
        block_metadata: other blocks, with their ``TransformerBlockMetadata`` arguments (e.g. stock VACE's block
            returns ``(hint, control_hidden_states)`` and carries its stream in ``control_hidden_states``).
        processors: attention processors whose layer skip returns the input ``hidden_states``.
    """
    TransformerBlockRegistry._register()
    metadata = {block: dict(return_hidden_states_index=0, return_encoder_hidden_states_index=None) for block in blocks}
    metadata.update({block: dict(kwargs) for block, kwargs in (block_metadata or {}).items()})
    for block, kwargs in metadata.items():
        if block not in TransformerBlockRegistry._registry:
            TransformerBlockRegistry.register(block, TransformerBlockMetadata(**kwargs))
    AttentionProcessorRegistry._register()
    for processor in processors:
        if processor not in AttentionProcessorRegistry._registry:
            AttentionProcessorRegistry.register(
                processor, AttentionProcessorMetadata(skip_processor_output_fn=skip_attention_output)
            )


def skip_attention_output(attn, hidden_states, *args, **kwargs):
    """Layer skip of a Wan attention: the processor's output is its input ``hidden_states``."""
    return hidden_states
