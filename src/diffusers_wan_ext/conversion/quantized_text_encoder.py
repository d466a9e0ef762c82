"""The umT5 text encoder kept quantized: ComfyUI's ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` (or any fp8 / scaled-fp8
umT5 file) and umT5 GGUFs (llama.cpp names, as city96's ComfyUI-GGUF reads them) as a transformers
``UMT5EncoderModel`` whose Linear weights stay as stored.

* fp8 ``Linear`` weights (plain or scaled, either convention) become
  :class:`~diffusers_wan_ext.models.quantized_linear.Fp8Linear` layers (the fp8 values and the float32 scale);
* GGUF ``Linear`` weights of a type Diffusers dequantizes in torch stay packed in Diffusers ``GGUFLinear`` layers;
* everything else -- the ``shared`` embedding, layer norms, the relative attention biases and the feed-forward ``wo``
  layers (transformers' ``_keep_in_fp32_modules``: UMT5 casts the hidden states to ``wo.weight.dtype`` before it,
  which would turn them into fp8) -- is dequantized to the compute dtype.

:func:`save_quantized_text_encoder` writes such a model as a folder only this package reads
(:func:`load_quantized_text_encoder_folder`): ``config.json`` (transformers), :data:`TEXT_ENCODER_FP8_WEIGHTS`
(transformers names, fp8 weights with their ``weight_scale`` / ``input_scale``) or :data:`TEXT_ENCODER_GGUF_WEIGHTS`
(the packed blocks byte for byte), and the ``quantized_weights.json`` note.  There is no ``model.safetensors``, so
stock ``UMT5EncoderModel.from_pretrained`` refuses the folder (it names the files it looked for) instead of loading
fp8 values without their scales.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..models.quantized_linear import Fp8Linear
from ..utils.gguf_files import read_gguf, write_gguf_stored
from ..utils.io import ConversionError, strip_known_prefixes
from ..utils.quantized_tensor import FP8_DTYPES, QuantizedTensor
from ..utils.single_file import holds_quantized_weights, read_quantized
from .quantized_layers import gguf_packed
from .text_encoder import (
    convert_t5_state_dict,
    empty_model,
    load_t5_from_original,
    t5_config_from_state_dict,
    t5_state_dict_to_original,
)

__all__ = ["TEXT_ENCODER_FP8_WEIGHTS", "TEXT_ENCODER_GGUF_WEIGHTS", "TEXT_ENCODER_NOTE", "is_quantized_text_encoder",
           "load_quantized_t5", "load_quantized_text_encoder_folder", "load_text_encoder", "quantized_t5_from_tensors",
           "save_component", "save_quantized_text_encoder"]

#: the note beside the weights (the same name as a kept-quantized transformer's)
TEXT_ENCODER_NOTE = "quantized_weights.json"
#: the weights files of a kept-quantized text encoder folder (names transformers does not look for)
TEXT_ENCODER_FP8_WEIGHTS = "text_encoder.fp8.safetensors"
TEXT_ENCODER_GGUF_WEIGHTS = "text_encoder.gguf"
#: Linear modules UMT5 keeps unquantized (``UMT5PreTrainedModel._keep_in_fp32_modules``)
KEEP_DEQUANTIZED = ("wo",)


def _ours_from_file(tensors: Mapping[str, QuantizedTensor]) -> tuple[dict[str, QuantizedTensor], Any]:
    """The stored tensors under ``UMT5EncoderModel`` names (Comfy's transformers names, llama.cpp GGUF names or the
    original release names) and the config their shapes give.  The key tables run on meta tensors of the stored
    shapes; every rule of the umT5 table is a plain rename, so each output is one of those very tensors."""
    tensors = strip_known_prefixes(dict(tensors), "blocks.")
    if "shared.weight" in tensors or "enc.blk.0.attn_q.weight" not in tensors:
        tensors.pop("encoder.embed_tokens.weight", None)  # the tied alias of shared.weight
    shapes = {k: torch.empty(q.shape, device="meta") for k, q in tensors.items() if q.qtype != "RAW"}
    source = {id(v): k for k, v in shapes.items()}
    original = t5_state_dict_to_original(shapes)
    config = t5_config_from_state_dict(original)
    ours = {k: tensors[source[id(v)]] for k, v in convert_t5_state_dict(original).items()}
    ours.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight by the model
    return ours, config


def _quantized_layer(q: QuantizedTensor, layer: nn.Linear, compute_dtype: torch.dtype) -> nn.Module | None:
    """An :class:`Fp8Linear` / Diffusers ``GGUFLinear`` holding ``q`` as stored, or ``None`` (dequantize it)."""
    if layer.bias is not None or not q.is_quantized:
        return None
    if q.qtype in FP8_DTYPES:
        return Fp8Linear.from_quantized(q.data.reshape(q.shape), q.scale, None, compute_dtype=compute_dtype,
                                        input_scale=q.input_scale)
    packed = gguf_packed(q)
    if packed is None:
        return None
    import gguf  # optional dependency (the `gguf` extra)
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    out = GGUFLinear(q.shape[1], q.shape[0], bias=False, compute_dtype=compute_dtype, device="meta")
    out.weight = GGUFParameter(packed, requires_grad=False, quant_type=gguf.GGMLQuantizationType[q.qtype])
    return out


def quantized_t5_from_tensors(tensors: Mapping[str, QuantizedTensor], config, torch_dtype: torch.dtype) -> nn.Module:
    """A ``UMT5EncoderModel`` of ``config`` from stored tensors under its own names, the quantized Linear weights
    kept (see the module docstring) and the rest dequantized to ``torch_dtype``."""
    from transformers import UMT5EncoderModel

    model, _ = empty_model(UMT5EncoderModel, config, torch_dtype)
    expected = set(model.state_dict()) - {"encoder.embed_tokens.weight"}
    unknown, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if unknown or missing:
        raise ConversionError(f"umT5 encoder: {'unexpected' if unknown else 'missing'} tensor "
                              f"{(unknown or missing)[0]}")
    plain: dict[str, torch.Tensor] = {}
    for key, q in tensors.items():
        module_name, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_name)
        if tuple(module.weight.shape if leaf == "weight" and hasattr(module, "weight") else q.shape) != tuple(q.shape):
            raise ConversionError(f"umT5 encoder: {key} has shape {tuple(q.shape)}, the model "
                                  f"{tuple(module.weight.shape)}")
        layer = None
        kept = module_name.rpartition(".")[2] not in KEEP_DEQUANTIZED
        if leaf == "weight" and isinstance(module, nn.Linear) and kept:
            layer = _quantized_layer(q, module, torch_dtype)
        if layer is None:
            plain[key] = q.dequantize(torch.float32).to(torch_dtype) if q.data.is_floating_point() or q.is_quantized \
                else q.dequantize()
            continue
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    model.load_state_dict(plain, strict=False, assign=True)
    model.encoder.embed_tokens = model.shared
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ConversionError(f"umT5 encoder: no tensor for {left[0]}")
    return model.requires_grad_(False).eval()


def load_quantized_t5(path: str | os.PathLike, torch_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A ``UMT5EncoderModel`` from an fp8 / scaled-fp8 ``.safetensors`` or a ``.gguf`` umT5 file, its Linear weights
    kept as stored (``wo`` dequantized, see the module docstring); ``torch_dtype`` is the compute dtype."""
    tensors, _ = read_quantized(path)
    ours, config = _ours_from_file(tensors)
    return quantized_t5_from_tensors(ours, config, torch_dtype)


