"""Quantized frozen base weights for LoRA training.

Two ways, both leave the LoRA (and everything trained) in ``--trainable_dtype``:

* a quantized DiT single file as the base (``--transformer_path model-Q8_0.gguf`` or a (scaled) fp8
  ``.safetensors``): :func:`~diffusers_wan_ext.conversion.quantized_dit.load_quantized_dit` keeps its Linear weights
  packed (Diffusers' ``GGUFLinear`` / our ``Fp8Linear``), PEFT wraps those layers, each forward dequantizes per
  layer -- the base stays quantized for the whole run (full fine-tuning loads such a file dequantized, as before);
* DiffSynth-Studio's ``--quant_options "dit:<method>[/<excluded modules>]"``: the trained transformer's frozen
  Linear layers inside its blocks are quantized after loading by bitsandbytes (``bitsandbytes_nf4``,
  ``bitsandbytes_fp4``, ``bitsandbytes_int8``) or torchao (``torchao_int8_w8a16``), where that package is installed
  (it is an optional dependency: an error names the package otherwise).  Both run on CPU too: torchao's int8
  weight-only tensors, and bitsandbytes from 0.47 (its CPU backend; 0.46 has no CPU fp4).

Example:
    >>> parse_quant_options("dit:bitsandbytes_nf4/proj_out")
    [QuantOption(model='dit', method='bitsandbytes_nf4', exclude=('proj_out',))]
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import is_bitsandbytes_available, is_torchao_available
from torch import nn

__all__ = ["BITSANDBYTES_CPU_MIN_VERSION", "QUANT_METHODS", "QuantOption", "is_quantized_single_file",
           "parse_quant_options", "quant_package_missing", "quantize_frozen_linears"]

#: method -> the package it needs
QUANT_METHODS = {
    "bitsandbytes_nf4": "bitsandbytes",
    "bitsandbytes_fp4": "bitsandbytes",
    "bitsandbytes_int8": "bitsandbytes",
    "torchao_int8_w8a16": "torchao",
}
#: the bitsandbytes release whose CPU backend runs all three methods (0.46.1 quantizes nf4 / int8 on CPU, not fp4)
BITSANDBYTES_CPU_MIN_VERSION = (0, 47)


@dataclass(frozen=True)
class QuantOption:
    """One ``--quant_options`` entry: the model (DiffSynth-Studio name), the method, module names left alone."""

    model: str
    method: str
    exclude: tuple[str, ...] = ()


def parse_quant_options(value: str) -> list[QuantOption]:
    """``"dit:bitsandbytes_nf4;dit2:torchao_int8_w8a16/proj_out,head"`` -> entries; a bad entry or an unknown
    method is a ``ValueError`` naming it."""
    out = []
    for entry in (e.strip() for e in value.split(";")):
        if not entry:
            continue
        model, sep, rest = entry.partition(":")
        method, _, exclude = rest.partition("/")
        if not sep or not model.strip() or not method.strip():
            raise ValueError(f"--quant_options {entry!r}: expected <model>:<method>[/<excluded modules>]")
        if method.strip() not in QUANT_METHODS:
            raise ValueError(f"--quant_options {entry!r}: unknown method {method.strip()!r}; choose from "
                             f"{', '.join(QUANT_METHODS)}")
        names = tuple(n.strip() for n in exclude.split(",") if n.strip())
        out.append(QuantOption(model.strip(), method.strip(), names))
    return out


def quant_package_missing(method: str) -> str | None:
    """The package ``method`` needs when it is not installed, else ``None``; without CUDA, a bitsandbytes older than
    :data:`BITSANDBYTES_CPU_MIN_VERSION` counts as missing (``"bitsandbytes>=0.47"``)."""
    package = QUANT_METHODS[method]
    available = is_bitsandbytes_available() if package == "bitsandbytes" else is_torchao_available()
    if not available:
        return package
    if package == "bitsandbytes" and not torch.cuda.is_available():
        try:
            found = tuple(int(p) for p in version("bitsandbytes").split(".")[:2] if p.isdigit())
        except PackageNotFoundError:  # importable without metadata (a source checkout): trust it
            return None
        if found < BITSANDBYTES_CPU_MIN_VERSION:
            return "bitsandbytes>=" + ".".join(map(str, BITSANDBYTES_CPU_MIN_VERSION))
    return None


def is_quantized_single_file(path: str | os.PathLike | None) -> bool:
    """A ``.gguf`` file, or a ``.safetensors`` file holding float8 tensors (read from its header only)."""
    if path is None:
        return False
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".gguf":
        return True
    if path.suffix != ".safetensors":
        return False
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return False
    return any(isinstance(v, dict) and str(v.get("dtype", "")).startswith("F8") for v in header.values())


def _frozen_block_linears(module: nn.Module, exclude: tuple[str, ...]) -> list[str]:
    pattern = re.compile(r"(^|\.)[a-z_]*blocks\.\d+\.")
    return [name for name, sub in module.named_modules()
            if type(sub) is nn.Linear and pattern.search(name) and not sub.weight.requires_grad
            and not any(name == e or name.endswith("." + e) or f".{e}." in f".{name}." for e in exclude)]


def _bitsandbytes_layer(linear: nn.Linear, method: str, compute_dtype: torch.dtype,
                        device: torch.device | str) -> nn.Module:
    """The bitsandbytes layer for ``linear``, quantized on ``device`` (bitsandbytes quantizes a weight when it moves
    from the CPU to a device, that device the CPU included)."""
    import bitsandbytes as bnb  # optional dependency

    weight = linear.weight.detach().cpu()
    bias = linear.bias is not None
    if method == "bitsandbytes_int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        kind = "nf4" if method == "bitsandbytes_nf4" else "fp4"
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  quant_type=kind)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=kind)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    layer = layer.to(device)
    stored = layer.weight
    if not (getattr(stored, "bnb_quantized", False) or stored.dtype == torch.int8):
        raise RuntimeError(f"bitsandbytes left a {method} weight unquantized on {device} ({stored.dtype})")
    return layer


def quantize_frozen_linears(module: nn.Module, option: QuantOption, compute_dtype: torch.dtype,
                            device: torch.device | str) -> int:
    """Quantize the frozen plain ``nn.Linear`` layers inside ``module``'s blocks with ``option.method`` (before the
    LoRA goes in); bitsandbytes layers are quantized on ``device`` (CUDA or CPU), torchao's where the layers are.
    Returns the number of layers quantized."""
    missing = quant_package_missing(option.method)
    if missing:
        raise ValueError(f"--quant_options {option.model}:{option.method}: {missing} is not installed "
                         f"(pip install {missing})")
    names = _frozen_block_linears(module, option.exclude)
    if option.method.startswith("torchao"):
        from torchao.quantization import quantize_  # optional dependency

        try:
            from torchao.quantization import Int8WeightOnlyConfig

            config = Int8WeightOnlyConfig()
        except ImportError:  # older torchao
            from torchao.quantization import int8_weight_only

            config = int8_weight_only()
        chosen = set(names)
        quantize_(module, config, filter_fn=lambda m, fqn: fqn in chosen)
        return len(names)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, _bitsandbytes_layer(getattr(owner, child), option.method, compute_dtype, device))
    return len(names)
