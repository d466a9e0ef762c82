"""``load_lora_weights`` for our pipelines: every Wan LoRA format, both experts at once, no key silently dropped.

:class:`WanLoraInteropMixin` is Diffusers' ``WanLoraLoaderMixin`` with two changes:

* :meth:`~WanLoraInteropMixin.lora_state_dict` reads the file (local, Hub, or a dict) with Diffusers' own fetcher
  and converts any format of :data:`~diffusers_wan_ext.lora.LORA_FORMATS` to Diffusers keys with
  :func:`~diffusers_wan_ext.lora.convert_lora_state_dict` -- which, unlike stock's converters, also handles VACE
  blocks, the Fun ``ref_conv`` / ``control_adapter``, ``img_emb``, full-weight ``diff`` keys, DiffSynth-Studio
  files, and raises on keys it cannot place.
* :meth:`~WanLoraInteropMixin.load_lora_weights` loads ``transformer.*`` keys into ``transformer`` and
  ``transformer_2.*`` keys into ``transformer_2`` (and ``motion_controller.*`` where the pipeline has one) in one
  call, and first checks every key against the target model: keys that match no layer, or whose shapes do not fit
  it, raise a ``ValueError`` naming them (stock only logs a warning and drops them).  The loading itself is
  stock's (``load_lora_into_transformer`` -> ``load_lora_adapter``), so adapters, ``set_adapters``, ``fuse_lora``,
  hot-swapping and offloading behave as in Diffusers; ``load_into_transformer_2=True`` keeps its stock meaning.

A local LoRA file is checked before Diffusers opens it (:func:`~diffusers_wan_ext.utils.io.check_weights_file`: a
FIFO, device or folder is refused without opening it, an empty or truncated file is named as such), and a LoRA
tensor holding NaN or inf is an error, not a warning: it would turn every output of the model into NaN.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Mapping

import torch
from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA, WanLoraLoaderMixin
from diffusers.utils import require_peft_backend
from huggingface_hub.utils import validate_hf_hub_args
from torch import nn

from ..utils.io import (
    ConversionError,
    check_weights_file,
    format_keys,
    load_state_dict,
    one_line,
    raise_for_non_finite,
)
from .convert import convert_lora_state_dict, detect_lora_format, split_lora_components

__all__ = ["WanLoraInteropMixin", "check_lora_state_dict"]

_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias")
_PEFT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _fetch(pretrained_model_name_or_path_or_dict, **kwargs):
    """Diffusers' LoRA fetcher with the keyword arguments of ``WanLoraLoaderMixin.lora_state_dict``."""
    from diffusers.loaders.lora_base import _fetch_state_dict

    use_safetensors = kwargs.pop("use_safetensors", None)
    return _fetch_state_dict(
        pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
        weight_name=kwargs.pop("weight_name", None),
        use_safetensors=True if use_safetensors is None else use_safetensors,
        local_files_only=kwargs.pop("local_files_only", None),
        cache_dir=kwargs.pop("cache_dir", None),
        force_download=kwargs.pop("force_download", False),
        proxies=kwargs.pop("proxies", None),
        token=kwargs.pop("token", None),
        revision=kwargs.pop("revision", None),
        subfolder=kwargs.pop("subfolder", None),
        user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
        allow_pickle=use_safetensors is None,
    )


def local_lora_file(location, weight_name: str | None = None, subfolder: str | None = None) -> Path | None:
    """The local file ``lora_state_dict`` will read for ``location`` (a file, or a folder with ``weight_name``), or
    ``None`` for a state dict, a Hub repo id or a folder whose file Diffusers picks itself."""
    if not isinstance(location, (str, os.PathLike)) or not os.path.lexists(location):
        return None
    path = Path(location)
    if path.is_dir():
        return path / (subfolder or "") / weight_name if weight_name else None
    return path


def _fetch_checked(location, **kwargs):
    """:func:`_fetch`, with a local file checked before it is opened and its read errors as one line naming it."""
    local = local_lora_file(location, kwargs.get("weight_name"), kwargs.get("subfolder"))
    if local is not None:
        check_weights_file(local)
    try:
        state_dict, metadata = _fetch(location, **kwargs)
    except Exception as e:  # noqa: BLE001 - Diffusers, safetensors and torch raise many kinds for bad files
        if isinstance(e, ValueError) or not isinstance(location, (str, os.PathLike)) or not os.path.lexists(location):
            raise  # a Hub repo: Diffusers' own errors
        if local is not None:
            load_state_dict(local, check_finite=False)  # raises the precise reason (e.g. pickled Python objects)
        raise ConversionError(
            f"{local or location}: cannot be read as a LoRA {'file' if local else 'folder'} ({one_line(e)})"
        ) from None
    if isinstance(location, Mapping):
        source = "the LoRA state dict"
    else:
        source = str(local if local is not None else location)
    raise_for_non_finite(state_dict, source)
    return state_dict, metadata


