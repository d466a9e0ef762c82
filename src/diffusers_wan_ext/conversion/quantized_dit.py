"""Load a Wan DiT single file with its Linear weights kept quantized (GGUF blocks / fp8 + scale) in memory.

:func:`load_quantized_dit` is :func:`~diffusers_wan_ext.conversion.dit.load_dit_from_original` for memory: the
file is read raw (:func:`~diffusers_wan_ext.utils.single_file.read_quantized`), the family and config come from the
logical shapes, keys are renamed by the same DiT key tables (every registered family), and

* a GGUF ``Linear`` weight of a type Diffusers dequantizes in torch (``Q8_0``, ``Q4_0`` .. ``Q2_K``, ``IQ4_*``;
  ``BF16`` loads as a plain tensor, as F16 / F32 do) stays in its packed bytes in a Diffusers ``GGUFLinear`` (the model carries Diffusers' ``GGUFQuantizer``,
  as ``from_single_file(..., quantization_config=GGUFQuantizationConfig(...))`` gives it: ``save_pretrained`` is
  refused, ``.to(dtype)`` too);
* an fp8 ``Linear`` weight (plain or scaled) stays fp8 with its float32 scale in an
  :class:`~diffusers_wan_ext.models.quantized_linear.Fp8Linear` (the model's ``hf_quantizer`` is an
  :class:`~diffusers_wan_ext.models.quantized_linear.Fp8Storage`: ``save_pretrained`` and ``.to(dtype)`` are refused
  as for GGUF, ``model.dequantize()`` gives plain Linears);
* everything else (norms, embeddings, the Conv3d patch embedding, modulation tables, Linears under Diffusers'
  ``_keep_in_fp32_modules`` such as the time embedder, GGUF types without a torch kernel) is dequantized at load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import init_empty_weights
from torch import nn

from .. import models as package_models
from ..models.quantized_linear import Fp8Linear, Fp8Storage, is_gguf_parameter
from ..utils.io import ConversionError, naming, strip_known_prefixes
from ..utils.gguf_files import read_gguf, write_gguf_stored
from ..utils.quantized_tensor import FP8_DTYPES, QuantizedTensor
from ..utils.single_file import read_quantized
from .dit import (
    DitInfo,
    build_transformer,
    check_shapes,
    convert_dit_state_dict,
    dit_config_from_state_dict,
    dit_extensions,
    load_dit_from_original,
    locate_dit,
    rename_dit_key,
    restore_unit_dims,
)
from .quantized_layers import assign_quantized_state, gguf_packed, keeps_fp32
from .longcat import is_longcat_state_dict
from .quantized_longcat import quantized_longcat_from_tensors
from .quantized_text_encoder import load_quantized_text_encoder_folder
from .quantized_torchao import load_torchao_fp8_folder, require_torchao, save_torchao_fp8_transformer

__all__ = ["FP8_STORAGES", "GGUF_FOLDER_WEIGHTS", "PACKAGE_LOADER", "QUANTIZED_FOLDER_NOTE", "SINGLE_FILE_SUFFIXES",
           "check_fp8_storage", "check_kept_quantized", "is_single_file", "kept_quantized_kind", "load_quantized_dit",
           "load_quantized_folder", "quantized_dit_from_tensors", "read_quantized_dit", "save_quantized_transformer", "save_transformer",
           "unscaled_fp8_weight"]

#: files :func:`load_quantized_dit` keeps quantized (anything else loads dequantized as with load_dit_from_original)
SINGLE_FILE_SUFFIXES = (".gguf", ".safetensors")


def is_single_file(path: str | os.PathLike) -> bool:
    """``True`` for a ``.gguf`` / ``.safetensors`` file (not a folder or a shard index)."""
    return Path(path).is_file() and Path(path).name.endswith(SINGLE_FILE_SUFFIXES)


def read_quantized_dit(path: str | os.PathLike) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """The stored tensors of a DiT single file (wrapper prefixes stripped, original key names, nothing dequantized)
    and the release ``config.json`` beside it, if any."""
    weights, cfg = locate_dit(path)
    tensors, _ = read_quantized(weights)
    return restore_unit_dims(strip_known_prefixes(tensors, "blocks.")), cfg


def shape_state_dict(tensors: Mapping[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Meta tensors of the logical shapes (what config detection and key checks need, no memory)."""
    return {k: torch.empty(q.shape, dtype=torch.float32, device="meta") for k, q in tensors.items()}


