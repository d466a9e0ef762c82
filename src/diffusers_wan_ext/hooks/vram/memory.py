"""The memory model of the VRAM planner: byte sizes of a component as stored, its activation working set, and the
estimated peak of every pipeline phase under a placement.

The estimated peak of a phase is the bytes of every resident component plus, for the components of that phase, the
streamed bytes in flight and the activation working set, plus a fixed per-phase overhead.

Activation model (documented estimates, calibrated on H100 bf16 measurements; see ``docs/vram.md``):

* transformer, one forward: ``tokens x batch x elem_bytes x (6.9 x dim + 1.55 x ffn_dim) x 1.10`` where ``tokens =
  ((F-1)//4+1) * (H//(8*p_h)) * (W//(8*p_w))`` (VAE factors from its config), ``dim = heads * head_dim``; ``batch``
  doubles with batched CFG.  The forward frees its working set block by block and SDPA keeps no score matrix, so the
  peak is one block's working set, linear in ``tokens``: about seven ``dim``-wide copies (residual, fp32 norm /
  modulation temporaries, q / k / v, the fp32 rotary temporaries, the attention output) and one and a half
  ``ffn_dim``-wide ones (the FFN's up-projection and its GELU).  The two coefficients fit the stock forward measured
  on an H100 (Diffusers 0.42.1, torch 2.11, SDPA): 1.49 GiB for the 1.3B at 32 760 tokens and 7.97 GiB for the 14B at
  75 600 (also 2.90 / 4.31 GiB at 63 960 / 95 160 tokens and 15.56 GiB at 147 600: linear); ``1.10`` is the stated
  safety factor over them (it covers the per-layer dequantized weight of GGUF / fp8 layers, +0.04 GiB at 14B, and the
  pipeline's own tensors, 8.15 GiB in a whole H200 run).  An earlier single factor (``38.2 x dim``) was calibrated on
  figures of 2.7 and 27.5 GiB that no run of this stack reproduced, and over-estimated the 14B 720p forward 3x.
  With sliding windows the forward runs per window, so ``tokens`` counts the largest window's latent frames instead of
  the video's (the full-video blend buffers, ``2 x`` the latents in float32, are negligible).
* VAE decode: per-frame decoder working set ``4.10 GiB x (H*W) / (480*832)`` (bf16, Wan2.1 VAE: causal decoding
  keeps one latent frame in flight) plus two copies of the output video (``3*F*H*W``); scaled by the VAE's dtype and
  channel width.  With ``vae.enable_tiling()`` the per-frame part scales with the tile area instead and four output
  copies are counted (overlapping tiles, blending).  Together: 4.7 GiB at 480x832x81 in bf16 incl. weights, as
  measured.  With :func:`~diffusers_wan_ext.runtime.optimize_vae`'s fast decode installed (untiled): ``2.77 GiB``
  per frame and one output copy, 3.2 GiB in all (measured 3.20 GiB on an H100).  VAE *encode* (I2V / VACE
  conditioning) is assumed to need no more than decode.
* encoders: ``seq x d_model x elem x 24 + 3 x heads x seq**2 x 4`` bytes (``seq`` 512 text tokens, 257 image
  tokens): 0.28 GiB for umt5-xxl (0.27 GiB measured).
* every phase: ``0.125 GiB`` for the pipeline's own tensors and the library workspaces (cuBLAS / cuDNN) that torch
  allocates through its caching allocator.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

from ...models.quantized_linear import Fp8Linear, is_gguf_parameter, quantized_weight_bytes
from .strategies import BLOCK_LISTS, FP8_ROLES, GIB, PHASES, Strategy, STRATEGIES

__all__ = [
    "ComponentSizes",
    "Evaluation",
    "Footprint",
    "GenerationShape",
    "config_value",
    "evaluate",
    "footprint",
    "fp8_skip_patterns",
    "is_quantized_layer",
    "main_dtype",
    "measure_component",
    "module_tensors",
    "named_tensors",
    "offload_type",
    "planning_margin_gib",
    "quantized_compute_dtype",
    "quantized_layer_names",
]

# ---- calibration (see the module docstring and docs/vram.md)
# one transformer forward, bytes per token per element byte: per model channel and per FFN channel, times a safety
# factor over the H100 measurements they fit (1.3B 480x832x81: 1.49 GiB, 14B 1280x720x81: 7.97 GiB)
_DIT_ACT_PER_DIM, _DIT_ACT_PER_FFN, _DIT_ACT_SAFETY = 6.9, 1.55, 1.10
_DIT_DEFAULT_FFN_RATIO = 6  # ffn_dim / dim assumed without an ``ffn_dim`` in the config (Wan's largest is 5.83)
_VAE_REF_PIXELS = 480 * 832
_VAE_REF_CHANNELS = 96  # Wan2.1 VAE decoder base width
_VAE_FRAME_GIB = 4.10  # per-frame decoder working set at 480x832, bf16, Wan2.1 VAE
# the same for the fast decode of ``optimize_vae`` (one output copy): 3.20 GiB peak at 480x832x81 bf16 on an H100
# (weights 0.24 + video 0.19 + working set 2.77)
_VAE_FAST_FRAME_GIB = 2.77
_VAE_OUTPUT_COPIES = {False: 2, True: 4}  # untiled / tiled
_ENCODER_SEQ = {"text_encoder": 512, "image_encoder": 257}
_MIN_MARGIN_GIB, _MARGIN_FRACTION = 0.5, 0.05
# every phase: the pipeline's own tensors (prompt embeddings, latents, masks) and the cuBLAS / cuDNN workspaces torch
# takes from its caching allocator; without it the H200 runs of docs/vram.md measured up to 0.10 GiB above the estimate
_PHASE_OVERHEAD_GIB = 0.125


def planning_margin_gib(vram_limit_gib: float) -> float:
    """Headroom kept below the budget: the larger of 0.5 GiB and 5 % of it."""
    return max(_MIN_MARGIN_GIB, _MARGIN_FRACTION * vram_limit_gib)


# ================================================================================================ sizes
def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's parameters, then its buffers, with their dotted names."""
    yield from module.named_parameters()
    yield from module.named_buffers()