def _expected_shapes(layer: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    if isinstance(layer, nn.Linear):
        return {"lora_A.weight": (rank, layer.in_features), "lora_B.weight": (layer.out_features, rank),
                "lora_B.bias": (layer.out_features,)}
    ones = (1,) * (layer.weight.ndim - 2)
    return {"lora_A.weight": (rank, layer.in_channels, *layer.kernel_size),
            "lora_B.weight": (layer.out_channels, rank, *ones), "lora_B.bias": (layer.out_channels,)}


def check_lora_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "transformer", name: str | None = None
) -> dict[str, torch.Tensor]:
    """Check a Diffusers-format LoRA (keys ``<prefix>.<module>.lora_A.weight`` / ``lora_B.weight`` /
    ``lora_B.bias``) against ``model`` and make it complete for PEFT.

    Raises ``ValueError`` naming every key that has another prefix, names no ``Linear`` / ``Conv`` layer of
    ``model``, or whose shape does not fit that layer.  Returns the dict with explicit zeros where PEFT would
    otherwise initialise silently: rank-``r`` zero factors for modules that only have a bias delta (``diff_b``),
    and zero biases for the other modules once any module has one (``LoraConfig(lora_bias=True)`` gives all of
    them a bias).
    """
    name = name or prefix
    layers = dict(model.named_modules())
    groups: dict[str, dict[str, str]] = {}
    unmatched, wrong = [], []
    for key in state_dict:
        module, suffix = None, None
        if key.startswith(prefix + "."):
            for s in _SUFFIXES:
                if key.endswith("." + s):
                    module, suffix = key[len(prefix) + 1: -len(s) - 1], s
                    break
        layer = layers.get(module) if module is not None else None
        layer = getattr(layer, "base_layer", layer)
        if not isinstance(layer, _PEFT_LAYERS):
            unmatched.append(key)
        else:
            groups.setdefault(module, {})[suffix] = key
    ranks = Counter(int(state_dict[g["lora_A.weight"]].shape[0]) for g in groups.values() if "lora_A.weight" in g)
    common_rank = ranks.most_common(1)[0][0] if ranks else 1
    for module, keys in groups.items():
        layer = getattr(layers[module], "base_layer", layers[module])
        rank = int(state_dict[keys["lora_A.weight"]].shape[0]) if "lora_A.weight" in keys else common_rank
        expected = _expected_shapes(layer, rank)
        for suffix, key in keys.items():
            if tuple(state_dict[key].shape) != expected[suffix]:
                wrong.append(f"{key} {tuple(state_dict[key].shape)} (expected {expected[suffix]})")
    if unmatched or wrong:
        problems = []
        if unmatched:
            problems.append(
                f"{len(unmatched)} key(s) match no LoRA-able layer of {name} ({type(model).__name__}): "
                f"{format_keys(unmatched)}"
            )
        if wrong:
            problems.append(f"shapes that do not fit {name}: {format_keys(wrong)}")
        raise ValueError(
            "; ".join(problems) + ". The LoRA was probably made for another Wan model (size, T2V vs I2V / VACE / "
            "Fun variant) or another expert."
        )
    out = dict(state_dict)
    any_bias = any("lora_B.bias" in keys for keys in groups.values())
    for module, keys in groups.items():
        layer = getattr(layers[module], "base_layer", layers[module])
        expected = _expected_shapes(layer, common_rank)
        like = state_dict[next(iter(keys.values()))]
        base = f"{prefix}.{module}"
        if "lora_A.weight" not in keys:
            for suffix in ("lora_A.weight", "lora_B.weight"):
                out[f"{base}.{suffix}"] = torch.zeros(expected[suffix], dtype=like.dtype, device=like.device)
        if any_bias and "lora_B.bias" not in keys:
            out[f"{base}.lora_B.bias"] = torch.zeros(expected["lora_B.bias"], dtype=like.dtype, device=like.device)
    return out


def _reprefix(mapping: Mapping | None, component: str) -> dict | None:
    """Keys of ``component`` (``transformer_2.x``) as ``transformer.x``: the prefix ``load_lora_adapter`` reads."""
    if not mapping:
        return None
    out = {"transformer." + k[len(component) + 1:]: v for k, v in mapping.items() if k.startswith(component + ".")}
    return out or None