def _adapter_keys(keys) -> set[str]:
    """Keys a family converts by rules rather than tables (Animate's adapter): loaded dequantized."""
    return {k for k in keys for e in dit_extensions() if e.adapter_keys is not None and e.adapter_keys(k)}


def _plain_value(q: QuantizedTensor, name: str, torch_dtype: torch.dtype | None, keep_in_fp32) -> torch.Tensor:
    if not q.data.is_floating_point() and not q.is_quantized:
        return q.dequantize()
    value = q.dequantize(torch.float32 if q.is_quantized else q.data.dtype)
    if torch_dtype is None:
        return value.to(torch.float16) if q.is_quantized and value.dtype == torch.float32 else value
    if keeps_fp32(name, keep_in_fp32) and torch_dtype in (torch.float16, torch.bfloat16):
        return value.to(torch.float32)
    return value.to(torch_dtype)


def _quantized_linears(model: nn.Module, tensors: Mapping[str, QuantizedTensor], renamed: Mapping[str, str],
                       keep_in_fp32) -> tuple[dict[str, tuple[torch.Tensor, str]], dict[str, QuantizedTensor]]:
    """``({diffusers weight key: (GGUF blocks, type)}, {diffusers weight key: fp8 tensor})``: the Linears kept
    packed."""
    gguf_weights, fp8_weights = {}, {}
    for key, new in renamed.items():
        q = tensors[key]
        module_name, _, leaf = new.rpartition(".")
        if leaf != "weight" or not q.is_quantized or keeps_fp32(new, keep_in_fp32):
            continue
        if not isinstance(model.get_submodule(module_name), nn.Linear):
            continue
        if q.qtype in FP8_DTYPES:
            fp8_weights[new] = q
        elif (packed := gguf_packed(q)) is not None:
            gguf_weights[new] = (packed, q.qtype)
    return gguf_weights, fp8_weights


def _attach_fp8(model: nn.Module, fp8_weights: Mapping[str, QuantizedTensor], plain: dict[str, torch.Tensor],
                compute_dtype: torch.dtype) -> None:
    """Swap each Linear for an :class:`Fp8Linear` holding the stored fp8 weight, its scale and the bias."""
    for key, q in fp8_weights.items():
        module_name = key.rpartition(".")[0]
        parent, _, child = module_name.rpartition(".")
        layer = Fp8Linear.from_quantized(q.data.reshape(q.shape), q.scale, plain.pop(f"{module_name}.bias", None),
                                         compute_dtype=compute_dtype, input_scale=q.input_scale)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    if fp8_weights:  # Diffusers then refuses save_pretrained and dtype casts, as for a GGUF model
        model.is_quantized = True
        model.hf_quantizer = Fp8Storage()