def is_quantized_text_encoder(model: nn.Module) -> bool:
    """Whether ``model`` holds :class:`Fp8Linear` or ``GGUFLinear`` layers (what :func:`load_quantized_t5` gives)."""
    return any(isinstance(m, Fp8Linear) or type(m).__name__ == "GGUFLinear" for m in model.modules())


def load_text_encoder(path: str | os.PathLike, torch_dtype: torch.dtype, keep_quantized: bool = False) -> nn.Module:
    """:func:`load_quantized_t5` for a quantized single file when ``keep_quantized``, else the dequantizing
    :func:`~diffusers_wan_ext.conversion.text_encoder.load_t5_from_original`."""
    single = Path(path).is_file() and Path(path).name.endswith((".gguf", ".safetensors"))
    if keep_quantized and single and holds_quantized_weights(path):
        return load_quantized_t5(path, torch_dtype)
    return load_t5_from_original(path, torch_dtype=torch_dtype)


def save_quantized_text_encoder(model: nn.Module, folder: str | os.PathLike,
                                torch_dtype: torch.dtype) -> dict[str, Any]:
    """Write a model :func:`load_quantized_t5` built to ``folder`` (see the module docstring); returns the note."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear) or type(m).__name__ == "GGUFLinear"}
    kinds = {"fp8" if isinstance(m, Fp8Linear) else "gguf" for m in layers.values()}
    if len(kinds) != 1:
        raise ConversionError(f"text encoder: {'no' if not kinds else 'both fp8 and GGUF'} quantized layers to keep")
    kind = kinds.pop()
    tensors: dict[str, Any] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        module = key.rpartition(".")[0]
        if key == "encoder.embed_tokens.weight":
            continue
        if kind == "gguf" and module in layers and key.endswith(".weight"):
            tensors[key] = (t.data.view(torch.uint8), t.quant_type.name)
        elif module in layers:
            tensors[key] = t.detach()  # fp8 weight, float32 weight_scale / input_scale
        else:
            tensors[key] = t.detach().to(torch_dtype if kind == "fp8" or torch_dtype == torch.float16
                                         else torch.float32)
    if kind == "gguf":
        write_gguf_stored(folder / TEXT_ENCODER_GGUF_WEIGHTS, tensors, arch="t5encoder")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / TEXT_ENCODER_FP8_WEIGHTS))
    model.config.save_pretrained(folder)
    weights = TEXT_ENCODER_GGUF_WEIGHTS if kind == "gguf" else TEXT_ENCODER_FP8_WEIGHTS
    note = {"storage": kind, "class": type(model).__name__, "library": "transformers", "loader": "diffusers_wan_ext",
            "compute_dtype": str(torch_dtype).replace("torch.", ""), "weights": weights,
            "quantized_layers": len(layers),
            "load": "diffusers_wan_ext.conversion.quantized_dit.load_quantized_folder('<folder>')"}
    (folder / TEXT_ENCODER_NOTE).write_text(json.dumps(note, indent=2) + "\n")
    return note


def save_component(component: Any, folder: str | os.PathLike, torch_dtype: torch.dtype) -> None:
    """``save_pretrained`` of a pipeline component, a kept-quantized text encoder through
    :func:`save_quantized_text_encoder` (transformers would write fp8 weights without their scales applied)."""
    if isinstance(component, nn.Module) and is_quantized_text_encoder(component):
        save_quantized_text_encoder(component, folder, torch_dtype)
    else:
        component.save_pretrained(folder)


def _read_fp8_folder_weights(path: Path) -> dict[str, QuantizedTensor]:
    """``<layer>.weight`` (fp8) with its ``<layer>.weight_scale`` / ``<layer>.input_scale``; the rest as stored."""
    from safetensors.torch import load_file

    raw = load_file(str(path))
    out: dict[str, QuantizedTensor] = {}
    for key, t in raw.items():
        if key.endswith((".weight_scale", ".input_scale")):
            if key.rpartition(".")[0] + ".weight" not in raw:
                raise ConversionError(f"{path}: {key} has no weight beside it")
            continue
        name = str(t.dtype).replace("torch.", "")
        if name in FP8_DTYPES:
            module = key.rpartition(".")[0]
            if module + ".weight_scale" not in raw:
                raise ConversionError(f"{path}: the fp8 weight {key} has no {module}.weight_scale")
            out[key] = QuantizedTensor(t, name, tuple(t.shape), raw[module + ".weight_scale"],
                                       raw.get(module + ".input_scale"))
        else:
            out[key] = QuantizedTensor(t, "F32" if t.dtype == torch.float32 else "RAW" if not t.is_floating_point()
                                       else {torch.float16: "F16", torch.bfloat16: "BF16"}[t.dtype], tuple(t.shape))
    return out


def load_quantized_text_encoder_folder(folder: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """Read a folder :func:`save_quantized_text_encoder` wrote (the quantized layers as stored)."""
    from transformers import UMT5Config

    folder = Path(folder)
    note = json.loads((folder / TEXT_ENCODER_NOTE).read_text())
    path = folder / note["weights"]
    if not path.is_file():
        raise ConversionError(f"{folder}: no {note['weights']} (an incomplete kept-quantized text encoder folder)")
    tensors = read_gguf(path)[0] if note["storage"] == "gguf" else _read_fp8_folder_weights(path)
    dtype = torch_dtype or getattr(torch, note["compute_dtype"])
    return quantized_t5_from_tensors(tensors, UMT5Config.from_pretrained(str(folder)), dtype)