class WanLoraInteropMixin(WanLoraLoaderMixin):
    r"""
    Wan LoRA loading for our pipelines: Diffusers PEFT, original / ComfyUI (``diffusion_model.``, ``alpha``,
    ``diff``, ``diff_b``), Kohya / musubi-tuner (``lora_unet_``) and DiffSynth-Studio
    (``blocks.N.self_attn.q.lora_A.default.weight``) files, including VACE and Fun extra modules; keys that fit no
    layer raise instead of being dropped.  Put it before the stock pipeline class in the bases.

    Example:
        >>> pipe = WanExtPipeline.from_pretrained("Wan2.1-T2V-1.3B-diffusers")  # doctest: +SKIP
        >>> pipe.load_lora_weights("comfyui_style_lora.safetensors", adapter_name="style")  # doctest: +SKIP
        >>> pipe.load_lora_weights("diffsynth/epoch-4.safetensors", adapter_name="motion")  # doctest: +SKIP
        >>> pipe.set_adapters(["style", "motion"], [1.0, 0.6])  # doctest: +SKIP
    """

    @classmethod
    @validate_hf_hub_args
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor], **kwargs):
        r"""
        Load a Wan LoRA in any supported format and return it with Diffusers keys (``transformer.*``,
        ``transformer_2.*``).  Arguments as stock ``WanLoraLoaderMixin.lora_state_dict``; the adapter metadata of a
        Diffusers file is kept (``return_lora_metadata=True``), other formats have none.

        Raises:
            ValueError: (``ConversionError``) a local file that is not a regular file (FIFO, device), is empty,
                truncated or unreadable, or a LoRA whose tensors hold NaN or inf -- naming the file and the keys.
        """
        return_metadata = kwargs.pop("return_lora_metadata", False)
        state_dict, metadata = _fetch_checked(pretrained_model_name_or_path_or_dict, **kwargs)
        source = detect_lora_format(state_dict)
        state_dict = convert_lora_state_dict(state_dict, "diffusers", source=source)
        if source != "diffusers":
            metadata = None
        return (state_dict, metadata) if return_metadata else state_dict

    @require_peft_backend
    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ):
        r"""
        Load a Wan LoRA (any supported format; file, folder, Hub repo or state dict) into the pipeline's models.

        Args:
            pretrained_model_name_or_path_or_dict: as stock ``load_lora_weights`` (``weight_name=``, ``subfolder=``,
                Hub arguments in ``kwargs``).
            adapter_name (`str`, *optional*): one name for every model the LoRA reaches (default ``default_N``).
            hotswap (`bool`): as stock.
            load_into_transformer_2 (`bool`, defaults to `False`): stock meaning -- the ``transformer.*`` keys go
                into ``transformer_2`` (a LoRA file of the low-noise expert).
            low_cpu_mem_usage (`bool`, *optional*): as stock.

        Raises:
            ValueError: keys that match no layer of their model, shapes that do not fit, keys of a component the
                pipeline does not have, or a file in no known format -- before any model is changed.
        """
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", _LOW_CPU_MEM_USAGE_DEFAULT_LORA)
        load_into_transformer_2 = kwargs.pop("load_into_transformer_2", False)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        parts = split_lora_components(state_dict)
        if load_into_transformer_2:
            extra = sorted(set(parts) - {"transformer"})
            if extra:
                raise ValueError(
                    f"load_into_transformer_2=True loads the transformer.* keys into transformer_2, but the LoRA also "
                    f"has keys of {', '.join(extra)}: load it without load_into_transformer_2"
                )
            targets = {"transformer_2": ("transformer", parts.get("transformer", {}))}
        else:
            targets = {comp: (comp, part) for comp, part in parts.items()}

        plan = []
        for comp, (source, part) in targets.items():
            model = getattr(self, comp, None)
            if comp not in self._lora_loadable_modules or model is None:
                raise ValueError(
                    f"the LoRA has {len(part)} key(s) for {comp} (e.g. {format_keys(list(part)[:3], 3)}) but "
                    f"{type(self).__name__} has no {comp} to load them into"
                    + (" (a Wan2.1 pipeline has one transformer)" if comp == "transformer_2" else "")
                )
            sd = _reprefix(part, source)
            if comp in ("transformer", "transformer_2") and "image_dim" in model.config:  # (S2V has no CLIP branch)
                sd = self._maybe_expand_t2v_lora_for_i2v(transformer=model, state_dict=sd)
            sd = check_lora_state_dict(model, sd, prefix="transformer", name=comp)
            plan.append((model, sd, _reprefix(metadata, source)))

        if adapter_name is None:
            n = 0
            while any(f"default_{n}" in getattr(model, "peft_config", {}) for model, _, _ in plan):
                n += 1
            adapter_name = f"default_{n}"
        for model, sd, meta in plan:
            self.load_lora_into_transformer(
                sd, transformer=model, adapter_name=adapter_name, metadata=meta, _pipeline=self,
                low_cpu_mem_usage=low_cpu_mem_usage, hotswap=hotswap,
            )