def _adapter_state_dict(tensors: Mapping[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """The keys a family converts by rules (Animate's adapter), dequantized to float32 and converted."""
    adapters = _adapter_keys(tensors)
    out: dict[str, torch.Tensor] = {}
    for e in dit_extensions():
        mine = {k: tensors[k].dequantize(torch.float32) for k in adapters if e.adapter_keys and e.adapter_keys(k)}
        if mine:
            out.update(e.convert_adapter(mine))
    return out


def _cast(name: str, value: torch.Tensor, torch_dtype: torch.dtype, keep_in_fp32) -> torch.Tensor:
    if not value.is_floating_point():
        return value
    keep = keeps_fp32(name, keep_in_fp32) and torch_dtype in (torch.float16, torch.bfloat16)
    return value.to(torch.float32 if keep else torch_dtype)


def quantized_dit_from_tensors(tensors: Mapping[str, QuantizedTensor], info: DitInfo,
                               torch_dtype: torch.dtype = torch.bfloat16,
                               device: torch.device | str | None = None) -> nn.Module:
    """Build the Diffusers transformer of ``info`` from stored tensors (original names, prefixes stripped), keeping
    the quantized Linear weights packed; ``torch_dtype`` is the compute dtype and the dtype of everything else."""
    adapters = _adapter_keys(tensors)
    adapter_sd = _adapter_state_dict(tensors)
    base = {k: q for k, q in tensors.items() if k not in adapters}
    converted = convert_dit_state_dict(shape_state_dict(base))  # names checked (errors name the keys)
    model = build_transformer(info)
    check_shapes(model, {**converted, **adapter_sd})
    renamed = {k: rename_dit_key(k) for k in base}
    keep = getattr(model, "_keep_in_fp32_modules", None)
    gguf_weights, fp8_weights = _quantized_linears(model, base, renamed, keep)
    packed = set(gguf_weights) | set(fp8_weights)
    plain = {new: _plain_value(base[key], new, torch_dtype, keep) for key, new in renamed.items() if new not in packed}
    plain.update({k: _cast(k, v, torch_dtype, keep) for k, v in adapter_sd.items()})
    _attach_fp8(model, fp8_weights, plain, torch_dtype)
    assign_quantized_state(model, plain, gguf_weights, torch_dtype, keep, type(model).__name__)
    return (model.to(device) if device is not None else model).eval()


def load_quantized_dit(path: str | os.PathLike, original_config: Mapping[str, Any] | None = None,
                       torch_dtype: torch.dtype = torch.bfloat16,
                       device: torch.device | str | None = None) -> nn.Module:
    """A Diffusers Wan transformer from a DiT single file with its Linear weights kept quantized in memory.

    GGUF weights stay packed in Diffusers ``GGUFLinear`` layers (dequantized per layer at compute, as stock
    ``from_single_file(..., quantization_config=GGUFQuantizationConfig(compute_dtype=torch_dtype))``); fp8 weights
    (plain or scaled, either convention) stay fp8 with their scale in
    :class:`~diffusers_wan_ext.models.quantized_linear.Fp8Linear` layers.  Every other tensor is dequantized to
    ``torch_dtype`` (Diffusers' ``_keep_in_fp32_modules`` stay float32).  Any family the DiT converter knows works
    (the key tables of :func:`~diffusers_wan_ext.conversion.dit.dit_key_tables`), and LongCat-Video
    (:func:`~diffusers_wan_ext.conversion.quantized_longcat.quantized_longcat_from_tensors`).  A folder, a shard index or a
    ``.pth`` file holds nothing quantized: it loads as :func:`load_dit_from_original` would.

    Args:
        path: the ``.gguf`` / ``.safetensors`` file (any ComfyUI / Kijai prefix), or a release folder.
        original_config: the release ``config.json`` values the keys cannot tell (``num_heads`` ...), if any.
        torch_dtype: the compute dtype and the dtype of the unquantized tensors.
        device: where to put the model (the packed weights move packed).

    Example:
        >>> dit = load_quantized_dit("wan2.1-t2v-14b-Q4_K_M.gguf", torch_dtype=torch.bfloat16, device="cuda")  # doctest: +SKIP
        >>> quantized_weight_bytes(dit) / 2**30  # doctest: +SKIP
    """
    if torch_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"torch_dtype {torch_dtype}: the compute dtype must be float32, float16 or bfloat16")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r}: not a torch device ({str(e).splitlines()[0]})") from None
    weights, cfg = locate_dit(path)
    if not is_single_file(weights):
        model = load_dit_from_original(path, original_config, torch_dtype)
        return (model.to(device) if device is not None else model).eval()
    with naming(weights):  # a key / shape error names the file
        tensors, cfg = read_quantized_dit(weights)
        if is_longcat_state_dict(tensors):  # its own key map (fused projections cut by rows, stored data kept)
            model = quantized_longcat_from_tensors(tensors, original_config or cfg, torch_dtype)
            return model.to(device) if device is not None else model
        info = dit_config_from_state_dict(shape_state_dict(tensors), original_config or cfg)
        return quantized_dit_from_tensors(tensors, info, torch_dtype, device)


# ------------------------------------------------------------------------------------ Diffusers folders, kept quantized
#: the note written beside a transformer saved quantized: how stock Diffusers loads it back (read by
#: :func:`load_quantized_folder`)
QUANTIZED_FOLDER_NOTE = "quantized_weights.json"
#: the weights file of a GGUF transformer folder (Diffusers key names; loaded by ``from_single_file``)
GGUF_FOLDER_WEIGHTS = "diffusion_pytorch_model.gguf"
#: how :func:`save_quantized_transformer` stores fp8 weights: ``"layerwise"`` (fp8 without a scale, for
#: ``enable_layerwise_casting``) or ``"torchao"`` (torchao ``Float8Tensor`` weights with their scales, Diffusers'
#: ``TorchAoConfig`` serialization)
FP8_STORAGES = ("layerwise", "torchao")
#: the note's ``loader`` for a folder stock Diffusers cannot load (a GGUF of a class its ``from_single_file`` does
#: not take): only :func:`load_quantized_folder` reads it
PACKAGE_LOADER = "diffusers_wan_ext"


