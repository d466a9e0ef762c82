"""fp8 transformer folders that keep each weight's scale: Diffusers' ``TorchAoConfig`` serialization.

A model loaded with :func:`~diffusers_wan_ext.conversion.quantized_dit.load_quantized_dit` from an fp8 file holds
:class:`~diffusers_wan_ext.models.quantized_linear.Fp8Linear` layers (the stored fp8 weight and its float32 scale).
:func:`save_torchao_fp8_transformer` writes them as torchao ``Float8Tensor`` weights -- ``qdata`` the stored fp8
values bit for bit, ``scale`` the file's scale repeated per output row (``block_size [1, in]``, the per-row layout of
torchao's ``Float8WeightOnlyConfig``) -- through Diffusers' own ``save_pretrained`` of a ``TorchAoConfig`` model
(Diffusers 0.42 with torchao >= 0.16: safetensors ``<module>._weight_qdata`` / ``<module>._weight_scale`` plus the
tensor metadata torchao's ``flatten_tensor_state_dict`` writes, ``quantization_config`` in ``config.json``).  Stock
``Cls.from_pretrained(folder, torch_dtype=...)`` loads it back with those very tensors; without torchao Diffusers
refuses it ("requires the torchao library"), and :func:`load_torchao_fp8_folder` reads it into ``Fp8Linear`` layers
instead (the same values).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from ..models.quantized_linear import Fp8Linear, Fp8Storage
from ..utils.io import ConversionError
from .quantized_layers import keeps_fp32

__all__ = ["TORCHAO_MIN_VERSION", "dequantize_torchao_tensors", "load_torchao_fp8_folder", "require_torchao", "save_torchao_fp8_transformer",
           "torchao_state_dict", "torchao_version"]

#: the torchao release from which Diffusers serializes its tensors to safetensors (``get_state_dict_and_metadata``)
TORCHAO_MIN_VERSION = (0, 16)
QDATA, SCALE = "._weight_qdata", "._weight_scale"


def torchao_version() -> tuple[int, ...] | None:
    """The installed torchao version as integers, ``None`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("torchao")
    except PackageNotFoundError:
        return None
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def require_torchao(what: str) -> None:
    """One-line :class:`ConversionError` naming ``what`` unless torchao >= 0.16 is installed."""
    found = torchao_version()
    if found is None or found < TORCHAO_MIN_VERSION:
        have = "not installed" if found is None else "version " + ".".join(map(str, found))
        raise ConversionError(f"{what} needs torchao >= {'.'.join(map(str, TORCHAO_MIN_VERSION))} (torchao is "
                              f"{have}: pip install torchao), or use the layerwise-casting fp8 storage")


def _float8_weight(layer: Fp8Linear, torch_dtype: torch.dtype):
    """The layer's stored fp8 weight and its scale (one per output row) as a torchao ``Float8Tensor``."""
    from torchao.quantization import Float8Tensor

    out_features, in_features = layer.weight.shape
    scale = layer.weight_scale.detach().to(torch.float32).reshape(-1, 1).expand(out_features, 1).contiguous()
    return Float8Tensor(layer.weight.detach(), scale, block_size=[1, in_features], dtype=torch_dtype)


def torchao_state_dict(model: nn.Module, torch_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors in Diffusers names: each :class:`Fp8Linear` weight a torchao ``Float8Tensor`` (its scale
    inside, the layer's ``input_scale`` dropped), everything else in ``torch_dtype`` (float32 where Diffusers keeps
    it)."""
    keep = getattr(model, "_keep_in_fp32_modules", None)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in layers and leaf in ("weight_scale", "input_scale"):
            continue
        if module in layers and leaf == "weight":
            out[key] = _float8_weight(layers[module], torch_dtype)
        elif t.is_floating_point():
            out[key] = t.to(torch.float32 if keeps_fp32(key, keep) and torch_dtype != torch.float32 else torch_dtype)
        else:
            out[key] = t
    return out


def save_torchao_fp8_transformer(model: nn.Module, folder: str | os.PathLike, torch_dtype: torch.dtype,
                                 max_shard_size: str = "5GB") -> dict[str, Any]:
    """Write a model with :class:`Fp8Linear` layers as a Diffusers ``TorchAoConfig`` folder (``config.json`` with
    its ``quantization_config``, safetensors of torchao ``Float8Tensor`` weights); returns a summary for the folder's
    note.  The weights keep their file's scales exactly; ``torch_dtype`` is the compute dtype and the dtype of the
    other tensors.  Needs torchao >= 0.16 (a one-line :class:`ConversionError` otherwise)."""
    from diffusers import TorchAoConfig
    from diffusers.quantizers.torchao import TorchAoHfQuantizer
    from torchao.quantization import Float8WeightOnlyConfig

    require_torchao("the torchao fp8 storage")
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    fp8_types = sorted({str(m.weight.dtype).replace("torch.", "") for m in layers})
    if len(fp8_types) != 1:
        raise ConversionError(f"{type(model).__name__}: fp8 weights of {len(fp8_types)} types ({', '.join(fp8_types)})"
                              "; the torchao storage writes one")
    tensors = torchao_state_dict(model, torch_dtype)
    config = TorchAoConfig(Float8WeightOnlyConfig(weight_dtype=getattr(torch, fp8_types[0])))
    # built as Diffusers' from_pretrained builds a quantized model: the quantization config among the config's values
    with init_empty_weights():
        fresh = type(model).from_config({**model.config, "quantization_config": config})
    fresh.load_state_dict(tensors, strict=True, assign=True)
    quantizer = TorchAoHfQuantizer(config, pre_quantized=False)
    quantizer.validate_environment(device_map=None)
    quantizer.preprocess_model(fresh, device_map=None, keep_in_fp32_modules=list(fresh._keep_in_fp32_modules or []))
    fresh.hf_quantizer = quantizer
    fresh.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    scaled = sum(int(not bool((m.weight_scale == 1).all())) for m in layers)
    return {"storage_dtype": fp8_types[0], "fp8_layers": len(layers), "scaled_layers": scaled}


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise ConversionError(f"{folder}: no diffusion_pytorch_model*.safetensors (an incomplete torchao folder)")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(str(path)))
    return tensors


def _fp8_layer(module: str, tensors: dict[str, torch.Tensor], compute_dtype: torch.dtype, folder: Path) -> Fp8Linear:
    qdata, scale = tensors.pop(module + QDATA), tensors.pop(module + SCALE, None)
    if scale is None:
        raise ConversionError(f"{folder}: {module}{QDATA} has no {module}{SCALE} beside it")
    if qdata.ndim != 2 or scale.numel() not in (1, qdata.shape[0]):
        raise ConversionError(f"{folder}: {module}{SCALE} of shape {tuple(scale.shape)} does not fit "
                              f"{module}{QDATA} of shape {tuple(qdata.shape)} (one scale per output row expected)")
    if bool((scale == scale.reshape(-1)[0]).all()):
        scale = scale.reshape(-1)[0]  # a per-tensor scale written per row
    bias = tensors.pop(module + ".bias", None)
    return Fp8Linear.from_quantized(qdata, scale.float(), None if bias is None else bias.to(compute_dtype),
                                    compute_dtype=compute_dtype)


def dequantize_torchao_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchao folder's safetensors tensors with each ``<module>._weight_qdata`` / ``<module>._weight_scale`` pair
    turned into ``<module>.weight`` (float32 ``qdata * scale``); any other state dict is returned as it is."""
    if not any(k.endswith(QDATA) for k in tensors):
        return tensors
    out = {k: v for k, v in tensors.items() if not k.endswith((QDATA, SCALE))}
    for key in (k for k in tensors if k.endswith(QDATA)):
        module = key[: -len(QDATA)]
        if module + SCALE not in tensors:
            raise ConversionError(f"{key}: no {module}{SCALE} beside it")
        out[module + ".weight"] = tensors[key].float() * tensors[module + SCALE].float().reshape(-1, 1)
    return out


def load_torchao_fp8_folder(folder: str | os.PathLike, model_class: type, torch_dtype: torch.dtype) -> nn.Module:
    """Read a folder :func:`save_torchao_fp8_transformer` wrote: with torchao >= 0.16 through stock
    ``model_class.from_pretrained`` (torchao ``Float8Tensor`` weights), else into :class:`Fp8Linear` layers holding
    the same fp8 values and scales (the model carries :class:`Fp8Storage`, as :func:`load_quantized_dit`'s)."""
    folder = Path(folder)
    found = torchao_version()
    if found is not None and found >= TORCHAO_MIN_VERSION:
        return model_class.from_pretrained(str(folder), torch_dtype=torch_dtype)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    with init_empty_weights():  # parameters on meta, buffers (RoPE tables) real
        model = model_class.from_config(config)
    tensors = _folder_tensors(folder)
    keep = getattr(model, "_keep_in_fp32_modules", None)
    for module in sorted(k[: -len(QDATA)] for k in tensors if k.endswith(QDATA)):
        parent, _, child = module.rpartition(".")
        try:
            target = model.get_submodule(parent) if parent else model
            getattr(target, child)
        except AttributeError:
            raise ConversionError(f"{folder}: {module}{QDATA} names no layer of {model_class.__name__}") from None
        setattr(target, child, _fp8_layer(module, tensors, torch_dtype, folder))
    plain = {k: v.to(torch.float32 if keeps_fp32(k, keep) and torch_dtype != torch.float32 else torch_dtype)
             if v.is_floating_point() else v for k, v in tensors.items()}
    unexpected = model.load_state_dict(plain, strict=False, assign=True).unexpected_keys
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unexpected or left:
        raise ConversionError(f"{folder}: {'unexpected' if unexpected else 'missing'} tensor "
                              f"{(unexpected or left)[0]} for {model_class.__name__}")
    model.is_quantized = True
    model.hf_quantizer = Fp8Storage()
    return model.requires_grad_(False)