def module_tensors(module: nn.Module, recurse: bool = True) -> dict[int, torch.Tensor]:
    """``{id(tensor): tensor}`` of the module's parameters and buffers (shared tensors counted once)."""
    return {id(t): t for t in itertools.chain(module.parameters(recurse=recurse), module.buffers(recurse=recurse))}


def _stored_bytes(tensors: Mapping[int, torch.Tensor], fp8_ids: frozenset[int] = frozenset()) -> int:
    return sum(t.numel() * (1 if i in fp8_ids else t.element_size()) for i, t in tensors.items())


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` keeps its weight quantized (a Diffusers ``GGUFLinear`` with a packed ``GGUFParameter``, or
    an :class:`~diffusers_wan_ext.models.quantized_linear.Fp8Linear`): stored as is, never cast to fp8 again."""
    return isinstance(module, Fp8Linear) or any(is_gguf_parameter(p) for p in module.parameters(recurse=False))


def quantized_layer_names(module: nn.Module) -> list[str]:
    """Dotted names of the layers of ``module`` whose weights are already quantized (GGUF / fp8)."""
    return [name for name, m in module.named_modules() if is_quantized_layer(m)]


def quantized_compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype the quantized layers of ``module`` compute in (their ``compute_dtype``, else their bias's), weighted
    by their bytes; ``None`` without quantized layers."""
    counts = Counter()
    for m in module.modules():
        if is_quantized_layer(m):
            dtype = getattr(m, "compute_dtype", None) or (m.bias.dtype if getattr(m, "bias", None) is not None
                                                          else None)
            if dtype is not None:
                counts[dtype] += m.weight.numel()
    return counts.most_common(1)[0][0] if counts else None


def main_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype holding most of the module's bytes (quantized fp8 / GGUF storage left out: the dtype the
    rest of the module computes in)."""
    counts = Counter()
    for t in module_tensors(module).values():
        if t.is_floating_point() and t.element_size() > 1:
            counts[t.dtype] += t.numel() * t.element_size()
    return counts.most_common(1)[0][0] if counts else torch.float32


def fp8_skip_patterns(module: nn.Module) -> tuple[str, ...]:
    """Skip patterns of layerwise casting, as ``ModelMixin.enable_layerwise_casting`` builds them."""
    patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN)
    for attr in ("_keep_in_fp32_modules", "_skip_layerwise_casting_patterns"):
        patterns += tuple(getattr(module, attr, None) or ())
    return tuple(dict.fromkeys(patterns))


def _fp8_leaves(module: nn.Module, patterns: tuple[str, ...], prefix: str = "") -> Iterator[nn.Module]:
    """The layers layerwise casting stores in fp8 (mirrors ``diffusers.hooks.layerwise_casting``; layers already
    quantized, GGUF / fp8, are left as they are)."""
    if (prefix and any(re.search(p, prefix) for p in patterns)) or is_quantized_layer(module):
        return
    if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
        yield module
        return
    for name, child in module.named_children():
        yield from _fp8_leaves(child, patterns, f"{prefix}.{name}" if prefix else name)


def _find_block_root(module: nn.Module) -> str | None:
    for path in BLOCK_LISTS:
        try:
            blocks = module.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
            return path.rpartition(".")[0]
    return None


# ================================================================================================ activations
@dataclass(frozen=True)
class GenerationShape:
    """The generation a plan is made for, with the VAE's compression factors and tiling."""

    height: int
    width: int
    num_frames: int
    batch_size: int
    cfg_batched: bool
    temporal: int = 4
    spatial: int = 8
    vae_tiling: bool = False
    vae_tile: tuple[int, int] = (256, 256)
    #: latent frames of the largest sliding window (:mod:`diffusers_wan_ext.hooks.sliding_window`), ``None``: off
    window_frames: int | None = None

    @classmethod
    def for_vae(cls, vae: nn.Module | None, height: int, width: int, num_frames: int, batch_size: int,
                cfg_batched: bool, window_frames: int | None = None) -> "GenerationShape":
        """The shape with the compression factors and tiling read from ``vae`` (Wan defaults without one)."""
        return cls(
            height, width, num_frames, batch_size, cfg_batched,
            temporal=config_value(vae, "scale_factor_temporal", default=4) if vae is not None else 4,
            spatial=config_value(vae, "scale_factor_spatial", default=8) if vae is not None else 8,
            vae_tiling=bool(getattr(vae, "use_tiling", False)),
            vae_tile=(getattr(vae, "tile_sample_min_height", 256), getattr(vae, "tile_sample_min_width", 256)),
            window_frames=window_frames,
        )

    @property
    def latent_frames(self) -> int:
        """Latent frames of the whole video."""
        return (self.num_frames - 1) // self.temporal + 1

    def tokens(self, patch_size) -> int:
        """Transformer tokens of one forward for one video and a ``patch_size`` of ``(t, h, w)`` (``None``:
        ``(1, 2, 2)``): the whole video, or its largest sliding window when :attr:`window_frames` is set."""
        pt, ph, pw = (tuple(patch_size) + (1, 1, 1))[:3] if patch_size is not None else (1, 2, 2)
        frames = self.latent_frames if self.window_frames is None else min(self.latent_frames, self.window_frames)
        return ((frames - 1) // pt + 1) * (self.height // (self.spatial * ph)) * (self.width // (self.spatial * pw))


def _elem(dtype: torch.dtype) -> int:
    return dtype.itemsize


def config_value(module: nn.Module, *keys: str, default=None):
    """The first of ``keys`` set in ``module.config`` (a dict or an object), else ``default``."""
    config = getattr(module, "config", None)
    for key in keys:
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if value is not None:
            return value
    return default


def _dit_activations(module: nn.Module, dtype: torch.dtype, shape: GenerationShape, name: str) -> int:
    heads = config_value(module, "num_attention_heads", "num_heads")  # num_heads / dim: Wan2.2-Animate-2's config
    dim_per_head = config_value(module, "dim", default=0) // (heads or 1) or None
    head_dim = config_value(module, "attention_head_dim", default=dim_per_head)
    if heads is None or head_dim is None:
        raise TypeError(
            f"{name} is a {type(module).__name__} without a Wan transformer config (num_attention_heads, "
            "attention_head_dim, patch_size): pass a WanTransformer3DModel-like model, or plan it under another "
            "component name"
        )
    dim = heads * head_dim
    ffn_dim = config_value(module, "ffn_dim", default=_DIT_DEFAULT_FFN_RATIO * dim)
    tokens = shape.tokens(config_value(module, "patch_size"))
    batch = shape.batch_size * (2 if shape.cfg_batched else 1)
    per_token = (_DIT_ACT_PER_DIM * dim + _DIT_ACT_PER_FFN * ffn_dim) * _DIT_ACT_SAFETY
    return int(tokens * batch * _elem(dtype) * per_token)


def _vae_activations(module: nn.Module, dtype: torch.dtype, shape: GenerationShape, name: str) -> int:
    elem = _elem(main_dtype(module))
    channels = config_value(module, "decoder_base_dim", "base_dim", default=_VAE_REF_CHANNELS)
    patch = config_value(module, "patch_size", default=1) or 1
    pixels = shape.height * shape.width
    area = min(pixels, shape.vae_tile[0] * shape.vae_tile[1]) if shape.vae_tiling else pixels
    # optimize_vae's fast decode runs (untiled) when the decoder stays resident: no hooks on its modules
    fast = hasattr(module, "_wan_fast_decode") and not shape.vae_tiling
    frame_gib = _VAE_FAST_FRAME_GIB if fast else _VAE_FRAME_GIB
    per_frame = frame_gib * GIB * area / _VAE_REF_PIXELS * channels / _VAE_REF_CHANNELS / patch**2 * elem / 2
    output = 3 * shape.num_frames * pixels * elem * (1 if fast else _VAE_OUTPUT_COPIES[shape.vae_tiling])
    return int(shape.batch_size * (per_frame + output))


def _encoder_activations(module: nn.Module, dtype: torch.dtype, shape: GenerationShape, name: str) -> int:
    config = getattr(module, "config", None)
    config = getattr(config, "vision_config", None) or config
    d = getattr(config, "d_model", None) or getattr(config, "hidden_size", None) or 1024
    heads = getattr(config, "num_heads", None) or getattr(config, "num_attention_heads", None) or 16
    seq = _ENCODER_SEQ.get(name, 512)
    # hidden-state copies + three fp32 score-sized tensors (scores + position bias, softmax, its dropout/cast)
    return int(shape.batch_size * (seq * d * _elem(dtype) * 24 + heads * seq * seq * 4 * 3))


def _no_activations(module, dtype, shape, name) -> int:
    return 0


_ACTIVATIONS = {
    "transformer": _dit_activations,
    "vae": _vae_activations,
    "text_encoder": _encoder_activations,
    "image_encoder": _encoder_activations,
}


# ================================================================================================ components
@dataclass
class ComponentSizes:
    """Byte sizes of one component, measured once (works on meta tensors); pairs are (as stored, with fp8 storage).

    Sizes count every parameter and buffer once as stored: GGUF packed blocks in bytes, fp8 weights at one byte and
    their float32 scales; ``quantized`` is the part of it in already quantized layers
    (:func:`~diffusers_wan_ext.models.quantized_linear.quantized_weight_bytes`)."""

    name: str
    role: str
    module: nn.Module
    dtype: torch.dtype
    compute_dtype: torch.dtype
    size: tuple[int, int]  # (as stored, with fp8 storage)
    fp8_upcast: int  # largest fp8 layer in the compute dtype (the transient copy of layerwise casting)
    block_root: str | None
    blocks: list[list[tuple[int, int]]]  # per block list of the root: per block (bytes, fp8 bytes)
    unmatched: tuple[int, int]  # root tensors outside its block lists (one extra group, in flight all forward)
    outside: tuple[int, int]  # component tensors outside the root (stay resident)
    leaf_max: int  # largest leaf-level group
    activations: int
    phases: tuple[str, ...]
    quantized: int = 0  # bytes of weights already quantized (GGUF / fp8 layers)


def _fp8_layout(module: nn.Module, role: str, compute: torch.dtype) -> tuple[frozenset[int], int]:
    """The ids of the tensors fp8 storage would hold, and the largest such layer up-cast to ``compute``."""
    if role not in FP8_ROLES:
        return frozenset(), 0
    leaves = list(_fp8_leaves(module, fp8_skip_patterns(module)))
    fp8_ids = frozenset(i for leaf in leaves for i, t in module_tensors(leaf).items() if t.is_floating_point())
    fp8_upcast = max((sum(t.numel() for t in module_tensors(leaf).values()) * _elem(compute) for leaf in leaves),
                     default=0)
    return fp8_ids, fp8_upcast


def measure_component(name: str, role: str, module: nn.Module, shape: GenerationShape,
                      dtype: torch.dtype | None) -> ComponentSizes:
    """Measure ``module`` (planned as ``name`` in ``role``) for ``shape``; ``dtype``: compute dtype (``None``: the
    compute dtype of its quantized layers, else its weights' dtype)."""
    main = main_dtype(module)
    compute = dtype or quantized_compute_dtype(module) or main
    fp8_ids, fp8_upcast = _fp8_layout(module, role, compute)

    def sizes(tensors):
        return _stored_bytes(tensors), _stored_bytes(tensors, fp8_ids)

    everything = module_tensors(module)
    root_path = _find_block_root(module)
    blocks, unmatched, outside = [], (0, 0), (0, 0)
    if root_path is not None:
        root = module.get_submodule(root_path)
        in_root = module_tensors(root)
        lists = [c for c in root.children() if isinstance(c, (nn.ModuleList, nn.Sequential))]
        blocks = [[sizes(module_tensors(b)) for b in lst] for lst in lists]
        listed = {i for lst in lists for i in module_tensors(lst)}
        unmatched = sizes({i: t for i, t in in_root.items() if i not in listed})
        outside = sizes({i: t for i, t in everything.items() if i not in in_root})
    leaf_groups = [
        _stored_bytes(module_tensors(m, recurse=isinstance(m, _GO_LC_SUPPORTED_PYTORCH_LAYERS)))
        for m in module.modules()
    ]
    phases = tuple(p for p, names in PHASES.items() if name in names) or tuple(PHASES)
    return ComponentSizes(
        name=name, role=role, module=module, dtype=main, compute_dtype=compute, size=sizes(everything),
        fp8_upcast=fp8_upcast, block_root=root_path, blocks=blocks, unmatched=unmatched, outside=outside,
        leaf_max=max(leaf_groups, default=0), phases=phases,
        activations=_ACTIVATIONS.get(role, _no_activations)(module, compute, shape, name),
        quantized=quantized_weight_bytes(module),
    )


# ================================================================================================ footprints
@dataclass(frozen=True)
class Footprint:
    """Bytes of one component under one strategy: on the device for the whole run, in flight while it runs, in CPU
    RAM, and the transient fp8 up-cast copy."""

    resident: int
    in_flight: int
    cpu: int
    extra: int  # transient fp8 up-cast copy


def offload_type(component: ComponentSizes, strategy: Strategy) -> str | None:
    """The Diffusers ``offload_type`` of ``strategy`` for ``component`` (``"auto"`` resolved), ``None`` if resident."""
    if strategy.offload == "auto":
        return "block_level" if component.block_root is not None else "leaf_level"
    return strategy.offload


def footprint(c: ComponentSizes, strategy: Strategy, per_group: int, use_stream: bool) -> Footprint:
    """The :class:`Footprint` of ``c`` under ``strategy`` (``per_group`` blocks per group without streams)."""
    k = int(strategy.fp8)
    stored = c.size[k]
    extra = c.fp8_upcast if strategy.fp8 else 0
    offload = offload_type(c, strategy)
    in_flight_groups = 2 if use_stream else 1  # with streams the next group is prefetched
    if offload is None:
        return Footprint(stored, 0, 0, extra)
    if offload == "block_level":
        n = 1 if use_stream else per_group  # Diffusers forces one block per group with streams
        group = max((sum(b[k] for b in lst[i:i + n]) for lst in c.blocks for i in range(0, len(lst), n)), default=0)
        resident, in_flight = c.outside[k], c.unmatched[k] + in_flight_groups * group
    else:
        resident, in_flight = 0, in_flight_groups * c.leaf_max
    return Footprint(resident, in_flight, 0 if strategy.disk else stored - resident, extra)


@dataclass
class Evaluation:
    """Estimated peak bytes per phase, CPU-RAM bytes and per-component footprints of one assignment."""

    phase_peaks: dict[str, int]
    cpu: int
    footprints: dict[str, Footprint]

    @property
    def peak(self) -> int:
        return max(self.phase_peaks.values())


def evaluate(comps: dict[str, ComponentSizes], assignment: dict[str, str], per_group: dict[str, int],
             use_stream: bool) -> Evaluation:
    """Estimate the phase peaks of ``assignment`` (``{component: strategy name}``)."""
    fps = {n: footprint(c, STRATEGIES[assignment[n]], per_group.get(n, 1), use_stream) for n, c in comps.items()}
    resident = sum(fp.resident for fp in fps.values()) + int(_PHASE_OVERHEAD_GIB * GIB)
    peaks = {}
    for phase in PHASES:
        members = [n for n, c in comps.items() if phase in c.phases]
        if any(comps[n].role != "other" for n in members):
            peaks[phase] = resident + sum(fps[n].in_flight + fps[n].extra + comps[n].activations for n in members)
    return Evaluation(peaks or {"idle": resident}, sum(fp.cpu for fp in fps.values()), fps)
