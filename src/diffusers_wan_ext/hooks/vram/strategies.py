"""The placements the VRAM planner chooses from, the roles and phases of a Wan pipeline, and the Diffusers hooks
the placements install.

Strategies (:data:`STRATEGIES`):

* ``resident`` -- moved to the device and kept there;
* ``resident_fp8`` -- resident, weights stored in ``float8_e4m3fn`` and up-cast one layer at a time (transformers
  only; changes the output slightly);
* ``group_offload`` -- weights in CPU RAM, streamed block by block (``offload_type="block_level"`` on the module
  that holds the block list, e.g. ``transformer.blocks``, ``text_encoder.encoder.block``); with CUDA streams the
  next block is prefetched while the current one runs, so two blocks are in flight;
* ``group_offload_fp8`` -- both of the above (the stream carries fp8 weights);
* ``leaf_offload`` -- ``offload_type="leaf_level"``, for modules without a block list (the VAE);
* ``disk_offload`` -- group (or leaf) offloading with ``offload_to_disk_path``: weights in safetensors files, read
  back when needed, for when CPU RAM is the limit (``cpu_ram_limit``); only offered when a path is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BLOCK_LISTS",
    "CASTING_HOOKS",
    "COMPONENT_ROLES",
    "EXPERTS",
    "FP8_DTYPE",
    "FP8_ROLES",
    "GIB",
    "GROUP_OFFLOAD_HOOKS",
    "PHASES",
    "ROLE_PRIORITY",
    "ROLE_STRATEGIES",
    "STRATEGIES",
    "VRAM_PRESETS",
    "Strategy",
]

GIB = float(1 << 30)

#: Budgets (GiB) planned for on common cards, leaving headroom for the CUDA context, cuDNN / cuBLAS workspaces and
#: allocator fragmentation (allocated < reserved < card).
VRAM_PRESETS: dict[str, float] = {"8gb": 7.5, "24gb": 22.5, "80gb": 76.0}

FP8_DTYPE = torch.float8_e4m3fn


@dataclass(frozen=True)
class Strategy:
    """How one component is placed.

    Args:
        name: key in :data:`STRATEGIES`.
        offload: ``None`` (kept on the device), ``"block_level"`` / ``"leaf_level"`` (Diffusers group offloading), or
            ``"auto"`` (block level where the component has a block list, else leaf level).
        fp8: weights stored in ``float8_e4m3fn`` by layerwise casting.
        disk: offloaded weights kept in safetensors files instead of CPU RAM.
        summary: one line for tables and docs.
    """

    name: str
    offload: str | None
    fp8: bool = False
    disk: bool = False
    summary: str = ""


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("resident", None, summary="on the device for the whole run"),
    Strategy("resident_fp8", None, fp8=True,
             summary="on the device, weights stored in float8 (changes outputs slightly)"),
    Strategy("group_offload", "block_level", summary="CPU RAM, streamed block by block"),
    Strategy("group_offload_fp8", "block_level", fp8=True, summary="CPU RAM in float8, streamed block by block"),
    Strategy("leaf_offload", "leaf_level", summary="CPU RAM, streamed layer by layer"),
    Strategy("disk_offload", "auto", disk=True, summary="safetensors files, streamed block (or layer) by layer"),
)}

#: Strategies each role may get, most preferred first.  Encoders are never stored in fp8: transformers' ``dtype``
#: would then report float8 and the pipelines cast the prompt embeddings to it; streaming them is cheap anyway
#: (they run once per prompt).
ROLE_STRATEGIES: dict[str, tuple[str, ...]] = {
    "transformer": ("resident", "resident_fp8", "group_offload", "group_offload_fp8", "disk_offload"),
    "vae": ("resident", "leaf_offload", "disk_offload"),
    "image_encoder": ("resident", "group_offload", "disk_offload"),
    "text_encoder": ("resident", "group_offload", "disk_offload"),
    "other": ("resident",),
}

#: When not everything fits, earlier roles keep their preferred strategy (the transformers run ``2 x steps`` times,
#: the VAE once per video, the encoders once per prompt).
ROLE_PRIORITY: tuple[str, ...] = ("transformer", "vae", "image_encoder", "text_encoder", "other")

#: Pipeline component name -> role; other ``nn.Module`` components are ``"other"`` (resident, counted in every phase).
COMPONENT_ROLES: dict[str, str] = {
    "transformer": "transformer",
    "transformer_2": "transformer",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "image_encoder": "image_encoder",
}

#: Phases in execution order and the components that run in each.
PHASES: dict[str, tuple[str, ...]] = {
    "encode": ("text_encoder", "image_encoder"),
    "denoise": ("transformer",),
    "denoise_2": ("transformer_2",),
    "decode": ("vae",),
}

#: Where the repeated blocks of a component live (first match wins); group offloading goes on their parent.
BLOCK_LISTS: tuple[str, ...] = ("blocks", "encoder.block", "vision_model.encoder.layers", "encoder.layers", "layers")

#: The two experts of Wan2.2 (same size, run one after the other): they always share one strategy.
EXPERTS: tuple[str, ...] = ("transformer", "transformer_2")

#: Roles whose weights may be stored in fp8.
FP8_ROLES: frozenset[str] = frozenset({"transformer"})

#: Names of the hooks Diffusers' group offloading installs (``diffusers.hooks.group_offloading``).
GROUP_OFFLOAD_HOOKS: tuple[str, ...] = ("lazy_prefetch_group_offloading", "layer_execution_tracker", "group_offloading")

#: Names of the hooks Diffusers' layerwise casting installs (``diffusers.hooks.layerwise_casting``).
CASTING_HOOKS: tuple[str, ...] = ("peft_autocast_disable", "layerwise_casting")
