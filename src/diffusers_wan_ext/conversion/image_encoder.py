"""Wan's open-clip CLIP file -> ``transformers.CLIPVisionModel`` (and back), plus Wan's exact image preprocessing.

Wan2.1 I2V / FLF2V (and Fun, Animate) ship ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``: a whole
open-clip ``XLMRobertaCLIP`` (``visual.*`` ViT-H/14, ``textual.*`` XLM-RoBERTa text tower, ``log_scale``).  Wan uses
only the vision tower, and from it the output of the *penultimate* block before ``post_norm`` (``use_31_block=True``),
which is ``CLIPVisionModel(..., output_hidden_states=True).hidden_states[-2]`` -- exactly what stock Diffusers'
``WanImageToVideoPipeline.encode_image`` takes (it declares ``image_encoder: CLIPVisionModel``).

Key names produced by :func:`convert_clip_state_dict` are the checkpoint names of ``CLIPVisionModel`` /
``CLIPVisionModelWithProjection`` as found in Hub checkpoints (``vision_model.*`` + ``visual_projection.weight``);
``from_pretrained`` of every transformers version reads them, and :func:`load_clip_from_original` adapts them to the
module names of the installed transformers (5.x ``CLIPVisionModel`` has no ``vision_model.`` level).

The text tower is dropped on conversion and **cannot be recovered** by :func:`export_clip_state_dict`: an exported
file has ``visual.*`` only (enough for every Wan pipeline, which never loads ``textual.*`` / ``log_scale``).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

from ..utils import ConversionError, strip_known_prefixes
from ..utils.clip_processor import clip_image_processor_class
from .text_encoder import KeyRule, as_state_dict, block_indices, empty_model, load_strict, require
from .text_encoder import convert_with_rules, export_with_rules

__all__ = [
    "CLIP_KEY_RULES",
    "CLIP_DROPPED",
    "CLIP_MEAN",
    "CLIP_STD",
    "KNOWN_VISION_TOWERS",
    "clip_image_features",
    "clip_vision_config_from_state_dict",
    "convert_clip_state_dict",
    "export_clip_state_dict",
    "load_clip_from_original",
    "make_clip_image_processor",
    "wan_clip_preprocess",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_P = "vision_model."
_L = _P + "encoder.layers.{i}."

#: original open-clip ``visual.*`` key -> ``CLIPVisionModel(WithProjection)`` checkpoint key.
CLIP_KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("visual.patch_embedding.weight", (_P + "embeddings.patch_embedding.weight",)),  # Conv2d, no bias
    KeyRule("visual.cls_embedding", (_P + "embeddings.class_embedding",), kind="flatten_1x1"),  # [1,1,D] -> [D]
    KeyRule("visual.pos_embedding", (_P + "embeddings.position_embedding.weight",), kind="drop_batch_dim"),
    KeyRule("visual.pre_norm.weight", (_P + "pre_layrnorm.weight",)),
    KeyRule("visual.pre_norm.bias", (_P + "pre_layrnorm.bias",)),
    KeyRule("visual.transformer.{i}.norm1.weight", (_L + "layer_norm1.weight",)),
    KeyRule("visual.transformer.{i}.norm1.bias", (_L + "layer_norm1.bias",)),
    # fused [3D, D] in q, k, v order (open-clip views it as (b, s, 3, heads, head_dim))
    KeyRule(
        "visual.transformer.{i}.attn.to_qkv.weight",
        (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
        kind="split",
    ),
    KeyRule(
        "visual.transformer.{i}.attn.to_qkv.bias",
        (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
        kind="split",
    ),
    KeyRule("visual.transformer.{i}.attn.proj.weight", (_L + "self_attn.out_proj.weight",)),
    KeyRule("visual.transformer.{i}.attn.proj.bias", (_L + "self_attn.out_proj.bias",)),
    KeyRule("visual.transformer.{i}.norm2.weight", (_L + "layer_norm2.weight",)),
    KeyRule("visual.transformer.{i}.norm2.bias", (_L + "layer_norm2.bias",)),
    KeyRule("visual.transformer.{i}.mlp.0.weight", (_L + "mlp.fc1.weight",)),
    KeyRule("visual.transformer.{i}.mlp.0.bias", (_L + "mlp.fc1.bias",)),
    KeyRule("visual.transformer.{i}.mlp.2.weight", (_L + "mlp.fc2.weight",)),
    KeyRule("visual.transformer.{i}.mlp.2.bias", (_L + "mlp.fc2.bias",)),
    # unused by Wan (it stops before the last block) but kept so that the visual tower round-trips
    KeyRule("visual.post_norm.weight", (_P + "post_layernorm.weight",)),
    KeyRule("visual.post_norm.bias", (_P + "post_layernorm.bias",)),
)

#: ``visual.head`` [D, embed_dim] -> ``visual_projection.weight`` [embed_dim, D]; only ``CLIPVisionModelWithProjection``.
CLIP_HEAD_RULE = KeyRule("visual.head", ("visual_projection.weight",), kind="transpose")

#: Known keys of the release file that have no place in a vision model (exact keys, or prefixes ending in ".").
CLIP_DROPPED: tuple[str, ...] = ("textual.", "log_scale")

#: Keys of ours that have no original counterpart and are skipped on export (old transformers saved this buffer).
_EXPORT_IGNORED = (_P + "embeddings.position_ids",)

#: Head counts of released open-clip vision towers, by (width, depth): not derivable from tensor shapes.
KNOWN_VISION_TOWERS: dict[tuple[int, int], int] = {
    (1280, 32): 16,  # ViT-H/14 (Wan's open-clip-xlm-roberta-large-vit-huge-14, laion ViT-H-14), head dim 80
    (1024, 24): 16,  # ViT-L/14, head dim 64
    (768, 12): 12,  # ViT-B/16, ViT-B/32
    (1408, 40): 16,  # ViT-g/14
    (1664, 48): 16,  # ViT-bigG/14
}

_ANCHOR = "visual."


def _clip_sd(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return strip_known_prefixes(dict(sd), _ANCHOR)


def clip_vision_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], num_heads: int | None = None, **overrides
):
    """Build the ``transformers.CLIPVisionConfig`` of an original open-clip vision tower from its tensor shapes.

    image size = patch size x sqrt(number of patch positions), hidden size, depth, MLP width and projection width
    (``visual.head``) come from the shapes.  The head count cannot: pass ``num_heads``, or it is looked up in
    :data:`KNOWN_VISION_TOWERS` by (width, depth) -- Wan's ViT-H/14 (1280 wide, 32 blocks) has 16.  An unknown size
    without ``num_heads`` raises :class:`ConversionError`.  Activation is exact GELU (open-clip ``'gelu'``, not
    CLIP's ``quick_gelu``), LayerNorm eps 1e-5.  ``overrides`` are passed on to ``CLIPVisionConfig``.
    """
    from transformers import CLIPVisionConfig

    sd = _clip_sd(sd)
    what = "open-clip vision tower state dict"
    patch = require(sd, "visual.patch_embedding.weight", what)
    pos = require(sd, "visual.pos_embedding", what)
    require(sd, "visual.pre_norm.weight", what)  # Wan's tower is pre-norm; a tower without it is not supported
    layers = block_indices(sd, "visual.transformer.")
    if not layers or layers != list(range(len(layers))):
        raise ConversionError(f"{what}: 'visual.transformer.<i>.*' blocks missing or not contiguous: {layers}")
    fc1 = require(sd, "visual.transformer.0.mlp.0.weight", what)
    hidden, channels, ph, pw = patch.shape
    if ph != pw:
        raise ConversionError(f"{what}: non-square patch {ph}x{pw} is not supported")
    n_patches = pos.shape[-2] - 1
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise ConversionError(f"{what}: {n_patches} patch positions do not form a square grid")
    if num_heads is None:
        num_heads = KNOWN_VISION_TOWERS.get((int(hidden), len(layers)))
        if num_heads is None:
            raise ConversionError(
                f"{what}: the head count of a {hidden}-wide, {len(layers)}-block vision tower is not known; "
                "pass num_heads (diffusers-wan convert: --image-encoder-heads N; known release sizes: "
                + ", ".join(f"{w}x{d}: {h} heads" for (w, d), h in KNOWN_VISION_TOWERS.items())
                + ")"
            )
    num_heads = int(num_heads)
    if hidden % num_heads:
        raise ConversionError(f"{what}: width {hidden} is not divisible by num_heads={num_heads}")
    kwargs = dict(
        hidden_size=int(hidden),
        intermediate_size=int(fc1.shape[0]),
        num_hidden_layers=len(layers),
        num_attention_heads=num_heads,
        num_channels=int(channels),
        image_size=int(grid * ph),
        patch_size=int(ph),
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
    )
    if "visual.head" in sd:
        kwargs["projection_dim"] = int(sd["visual.head"].shape[1])
    kwargs.update(overrides)
    return CLIPVisionConfig(**kwargs)


def convert_clip_state_dict(sd: Mapping[str, torch.Tensor], with_projection: bool = False) -> dict[str, torch.Tensor]:
    """Original open-clip XLM-R ViT-H/14 file -> ``CLIPVisionModel`` checkpoint keys (``vision_model.*``).

    ``textual.*`` and ``log_scale`` are dropped (see :data:`CLIP_DROPPED`); ``visual.head`` becomes
    ``visual_projection.weight`` (transposed) when ``with_projection`` (for ``CLIPVisionModelWithProjection``) and is
    dropped otherwise (Wan never uses it).  ``to_qkv`` is split into q / k / v.  Any other key raises
    :class:`ConversionError` naming it.
    """
    sd = _clip_sd(sd)
    rules = CLIP_KEY_RULES + ((CLIP_HEAD_RULE,) if with_projection else ())
    dropped = CLIP_DROPPED + (() if with_projection else ("visual.head",))
    return convert_with_rules(
        sd, rules, dropped=dropped, what="open-clip CLIP (models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth layout)"
    )


def export_clip_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exact inverse of :func:`convert_clip_state_dict` for the vision tower: ours -> original ``visual.*`` keys.

    Accepts checkpoint names (``vision_model.*``) and transformers-5 module names (no ``vision_model.`` prefix), and
    ``visual_projection.weight`` (-> ``visual.head``) when present.  The XLM-RoBERTa text tower and ``log_scale`` were
    dropped on conversion and cannot be recovered: the result holds ``visual.*`` only.
    """
    norm = {}
    for k, v in sd.items():
        if not k.startswith(_P) and not k.startswith("visual_projection."):
            k = _P + k
        norm[k] = v
    return export_with_rules(
        norm, CLIP_KEY_RULES + (CLIP_HEAD_RULE,), ignored=_EXPORT_IGNORED, what="CLIPVisionModel state dict"
    )


def _to_module_names(model, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names -> the installed transformers' module names (5.x CLIPVisionModel has no ``vision_model.``)."""
    expected = model.state_dict().keys()
    if any(k.startswith(_P) for k in expected):
        return sd
    return {k[len(_P):] if k.startswith(_P) else k: v for k, v in sd.items()}


def load_clip_from_original(
    sd_or_path,
    num_heads: int | None = None,
    torch_dtype: torch.dtype = torch.float32,
    with_projection: bool = False,
):
    """Load the vision tower of an original Wan CLIP file as ``CLIPVisionModel`` (or ``...WithProjection``).

    ``sd_or_path``: a state dict or a ``.pth`` / ``.safetensors`` path.  ``num_heads``: required unless the tower
    is a known release size (see :func:`clip_vision_config_from_state_dict`).  Strict: missing / unexpected keys raise
    :class:`ConversionError` naming them.  Returned in eval mode, in ``torch_dtype`` (the original runs it in fp16).
    """
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    sd = as_state_dict(sd_or_path, _ANCHOR)
    config = clip_vision_config_from_state_dict(sd, num_heads=num_heads)
    if with_projection and "visual.head" not in sd:
        raise ConversionError("open-clip CLIP: with_projection=True but the file has no visual.head")
    ours = convert_clip_state_dict(sd, with_projection=with_projection)
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    model, assign = empty_model(cls, config, torch_dtype)
    return load_strict(model, _to_module_names(model, ours), torch_dtype, assign, f"CLIP vision tower ({cls.__name__})")


def wan_clip_preprocess(
    image: torch.Tensor,
    size: int | tuple[int, int] = 224,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> torch.Tensor:
    """Wan's CLIP preprocessing of a ``[B, 3, H, W]`` image in ``[-1, 1]`` -> ``pixel_values`` ``[B, 3, size, size]``.

    ``F.interpolate(mode="bicubic", align_corners=False)`` without antialias straight to ``size x size`` (aspect ratio
    squashed, no crop), then ``x * 0.5 + 0.5`` and per-channel ``(x - mean) / std``.  Computed in float32 (at least);
    cast the result to the encoder's dtype.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an image batch [B, 3, H, W], got shape {tuple(image.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = image if image.dtype in (torch.float32, torch.float64) else image.float()
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@torch.no_grad()
def clip_image_features(image_encoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """The CLIP feature Wan conditions on: output of all blocks but the last, no post-norm (``hidden_states[-2]``)."""
    p = next(image_encoder.parameters())
    out = image_encoder(pixel_values=pixel_values.to(device=p.device, dtype=p.dtype), output_hidden_states=True)
    return out.hidden_states[-2]


def make_clip_image_processor(size: int = 224):
    """A ``CLIPImageProcessor`` as close as transformers allows to Wan's preprocessing, for converted pipeline folders.

    Stock ``WanImageToVideoPipeline`` needs an ``image_processor`` component.  This one resizes straight to
    ``size x size`` (bicubic, no shortest-edge resize, no center crop), rescales by 1/255 and normalises with the CLIP
    mean / std -- the same steps as :func:`wan_clip_preprocess`.  It is **not bit-identical**: the processor resizes
    the uint8 PIL image with PIL's bicubic filter (a = -0.5, antialiased when downscaling, result rounded to uint8),
    while Wan resizes the float ``[-1, 1]`` tensor with ``torch`` bicubic (a = -0.75, no antialias).  For downscaled
    inputs the two differ by a few percent of the pixel range; use :func:`wan_clip_preprocess` for parity with the
    original / DiffSynth.  (Transformers 5 without torchvision instantiates the PIL backend ``CLIPImageProcessorPil``;
    the saved ``preprocessor_config.json`` says ``CLIPImageProcessor`` either way.)
    """
    return clip_image_processor_class()(
        do_resize=True,
        size={"height": int(size), "width": int(size)},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=False,
        crop_size={"height": int(size), "width": int(size)},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