def kept_quantized_kind(model: nn.Module) -> str | None:
    """``"gguf"`` (Diffusers ``GGUFParameter`` weights), ``"fp8"`` (:class:`Fp8Linear` layers) or ``None``."""
    if any(is_gguf_parameter(p) for p in model.parameters()):
        return "gguf"
    return "fp8" if any(isinstance(m, Fp8Linear) for m in model.modules()) else None


def _gguf_loadable(model: nn.Module) -> bool:
    """Whether Diffusers' ``from_single_file`` takes this class (a subclass of one of its single-file classes)."""
    import diffusers
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    return any(isinstance(model, cls) for cls in (getattr(diffusers, n, None) for n in SINGLE_FILE_LOADABLE_CLASSES)
               if isinstance(cls, type))


def _gguf_folder_tensors(model: nn.Module, torch_dtype: torch.dtype) -> dict[str, torch.Tensor | tuple]:
    """Packed blocks as they are; the rest float32 (float16 for an fp16 model; float32 where Diffusers keeps it)."""
    keep = getattr(model, "_keep_in_fp32_modules", None)
    plain = torch.float16 if torch_dtype == torch.float16 else torch.float32
    out: dict[str, torch.Tensor | tuple] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if is_gguf_parameter(t):
            out[key] = (t.data.view(torch.uint8), t.quant_type.name)
        elif not t.is_floating_point():
            raise ConversionError(f"{type(model).__name__}: {key} is {t.dtype}; a GGUF folder holds float tensors")
        else:
            out[key] = t.detach().to(torch.float32 if keeps_fp32(key, keep) else plain)
    return out


def unscaled_fp8_weight(layer: Fp8Linear) -> torch.Tensor:
    """The weight in the layer's fp8 type without a scale (what layerwise casting stores): the stored values when
    the scale is 1, else ``weight * scale`` rounded once more to fp8 (clamped to its range)."""
    if bool((layer.weight_scale == 1).all()):
        return layer.weight.detach()
    fmax = torch.finfo(layer.weight.dtype).max
    return layer.dequantized_weight(torch.float32).clamp(-fmax, fmax).to(layer.weight.dtype)


