"""ByteDance Video-As-Prompt releases -> :class:`~diffusers_wan_ext.WanVideoAsPromptTransformer3DModel` (and back).

``ByteDance/Video-As-Prompt-Wan2.1-14B`` is a Diffusers-format folder (``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``image_encoder/``, ``image_processor/``, ``scheduler/``).  Its transformer
(``WanTransformer3DMOTModel``) keeps stock Diffusers names for the Wan2.1-I2V-14B main stream and stores the
mixture-of-transformers reference stream next to them with a ``_mot_ref`` suffix, on the DiT layer it belongs to::

    patch_embedding_mot_ref.*                       -> vap_patch_embedding.*
    condition_embedder_mot_ref.*                    -> vap_condition_embedder.*
    blocks.<N>.{attn1,attn2,ffn,norm2}_mot_ref.*    -> vap_blocks.<k>.{attn1,attn2,ffn,norm2}.*
    blocks.<N>.scale_shift_table_mot_ref            -> vap_blocks.<k>.scale_shift_table

where ``k`` is the position of DiT layer ``N`` in ``vap_layers`` (the release config's ``block_idx_with_mot_ref``).
The map is the table :data:`VAP_KEY_MAP`; main-stream keys are already stock names.  Everything is a rename (no
tensor is reshaped), so :func:`export_vap_state_dict` inverts :func:`convert_vap_state_dict` exactly.

The widths are read from the weights through the base DiT converter (:func:`~.dit.dit_config_from_state_dict` on
the main stream exported to the original layout), the head count / eps / ``vap_layers`` from the release
``config.json``; a ``vap_layers`` that disagrees with the ``_mot_ref`` keys is an error naming them.  Release
options this model does not implement (``attention_head_dim_mot_ref``, ``reference_train_mode="reference_independent"``
with its own output head) are refused with the keys / config entry that ask for them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import diffusers
import torch
from accelerate import init_empty_weights

from ..models.transformer_wan_vap import WanVideoAsPromptTransformer3DModel
from ..utils.shims import rewrite_model_index_for_shims
from ..utils.atomic import atomic_output_dir
from ..utils.io import ConversionError, format_keys, load_state_dict, raise_for_key_problems, read_json
from .dit import cast_state_dict, dit_config_from_state_dict, export_dit_state_dict
from .release_io import DTYPES

__all__ = [
    "RELEASE_TRANSFORMER_CLASS",
    "VAP_KEY_MAP",
    "convert_vap_release",
    "convert_vap_state_dict",
    "export_vap_state_dict",
    "is_vap_release",
    "load_vap_transformer",
    "vap_config_from_state_dict",
]

#: ``_class_name`` of the release's ``transformer/config.json``.
RELEASE_TRANSFORMER_CLASS = "WanTransformer3DMOTModel"

# (release key regex, our key template).  ``{vap}`` is the position of DiT layer ``layer`` in ``vap_layers``.
VAP_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"patch_embedding_mot_ref\.(?P<rest>.+)", "vap_patch_embedding.{rest}"),
    (r"condition_embedder_mot_ref\.(?P<rest>.+)", "vap_condition_embedder.{rest}"),
    (r"blocks\.(?P<layer>\d+)\.(?P<module>attn1|attn2|ffn|norm2)_mot_ref\.(?P<rest>.+)", "vap_blocks.{vap}.{module}.{rest}"),
    (r"blocks\.(?P<layer>\d+)\.scale_shift_table_mot_ref", "vap_blocks.{vap}.scale_shift_table"),
)
# The reverse direction of the same table.
_EXPORT_MAP: tuple[tuple[str, str], ...] = (
    (r"vap_patch_embedding\.(?P<rest>.+)", "patch_embedding_mot_ref.{rest}"),
    (r"vap_condition_embedder\.(?P<rest>.+)", "condition_embedder_mot_ref.{rest}"),
    (r"vap_blocks\.(?P<vap>\d+)\.(?P<module>attn1|attn2|ffn|norm2)\.(?P<rest>.+)", "blocks.{layer}.{module}_mot_ref.{rest}"),
    (r"vap_blocks\.(?P<vap>\d+)\.scale_shift_table", "blocks.{layer}.scale_shift_table_mot_ref"),
)
_REF_SUFFIX = "_mot_ref"
# Release keys that belong to options this model does not implement (key fragment -> what it is).
UNSUPPORTED_RELEASE_KEYS: tuple[tuple[str, str], ...] = (
    ("norm_out_mot_ref", "the reference stream's own output head (reference_train_mode='reference_independent')"),
    ("proj_out_mot_ref", "the reference stream's own output head (reference_train_mode='reference_independent')"),
)
# Release config entries -> our config (the rest is read from the weights).
_CONFIG_FROM_RELEASE = {"num_attention_heads": "num_heads", "eps": "eps", "text_len": "text_len"}


def _apply(table, key: str, to_template) -> str | None:
    for pattern, template in table:
        m = re.fullmatch(pattern, key)
        if m:
            return template.format(**to_template(m.groupdict()))
    return None


def release_vap_layers(sd: Mapping[str, Any]) -> list[int]:
    """The DiT layers that carry reference-stream blocks in a release state dict (``blocks.N.*_mot_ref``)."""
    return sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.\w+_mot_ref", k))})


def convert_vap_state_dict(sd: Mapping[str, torch.Tensor], vap_layers: list[int] | None = None
                           ) -> dict[str, torch.Tensor]:
    """Release (``*_mot_ref``) names -> :class:`WanVideoAsPromptTransformer3DModel` names.

    ``vap_layers`` defaults to the layers the keys name.  Unknown ``_mot_ref`` keys raise naming them; main-stream
    keys are passed through (the model's key check names anything foreign).
    """
    layers = list(vap_layers) if vap_layers is not None else release_vap_layers(sd)
    index = {layer: k for k, layer in enumerate(layers)}
    unsupported = sorted(k for k in sd if any(frag in k for frag, _ in UNSUPPORTED_RELEASE_KEYS))
    if unsupported:
        what = sorted({w for k in unsupported for frag, w in UNSUPPORTED_RELEASE_KEYS if frag in k})
        raise ConversionError(f"unsupported Video-As-Prompt option ({'; '.join(what)}): keys {format_keys(unsupported)}")
    out, unknown, stray = {}, [], []

    def to_ours(groups):
        if "layer" in groups:
            layer = int(groups.pop("layer"))
            if layer not in index:
                stray.append(layer)
            groups["vap"] = index.get(layer, -1)
        return groups

    for key, value in sd.items():
        if _REF_SUFFIX not in key:
            out[key] = value
            continue
        new = _apply(VAP_KEY_MAP, key, to_ours)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if stray:
        raise ConversionError(
            f"reference-stream keys on DiT layer(s) {sorted(set(stray))}, which are not in vap_layers {layers} "
            "(config block_idx_with_mot_ref): the config and the weights disagree"
        )
    if unknown:
        raise ConversionError(f"{len(unknown)} Video-As-Prompt key(s) of no known module: {format_keys(unknown)}")
    return out


def export_vap_state_dict(sd: Mapping[str, torch.Tensor], vap_layers: list[int]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`convert_vap_state_dict`: our names back to the release layout."""
    layers = list(vap_layers)

    def to_release(groups):
        groups["layer"] = layers[int(groups.pop("vap"))] if "vap" in groups else -1
        return groups

    out = {}
    for key, value in sd.items():
        new = _apply(_EXPORT_MAP, key, to_release) if key.startswith("vap_") else key
        if new is None:
            raise ConversionError(f"{key}: not a WanVideoAsPromptTransformer3DModel key")
        out[new] = value
    return out


def vap_config_from_state_dict(sd: Mapping[str, torch.Tensor], release_config: Mapping[str, Any] | None = None,
                               text_len: int | None = None) -> dict[str, Any]:
    """Our model config from release-layout weights (widths) and the release ``config.json`` (heads, eps, layers)."""
    cfg = dict(release_config or {})
    if cfg.get("attention_head_dim_mot_ref") not in (None, cfg.get("attention_head_dim")):
        raise ConversionError(
            f"config attention_head_dim_mot_ref={cfg['attention_head_dim_mot_ref']}: a reference stream of another "
            "width than the main stream is not supported (the released model has none)"
        )
    if cfg.get("reference_train_mode") == "reference_independent":
        raise ConversionError(
            "config reference_train_mode='reference_independent' (a separate reference output head) is not "
            "supported; the released model does not use it"
        )
    main = {k: v for k, v in sd.items() if _REF_SUFFIX not in k}
    original = {theirs: cfg[ours] for ours, theirs in _CONFIG_FROM_RELEASE.items() if cfg.get(ours) is not None}
    if text_len is not None:
        original["text_len"] = int(text_len)
    try:
        info = dit_config_from_state_dict(export_dit_state_dict(main), original)
    except ConversionError as e:
        raise ConversionError(f"main stream of the Video-As-Prompt transformer: {e}") from e
    if info.arch != "i2v":
        raise ConversionError(
            f"Video-As-Prompt needs a Wan2.1 image-to-video main stream (in_channels 36 with a CLIP branch); these "
            f"weights are {info.arch} (patch_embedding.weight in_channels {info.config['in_channels']})"
        )
    found = release_vap_layers(sd)
    if not found:
        raise ConversionError("no reference-stream weights (blocks.N.*_mot_ref): not a Video-As-Prompt transformer")
    layers = [int(i) for i in cfg.get("block_idx_with_mot_ref", found)]
    if sorted(layers) != found:
        raise ConversionError(
            f"config block_idx_with_mot_ref {layers} but the weights have reference blocks on layers {found} "
            "(blocks.N.*_mot_ref)"
        )
    config = dict(info.config)
    config.update(text_len=info.text_len, vap_layers=sorted(layers))
    return config


def load_vap_transformer(
    sd_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
    release_config: Mapping[str, Any] | None = None,
    torch_dtype: torch.dtype | None = None,
    text_len: int | None = None,
):
    """Build :class:`~diffusers_wan_ext.WanVideoAsPromptTransformer3DModel` from release-layout weights.

    ``sd_or_path``: a state dict, a safetensors file / shard index, or the release ``transformer/`` folder (its
    ``config.json`` is read).  ``text_len`` overrides the release's 512 (tiny test models).

    Example:
        >>> model = load_vap_transformer("Video-As-Prompt-Wan2.1-14B/transformer", torch_dtype=torch.bfloat16)  # doctest: +SKIP
    """
    if isinstance(sd_or_path, (str, os.PathLike)):
        sd, cfg = read_vap_transformer(sd_or_path)
        release_config = release_config or cfg
    else:
        sd = dict(sd_or_path)
    config = vap_config_from_state_dict(sd, release_config, text_len=text_len)
    converted = convert_vap_state_dict(sd, config["vap_layers"])
    with init_empty_weights():
        model = WanVideoAsPromptTransformer3DModel(**config)
    expected = model.state_dict()
    ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    unexpected = [k for k in converted if k not in expected and not any(i in k for i in ignored)]
    converted = {k: v for k, v in converted.items() if k in expected}
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in converted.items() if tuple(v.shape) != tuple(expected[k].shape)]
    raise_for_key_problems("WanVideoAsPromptTransformer3DModel", sorted(set(expected) - set(converted)), unexpected,
                           wrong)
    converted = cast_state_dict(converted, torch_dtype, getattr(model, "_keep_in_fp32_modules", None))
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def read_vap_transformer(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and ``config.json`` of a release ``transformer/`` folder (single file or shards), or one file."""
    path = Path(path)
    cfg: dict[str, Any] = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            cfg = read_json(path / "config.json", "transformer config")
        index = path / "diffusion_pytorch_model.safetensors.index.json"
        single = path / "diffusion_pytorch_model.safetensors"
        weights = index if index.is_file() else single
        if not weights.is_file():
            raise ConversionError(f"{path}: no diffusion_pytorch_model*.safetensors in this transformer folder")
    else:
        weights = path
    return load_state_dict(weights), cfg


def is_vap_release(src: str | os.PathLike) -> bool:
    """Whether ``src`` is a Video-As-Prompt release folder (``transformer/config.json`` names its MoT class)."""
    cfg = Path(src) / "transformer" / "config.json"
    if not cfg.is_file():
        return False
    try:
        config = read_json(cfg, "transformer config")
    except ConversionError:  # not readable JSON: not a Video-As-Prompt release (the core converter reports it)
        return False
    return isinstance(config, dict) and config.get("_class_name") == RELEASE_TRANSFORMER_CLASS


#: Release component folders copied as they are (already Diffusers / Transformers format).
COPIED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor", "scheduler")


def convert_vap_release(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "bf16",
                        overwrite: bool = False, max_shard_size: str = "5GB") -> Path:
    """Convert a Video-As-Prompt release folder into a folder that loads as
    :class:`~diffusers_wan_ext.WanVideoAsPromptPipeline` (``DiffusionPipeline.from_pretrained``).

    The transformer is converted to :class:`WanVideoAsPromptTransformer3DModel` (stored in ``dtype``; modules Diffusers
    keeps in fp32 stay fp32); the other components are already Diffusers / Transformers folders and are copied.
    The result is assembled in a temporary folder and moved into place when complete.

    Example:
        >>> convert_vap_release("Video-As-Prompt-Wan2.1-14B", "Video-As-Prompt-Wan2.1-14B-ext")  # doctest: +SKIP
    """
    src = Path(src)
    if not is_vap_release(src):
        raise ConversionError(
            f"{src}: not a Video-As-Prompt release (expected transformer/config.json with _class_name "
            f"{RELEASE_TRANSFORMER_CLASS})"
        )
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    missing = [c for c in ("vae", "text_encoder", "tokenizer", "scheduler") if not (src / c).is_dir()]
    if missing:
        raise ConversionError(f"{src}: missing component folder(s) {', '.join(missing)} of the release")
    transformer = load_vap_transformer(src / "transformer", torch_dtype=DTYPES[dtype])
    if transformer.config.image_dim is not None and not (src / "image_encoder").is_dir():
        raise ConversionError(f"{src}: the transformer has a CLIP branch but the release has no image_encoder/ folder")
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        transformer.save_pretrained(tmp / "transformer", max_shard_size=max_shard_size)
        index: dict[str, Any] = {"_class_name": "WanVideoAsPromptPipeline", "_diffusers_version": diffusers.__version__}
        release_index = {}
        if (src / "model_index.json").is_file():
            release_index = read_json(src / "model_index.json", "model index")
        for name in COPIED_COMPONENTS:
            if (src / name).is_dir():
                shutil.copytree(src / name, tmp / name)
                index[name] = release_index.get(name) or _library_from_config(tmp / name)
            else:
                index[name] = [None, None]
        index["transformer"] = ["diffusers_wan_ext", "WanVideoAsPromptTransformer3DModel"]
        index.update(transformer_2=[None, None], boundary_ratio=None, expand_timesteps=False)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        rewrite_model_index_for_shims(tmp)
    return Path(dst)


def _library_from_config(folder: Path) -> list[str | None]:
    """``[library, class]`` of a copied component folder, from its config (Diffusers or Transformers)."""
    for name, library in (("config.json", None), ("scheduler_config.json", "diffusers"),
                          ("preprocessor_config.json", "transformers"), ("tokenizer_config.json", "transformers")):
        f = folder / name
        if not f.is_file():
            continue
        cfg = read_json(f, "component config")
        if "_class_name" in cfg:
            return ["diffusers", cfg["_class_name"]]
        if "architectures" in cfg:
            return ["transformers", cfg["architectures"][0]]
        if "image_processor_type" in cfg:
            return ["transformers", cfg["image_processor_type"]]
        if "tokenizer_class" in cfg:
            return ["transformers", cfg["tokenizer_class"]]
    raise ConversionError(f"{folder}: cannot tell which class this component folder holds (no known config)")