def _fp8_folder_tensors(model: nn.Module, torch_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """Fp8Linear weights unscaled in fp8 (their scales dropped), the rest in ``torch_dtype``; and a summary."""
    keep = getattr(model, "_keep_in_fp32_modules", None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    fp8_types = sorted({str(m.weight.dtype).replace("torch.", "") for m in layers.values()})
    if len(fp8_types) > 1:
        raise ConversionError(f"{type(model).__name__}: fp8 weights of two types ({', '.join(fp8_types)}); "
                              "layerwise casting stores one: convert without --keep-quantized")
    out, rescaled = {}, 0
    for key, t in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in layers and leaf in ("weight_scale", "input_scale"):
            continue
        if module in layers and leaf == "weight":
            out[key] = unscaled_fp8_weight(layers[module])
            rescaled += int(not bool((layers[module].weight_scale == 1).all()))
        elif t.is_floating_point():
            out[key] = _own_storage(t.to(torch.float32 if keeps_fp32(key, keep) and torch_dtype != torch.float32
                                         else torch_dtype))
        else:
            out[key] = t
    return out, {"storage_dtype": fp8_types[0], "fp8_layers": len(layers), "rounded_again": rescaled}


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when it is a view of part of a larger storage (Animate's ``to_k`` / ``to_v``, cut from the
    file's fused ``linear1_kv``), which safetensors refuses to save."""
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _gguf_note(model: nn.Module, folder: Path, torch_dtype: torch.dtype, note: dict[str, Any]) -> None:
    cls, dtype = type(model).__name__, note["compute_dtype"]
    stored = write_gguf_stored(folder / GGUF_FOLDER_WEIGHTS, _gguf_folder_tensors(model, torch_dtype))
    types = list(stored.values())
    note.update(weights=GGUF_FOLDER_WEIGHTS, types={t: types.count(t) for t in sorted(set(types))})
    if _gguf_loadable(model):
        note["load"] = (f"{cls}.from_single_file('<folder>/{GGUF_FOLDER_WEIGHTS}', config='<folder>', "
                        f"quantization_config=GGUFQuantizationConfig(compute_dtype=torch.{dtype}), "
                        f"torch_dtype=torch.{dtype})")
    else:  # Diffusers' from_single_file does not take the class: this package's loader only
        note.update(loader=PACKAGE_LOADER, load="diffusers_wan_ext.conversion.quantized_dit.load_quantized_folder("
                                                "'<folder>')")


def save_quantized_transformer(model: nn.Module, folder: str | os.PathLike, torch_dtype: torch.dtype,
                               max_shard_size: str = "5GB", fp8_storage: str = "layerwise") -> dict[str, Any]:
    """Save a transformer loaded quantized (:func:`load_quantized_dit`) as a Diffusers model folder that loads back
    quantized; returns the note written to :data:`QUANTIZED_FOLDER_NOTE` (its ``load`` is the call to use).

    * GGUF: ``config.json`` + :data:`GGUF_FOLDER_WEIGHTS`, the packed blocks copied byte for byte under the Diffusers
      key names (the rest F32, F16 for fp16).  For the classes Diffusers' ``from_single_file`` takes (the Wan / VACE /
      Animate transformers and their subclasses) stock Diffusers loads it: ``cls.from_single_file(folder /
      GGUF_FOLDER_WEIGHTS, config=folder, quantization_config=GGUFQuantizationConfig(compute_dtype=...))`` --
      Diffusers 0.42's ``from_pretrained`` has no GGUF route.  Other classes (S2V, LongCat ...): the same folder,
      read by :func:`load_quantized_folder` only (the note's ``loader`` says so), the blocks kept packed.
    * fp8, ``fp8_storage="layerwise"``: ``config.json`` + ``diffusion_pytorch_model*.safetensors`` holding each fp8
      Linear weight in fp8 without a scale (a scaled weight is rounded to fp8 once more: ``fp8(q * scale)``) and the
      rest in ``torch_dtype``, loaded by ``cls.from_pretrained(folder, torch_dtype=...)`` +
      ``enable_layerwise_casting(storage_dtype=fp8, compute_dtype=...)``, which stores those weights back in fp8 with
      the same values.
    * fp8, ``fp8_storage="torchao"``: Diffusers' ``TorchAoConfig`` folder of torchao ``Float8Tensor`` weights, each
      the stored fp8 values with the file's scale (nothing rounded again), loaded by stock
      ``cls.from_pretrained(folder, torch_dtype=...)`` where torchao >= 0.16 is installed
      (:mod:`~diffusers_wan_ext.conversion.quantized_torchao`; writing it needs torchao too).
    """
    from huggingface_hub import save_torch_state_dict

    check_fp8_storage(fp8_storage)
    check_kept_quantized([model])
    kind = kept_quantized_kind(model)
    cls = type(model).__name__
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    note: dict[str, Any] = {"storage": kind, "class": cls, "compute_dtype": _dtype_name(torch_dtype)}
    if kind == "gguf":
        _gguf_note(model, folder, torch_dtype, note)
    elif fp8_storage == "torchao":
        summary = save_torchao_fp8_transformer(model, folder, torch_dtype, max_shard_size)
        note.update(summary, storage="torchao",
                    load=f"{cls}.from_pretrained('<folder>', torch_dtype=torch.{note['compute_dtype']})  # torchao")
    else:
        tensors, summary = _fp8_folder_tensors(model, torch_dtype)
        save_torch_state_dict(tensors, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                              max_shard_size=max_shard_size)
        note.update(summary, load=f"{cls}.from_pretrained('<folder>', torch_dtype=torch.{note['compute_dtype']})"
                                  f".enable_layerwise_casting(storage_dtype=torch.{summary['storage_dtype']}, "
                                  f"compute_dtype=torch.{note['compute_dtype']})")
    if kind == "gguf" or fp8_storage != "torchao":  # the torchao folder's config.json is Diffusers' own
        model.save_config(folder)
    (folder / QUANTIZED_FOLDER_NOTE).write_text(json.dumps(note, indent=2) + "\n")
    return note


def check_fp8_storage(fp8_storage: str) -> None:
    """An fp8 storage :func:`save_quantized_transformer` knows, with what it needs installed (before loading)."""
    if fp8_storage not in FP8_STORAGES:
        raise ValueError(f"fp8_storage {fp8_storage!r}: expected one of {', '.join(FP8_STORAGES)}")
    if fp8_storage == "torchao":
        require_torchao("--fp8-storage torchao")


def check_kept_quantized(models: list[nn.Module]) -> None:
    """``--keep-quantized`` with a DiT that holds nothing quantized is an error, never a silently dequantized
    folder."""
    for model in models:
        if kept_quantized_kind(model) is None:
            raise ConversionError(f"--keep-quantized: the {type(model).__name__} holds no GGUF / fp8 weights to keep "
                                  "(give a GGUF or fp8 single-file DiT), or convert without --keep-quantized")


def save_transformer(model: nn.Module, folder: str | os.PathLike, torch_dtype: torch.dtype,
                     max_shard_size: str = "5GB", fp8_storage: str = "layerwise") -> None:
    """:func:`save_quantized_transformer` for a model holding GGUF / fp8 weights, else ``save_pretrained``."""
    if kept_quantized_kind(model) is not None:
        save_quantized_transformer(model, folder, torch_dtype, max_shard_size, fp8_storage)
    else:
        model.save_pretrained(folder, max_shard_size=max_shard_size)


def _model_class(folder: Path, config: Mapping[str, Any]) -> type:
    """The class ``config.json`` names: Diffusers' own, else this package's."""
    import diffusers

    name = config.get("_class_name", "")
    name = name[-1] if isinstance(name, list) else name
    cls = getattr(diffusers, name, None) or getattr(package_models, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"{folder}: {name!r} is neither a Diffusers nor a diffusers_wan_ext class; pass model_class=")
    return cls


def _load_gguf_folder(folder: Path, cls: type, dtype: torch.dtype) -> nn.Module:
    """A GGUF folder of a class Diffusers' ``from_single_file`` does not take: the model built from ``config.json``,
    the folder's blocks (Diffusers key names) attached packed as :func:`load_quantized_dit` attaches them."""
    tensors, _ = read_gguf(folder / GGUF_FOLDER_WEIGHTS)
    with init_empty_weights():  # parameters on meta, buffers (RoPE tables) real
        model = cls.from_config(cls.load_config(str(folder)))
    keep = getattr(model, "_keep_in_fp32_modules", None)
    names = dict(model.named_parameters())
    names.update(model.named_buffers())
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise ConversionError(f"{folder / GGUF_FOLDER_WEIGHTS}: {unknown[0]} is not a tensor of {cls.__name__}")
    gguf_weights, _ = _quantized_linears(model, tensors, {k: k for k in tensors}, keep)
    plain = {k: _plain_value(q, k, dtype, keep) for k, q in tensors.items() if k not in gguf_weights}
    return assign_quantized_state(model, plain, gguf_weights, dtype, keep,
                                  f"{folder / GGUF_FOLDER_WEIGHTS} ({cls.__name__})")


def load_quantized_folder(folder: str | os.PathLike, model_class: type | None = None,
                          torch_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a transformer folder :func:`save_quantized_transformer` wrote, as its :data:`QUANTIZED_FOLDER_NOTE`
    says: GGUF through stock ``from_single_file`` + ``GGUFQuantizationConfig`` (a class that route does not take:
    this package's reader, blocks kept packed in Diffusers ``GGUFLinear`` layers), fp8 through stock
    ``from_pretrained`` + ``enable_layerwise_casting``, torchao fp8 through stock ``from_pretrained`` (without
    torchao installed: into :class:`Fp8Linear` layers holding the same values and scales).  A kept-quantized umT5
    text encoder folder (the note's ``library`` is ``transformers``) is read by
    :func:`~diffusers_wan_ext.conversion.quantized_text_encoder.load_quantized_text_encoder_folder`.
    ``model_class``: default the class named in ``config.json`` (Diffusers', else this package's); ``torch_dtype``:
    default the compute dtype of the conversion."""
    import diffusers

    folder = Path(folder)
    try:
        note = json.loads((folder / QUANTIZED_FOLDER_NOTE).read_text())
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError as e:
        raise ConversionError(f"{folder}: no {Path(e.filename).name}; not a folder written with --keep-quantized "
                              "(load it with from_pretrained)") from None
    if note.get("library") == "transformers":  # a kept-quantized umT5 text encoder
        return load_quantized_text_encoder_folder(folder, torch_dtype)
    cls = model_class or _model_class(folder, config)
    dtype = torch_dtype or getattr(torch, note["compute_dtype"])
    if note["storage"] == "gguf" and note.get("loader") == PACKAGE_LOADER:
        model = _load_gguf_folder(folder, cls, dtype)
    elif note["storage"] == "gguf":
        model = cls.from_single_file(str(folder / GGUF_FOLDER_WEIGHTS), config=str(folder), torch_dtype=dtype,
                                     quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=dtype))
    elif note["storage"] == "torchao":
        model = load_torchao_fp8_folder(folder, cls, dtype)
    else:
        model = cls.from_pretrained(str(folder), torch_dtype=dtype)
        model.enable_layerwise_casting(storage_dtype=getattr(torch, note["storage_dtype"]), compute_dtype=dtype)
    return model.eval()
