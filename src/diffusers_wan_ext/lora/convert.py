"""Convert Wan LoRAs between Diffusers PEFT, original / ComfyUI, Kohya / musubi-tuner and DiffSynth-Studio keys.

Every conversion reads the source keys into one intermediate -- per (pipeline component, Diffusers module path)
the tensors of that module's delta by role (``down``, ``up``, ``alpha``, ``bias``, ``diff``; see
:mod:`~diffusers_wan_ext.lora.formats`) -- and writes the target keys from it.  No tensor is copied or cast; the
only arithmetic is where a target cannot store what the source has:

* **alpha.**  ``W' = W + (alpha / rank) * B @ A``.  Diffusers PEFT and DiffSynth files have no alpha (their scale
  is always 1), so writing them folds ``alpha / rank`` into the factors -- with the split Diffusers' own Wan
  converter uses (all of it into ``A``, except that a scale below 1/2 is moved into ``B`` in powers of two), so a
  file converted here gives bit-identical tensors to Diffusers' loader.  Formats that store alpha (original,
  Kohya) get ``alpha = rank`` for factors without one.  Hence ``diffusers -> X -> diffusers`` returns identical
  tensors for every ``X``, and so does ``X -> diffusers -> X`` for files that follow the ``alpha = rank``
  convention (every file this module writes); a foreign file with ``alpha != rank`` comes back with the scale
  folded into its factors.
* **full-weight deltas** (``diff`` in original / ComfyUI files, e.g. LightX2V's).  Diffusers and DiffSynth store
  them as an exact LoRA of rank ``min(out, in * kernel)`` whose smaller factor is the identity; writing a
  ``diff``-capable format turns exactly that pattern back into ``diff``.  A ``diff`` / ``diff_b`` on a norm or a
  bare parameter (``norm3``, ``modulation``), which no LoRA can hold, is dropped when it is all zeros (LightX2V
  ships such keys) and is an error otherwise.
* **bias deltas** (``diff_b``) are PEFT's ``lora_B.bias`` (``LoraConfig(lora_bias=True)``); DiffSynth LoRAs have
  no bias, so converting one to DiffSynth is an error.

Keys that fit no known module are never dropped: they raise :class:`~diffusers_wan_ext.utils.ConversionError`
(a ``ValueError``) naming them.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors.torch import save_file

from ..conversion.dit import BLOCK_KEY_MAP, TOP_LEVEL_KEY_MAP, rename_dit_key
from ..conversion.longcat import convert_longcat_lora_state_dict, is_longcat_lora_state_dict, longcat_target_modules
from ..utils.atomic import atomic_write_file
from ..utils.io import ConversionError, format_keys, load_state_dict
from .formats import (
    ALPHA,
    BIAS,
    COMPONENT_RENAMERS,
    DIFF,
    DIFFSYNTH_TARGET_MODULES,
    DIFFUSERS_WEIGHT_NAME,
    DOWN,
    EXPORT_FILE_NAMES,
    FORMATS,
    kohya_compound_words,
    LORA_FORMATS,
    NON_LORA_MODULE_RE,
    ROLES,
    UP,
    LoraFormat,
)

__all__ = [
    "detect_lora_format",
    "convert_lora_state_dict",
    "split_lora_components",
    "lora_info",
    "load_lora_file",
    "save_lora_file",
    "export_lora",
    "map_block_target_modules",
    "map_lora_target_modules",
    "peft_lora_state_dict",
    "alpha_scale_split",
]

Entry = dict[str, torch.Tensor]  # role -> tensor
Entries = dict[tuple[str, str], Entry]  # (component, Diffusers module path) -> entry

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # Diffusers' key in the safetensors header


# --------------------------------------------------------------------------------------------------- key parsing
def _component_of(key: str) -> tuple[str, str] | None:
    """``("transformer_2", "blocks.0...")`` for a component-prefixed Diffusers key, else ``None``."""
    for comp in sorted(COMPONENT_RENAMERS, key=len, reverse=True):  # registered components included
        if key.startswith(comp + "."):
            return comp, key[len(comp) + 1:]
    return None


def _kohya_to_dotted(name: str) -> str:
    """``blocks_0_cross_attn_k_img`` -> ``blocks.0.cross_attn.k_img`` (longest compound word first)."""
    tokens = name.split("_")
    words = kohya_compound_words()
    parts, i = [], 0
    while i < len(tokens):
        for word in words:
            n = word.count("_") + 1
            if "_".join(tokens[i:i + n]) == word:
                parts.append(word)
                i += n
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def _split_key(key: str, fmt: LoraFormat, component: str) -> tuple[str, str, str] | None:
    """``key`` -> (component, module path in ``fmt``'s layout, joined with "."; role), or ``None`` if it does not
    fit the format's grammar."""
    rest = None
    comp = component
    for prefix in fmt.prefixes:
        if prefix == "{component}.":
            found = _component_of(key)
            if found:
                comp, rest = found
                break
        elif key.startswith(prefix):
            rest = key[len(prefix):]
            break
    if not rest:
        return None
    if fmt.joiner == "_":
        module, _, suffix = rest.partition(".")
        role = fmt.read_suffixes.get(suffix)
        return (comp, _kohya_to_dotted(module), role) if role and module else None
    for suffix in sorted(fmt.read_suffixes, key=len, reverse=True):
        if rest.endswith("." + suffix) and len(rest) > len(suffix) + 1:
            return comp, rest[: -len(suffix) - 1], fmt.read_suffixes[suffix]
    return None


def _parse(state_dict: Mapping[str, torch.Tensor], fmt: LoraFormat, component: str) -> Entries:
    if component not in COMPONENT_RENAMERS:
        raise ValueError(f"transformer_name {component!r}: expected one of {sorted(COMPONENT_RENAMERS)}")
    entries: Entries = {}
    unknown, duplicate = [], []
    for key, value in state_dict.items():
        split = _split_key(key, fmt, component)
        if split is None:
            unknown.append(key)
            continue
        comp, module, role = split
        if fmt.layout == "original":
            module = COMPONENT_RENAMERS[comp](module, False)
            if module is None:
                unknown.append(key)
                continue
        entry = entries.setdefault((comp, module), {})
        if role in entry:
            duplicate.append(key)
        entry[role] = value
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) fit no {fmt.name} LoRA key of a Wan {component} ({fmt.description}): "
            f"{format_keys(unknown)}"
        )
    if duplicate:
        raise ConversionError(f"two keys give the same tensor of one module (e.g. lora_A and lora_down): "
                              f"{format_keys(duplicate)}")
    _check_entries(entries)
    return entries


def _name(comp: str, module: str) -> str:
    return f"{comp}.{module}"


def _check_entries(entries: Entries) -> None:
    problems = []
    for (comp, module), e in entries.items():
        name = _name(comp, module)
        if (DOWN in e) != (UP in e):
            problems.append(f"{name} has only the {'down (lora_A)' if DOWN in e else 'up (lora_B)'} factor")
        elif DOWN in e:
            down, up = e[DOWN], e[UP]
            pointwise_up = all(s == 1 for s in up.shape[2:])
            if down.ndim < 2 or up.ndim != down.ndim or up.shape[1] != down.shape[0] or not pointwise_up:
                problems.append(f"{name}: factors {tuple(down.shape)} / {tuple(up.shape)} do not form B @ A")
            if DIFF in e:
                problems.append(f"{name} has both a LoRA and a full-weight diff (not supported)")
        if DIFF in e and e[DIFF].ndim < 2 and not NON_LORA_MODULE_RE.search(name):
            problems.append(f"{name}: a {e[DIFF].ndim}-d diff on a layer with a weight matrix")
        if ALPHA in e and (DOWN not in e or e[ALPHA].numel() != 1):
            problems.append(f"{name}: alpha needs LoRA factors and must be a single number")
    if problems:
        more = f" (+{len(problems) - 12} more)" if len(problems) > 12 else ""
        raise ConversionError("invalid LoRA: " + "; ".join(problems[:12]) + more)


# ---------------------------------------------------------------------------------------------------- tensor ops
def alpha_scale_split(scale: float) -> tuple[float, float]:
    """Factors ``(for A, for B)`` whose product is ``scale``: Diffusers' split of ``alpha / rank`` (all into ``A``;
    a scale below 1/2 moves into ``B`` in powers of two so that neither factor gets tiny).

    Example:
        >>> alpha_scale_split(0.5), alpha_scale_split(1 / 16)
        ((0.5, 1.0), (0.25, 0.25))
    """
    down, up = float(scale), 1.0
    while down * 2 < up:
        down *= 2
        up /= 2
    return down, up


def _scale_factors(e: Entry, scale: float) -> Entry:
    if scale == 1.0:
        return e
    d, u = alpha_scale_split(scale)
    return {**e, DOWN: e[DOWN] * d, UP: e[UP] * u}


def _fold_alpha(e: Entry) -> Entry:
    if ALPHA not in e:
        return e
    e = dict(e)
    alpha = float(e.pop(ALPHA).item())
    return _scale_factors(e, alpha / e[DOWN].shape[0])


def _diff_to_factors(diff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact LoRA ``(A, B)`` with ``B @ A == diff``: rank ``min(out, in * kernel)``, identity on the smaller side."""
    out, kernel_dims = diff.shape[0], diff.ndim - 2
    n_in = diff[0].numel()
    ones = (1,) * kernel_dims
    if out <= n_in:
        eye = torch.eye(out, dtype=diff.dtype, device=diff.device)
        return diff, eye.reshape(out, out, *ones)
    eye = torch.eye(n_in, dtype=diff.dtype, device=diff.device)
    return eye.reshape(n_in, *diff.shape[1:]), diff.reshape(out, n_in, *ones)


def _factors_to_diff(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """The ``diff`` that :func:`_diff_to_factors` turns into exactly ``(down, up)``, else ``None``."""
    rank, out, n_in = down.shape[0], up.shape[0], down[0].numel()
    if rank == out and out <= n_in:
        candidate = down
    elif rank == n_in and out > n_in:
        candidate = up.reshape(out, *down.shape[1:])
    else:
        return None
    a, b = _diff_to_factors(candidate)
    same = all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in ((a, down), (b, up)))
    return candidate if same else None


def _alpha_tensor(rank: int, like: torch.Tensor) -> torch.Tensor:
    """``alpha = rank`` in the factors' dtype when that holds it exactly (as Kohya / musubi save it), else fp32."""
    t = torch.tensor(float(rank), dtype=like.dtype if like.is_floating_point() else torch.float32)
    return t if float(t.item()) == float(rank) else torch.tensor(float(rank), dtype=torch.float32)


# -------------------------------------------------------------------------------------------------------- writing
def _as_lora(e: Entry, fmt: LoraFormat, name: str) -> Entry | None:
    """``e`` in the roles ``fmt`` can store (no alpha / diff for Diffusers and DiffSynth); ``None``: drop it."""
    if NON_LORA_MODULE_RE.search(name) and DOWN not in e and not fmt.has_diff:
        if all(not t.any() for t in e.values()):
            return None  # all-zero diff / diff_b of a norm or parameter: dropping it changes nothing
        raise ConversionError(
            f"{name}: a non-zero {'/'.join(sorted(e))} delta on a norm or parameter; a {fmt.name} LoRA cannot hold "
            "it (only original / Kohya files can: convert to one of those)"
        )
    if DIFF in e and not fmt.has_diff:
        e = dict(e)
        e[DOWN], e[UP] = _diff_to_factors(e.pop(DIFF))
    if not fmt.has_alpha:
        e = _fold_alpha(e)
    if BIAS in e and not fmt.has_bias:
        raise ConversionError(
            f"{name}: has a bias delta (lora_B.bias / diff_b), which {fmt.name} LoRAs cannot store"
        )
    if fmt.has_diff and DOWN in e and ALPHA not in e:
        diff = _factors_to_diff(e[DOWN], e[UP])
        if diff is not None:
            e = {k: v for k, v in e.items() if k not in (DOWN, UP)}
            e[DIFF] = diff
    if fmt.has_alpha and DOWN in e and ALPHA not in e:
        e = {**e, ALPHA: _alpha_tensor(e[DOWN].shape[0], e[DOWN])}
    return e


def _write(entries: Entries, fmt: LoraFormat, component: str) -> dict[str, torch.Tensor]:
    if fmt.name != "diffusers":
        others = sorted({comp for comp, _ in entries if comp != component})
        if others:
            raise ConversionError(
                f"the LoRA has modules of {', '.join(others)} besides {component}; a {fmt.name} file holds one model: "
                f"pass transformer_name= one of {sorted({c for c, _ in entries})} (CLI: --component), or use "
                "export_lora / `diffusers-wan lora export`, which writes one file per component"
            )
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for (comp, module), entry in entries.items():
        e = _as_lora(entry, fmt, _name(comp, module))
        if e is None:
            continue
        if fmt.layout == "original":
            path = COMPONENT_RENAMERS[comp](module, True)
            if path is None:
                unknown.append(_name(comp, module))
                continue
        else:
            path = module
        prefix = fmt.prefixes[0].replace("{component}", comp)
        base = prefix + (path.replace(".", "_") if fmt.joiner == "_" else path)
        for role in ROLES:
            if role in e:
                out[f"{base}.{fmt.write_suffixes[role]}"] = e[role]
    if unknown:
        raise ConversionError(
            f"{len(unknown)} module(s) have no name in the {fmt.name} layout (not in the Wan key tables): "
            f"{format_keys(unknown)}"
        )
    return out


# ------------------------------------------------------------------------------------------------------ public API
def _check_format(name: str, what: str) -> LoraFormat:
    if name not in FORMATS:
        raise ValueError(f"{what} {name!r}: expected one of {', '.join(LORA_FORMATS)}")
    return FORMATS[name]


def detect_lora_format(state_dict: Mapping[str, torch.Tensor], *, transformer_name: str = "transformer") -> str:
    """The format of a Wan LoRA state dict: one of :data:`~diffusers_wan_ext.lora.LORA_FORMATS`.

    ``lora_unet_*`` is Kohya / musubi-tuner, ``diffusion_model.*`` original / ComfyUI, ``transformer.*`` (or another
    pipeline component) Diffusers.  Bare keys are DiffSynth-Studio when they carry PEFT's ``.default`` or original
    module names with ``lora_A`` / ``lora_B``, original when they use ``lora_down`` / ``alpha`` / ``diff``, and
    Diffusers (as ``get_peft_model_state_dict`` returns them) otherwise.  Anything else raises ``ValueError``
    naming sample keys.

    Example:
        >>> import torch
        >>> detect_lora_format({"blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(1, 1)})
        'diffsynth'
    """
    keys = list(state_dict)
    if not keys:
        raise ValueError("empty LoRA state dict")
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "original"
    if any(_component_of(k) for k in keys):
        return "diffusers"
    if any(".default." in k for k in keys):
        return "diffsynth"
    if any(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha", ".diff", ".diff_b")) for k in keys):
        return "original"
    modules = {k.split(".lora_")[0] for k in keys if ".lora_A." in k or ".lora_B." in k}
    if not modules:
        raise ValueError(
            f"not a Wan LoRA in a known format ({', '.join(LORA_FORMATS)}): no lora_A/lora_B/lora_down/lora_up keys "
            f"in e.g. {format_keys(keys[:6], 6)}"
        )
    rename = COMPONENT_RENAMERS.get(transformer_name, COMPONENT_RENAMERS["transformer"])
    original = {m for m in modules if rename(m, False) is not None and rename(m, True) is None}
    diffusers = {m for m in modules if rename(m, True) is not None and rename(m, False) is None}
    if original and diffusers:
        raise ValueError(
            f"LoRA mixes original module names ({format_keys(original, 3)}) and Diffusers names "
            f"({format_keys(diffusers, 3)})"
        )
    return "diffsynth" if original else "diffusers"


def convert_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    target: str,
    source: str | None = None,
    *,
    transformer_name: str = "transformer",
) -> dict[str, torch.Tensor]:
    """Convert a Wan LoRA state dict to ``target`` format (``"diffusers"``, ``"original"``, ``"kohya"``,
    ``"diffsynth"``).

    Args:
        state_dict: the LoRA tensors (e.g. from :func:`load_lora_file`).
        target: the format to write.
        source: the format of ``state_dict``; detected with :func:`detect_lora_format` when ``None``.
        transformer_name: the pipeline component that single-model formats (original, Kohya, DiffSynth) and
            unprefixed Diffusers keys stand for: ``"transformer"``, ``"transformer_2"`` (Wan2.2 A14B's low-noise
            expert) or ``"motion_controller"``.  Writing a single-model format from Diffusers keys of several
            components is an error (convert one component at a time, or use :func:`export_lora`).

    Returns:
        A new dict; tensors are the input's (no copy), except where alpha is folded or a ``diff`` becomes factors
        (see the module docstring).  Diffusers output keys always carry the component prefix (``transformer.``).

    Raises:
        ValueError (:class:`~diffusers_wan_ext.utils.ConversionError`): unknown format, keys that fit no module of
        the Wan key tables (named), incomplete factors, or a delta the target cannot hold.

    Example:
        >>> import torch
        >>> sd = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 8),
        ...       "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.ones(8, 4)}
        >>> sorted(convert_lora_state_dict(sd, "original"))  # doctest: +NORMALIZE_WHITESPACE
        ['diffusion_model.blocks.0.self_attn.q.alpha', 'diffusion_model.blocks.0.self_attn.q.lora_down.weight',
         'diffusion_model.blocks.0.self_attn.q.lora_up.weight']
    """
    target_fmt = _check_format(target, "target format")
    if source is None and is_longcat_lora_state_dict(state_dict):  # LongCat-Video's own layout, read as Diffusers
        state_dict, source = convert_longcat_lora_state_dict(state_dict, f"{transformer_name}."), "diffusers"
    source = source or detect_lora_format(state_dict, transformer_name=transformer_name)
    source_fmt = _check_format(source, "source format")
    return _write(_parse(state_dict, source_fmt, transformer_name), target_fmt, transformer_name)


def split_lora_components(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A Diffusers-format LoRA split by pipeline component: ``{"transformer": {...}, "transformer_2": {...}}``;
    keys keep their prefix.  Unprefixed keys count as ``transformer``."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        found = _component_of(key)
        comp = found[0] if found else "transformer"
        parts.setdefault(comp, {})[key if found else f"transformer.{key}"] = value
    return parts


def lora_info(state_dict: Mapping[str, torch.Tensor], source: str | None = None) -> dict:
    """Summary of a LoRA: format, and per component the number of modules, ranks, alphas, bias / diff counts and
    the targeted module kinds (block indices as ``N``, Diffusers names).

    Example:
        >>> import torch
        >>> info = lora_info({"diffusion_model.blocks.3.self_attn.q.lora_down.weight": torch.zeros(4, 8),
        ...                   "diffusion_model.blocks.3.self_attn.q.lora_up.weight": torch.zeros(8, 4)})
        >>> info["format"], info["components"]["transformer"]["ranks"], info["components"]["transformer"]["targets"]
        ('original', [4], ['blocks.N.attn1.to_q'])
    """
    source = source or detect_lora_format(state_dict)
    entries = _parse(state_dict, _check_format(source, "source format"), "transformer")
    comps: dict[str, dict] = {}
    for (comp, module), e in entries.items():
        c = comps.setdefault(comp, {"modules": 0, "ranks": set(), "alphas": set(), "bias": 0, "diff": 0,
                                    "targets": set(), "dtypes": set()})
        c["modules"] += 1
        if DOWN in e:
            c["ranks"].add(int(e[DOWN].shape[0]))
        if ALPHA in e:
            c["alphas"].add(float(e[ALPHA].item()))
        c["bias"] += BIAS in e
        c["diff"] += DIFF in e
        c["targets"].add(re.sub(r"(^|\.)(\w*blocks)\.\d+\.", r"\1\2.N.", module))
        c["dtypes"].update(str(t.dtype).replace("torch.", "") for t in e.values())
    for c in comps.values():
        for k in ("ranks", "alphas", "targets", "dtypes"):
            c[k] = sorted(c[k])
    return {"format": source, "tensors": len(state_dict), "components": comps}


# -------------------------------------------------------------------------------------------------------- files
def _module_scaling(metadata: Mapping, module: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha = metadata.get("lora_alpha", rank)
    alpha_pattern = metadata.get("alpha_pattern") or {}
    if alpha_pattern:
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha)
    return float(alpha) / (math.sqrt(rank) if metadata.get("use_rslora") else rank)


def _fold_peft_scaling(entries: Entries, scale_of) -> dict[str, torch.Tensor]:
    """Diffusers keys of ``entries`` with each module's PEFT scale ``scale_of(component, module, rank)`` folded into
    its factors and bias (PEFT scales ``lora_B``'s output, its bias included)."""
    folded: Entries = {}
    for (comp, module), e in entries.items():
        scale = scale_of(comp, module, int(e[DOWN].shape[0])) if DOWN in e else 1.0
        if scale != 1.0:
            e = _scale_factors(e, scale)
            if BIAS in e:
                e = {**e, BIAS: e[BIAS] * scale}
        folded[(comp, module)] = e
    return _write(folded, FORMATS["diffusers"], "transformer")


def _fold_adapter_metadata(state_dict: dict[str, torch.Tensor], metadata: Mapping) -> dict[str, torch.Tensor]:
    """Fold the scale of Diffusers' PEFT adapter metadata (``lora_alpha`` / ``alpha_pattern`` / ``use_rslora``,
    per component) into the factors, so that the dict follows the ``alpha = rank`` convention."""
    by_comp: dict[str, dict] = {}
    for key, value in metadata.items():
        found = _component_of(key)
        comp, field = found if found else ("transformer", key)
        by_comp.setdefault(comp, {})[field] = value
    entries = _parse(state_dict, FORMATS["diffusers"], "transformer")
    return _fold_peft_scaling(
        entries, lambda comp, module, rank: _module_scaling(by_comp[comp], module, rank) if comp in by_comp else 1.0
    )


def _lora_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        if not (path / DIFFUSERS_WEIGHT_NAME).exists():
            raise ConversionError(f"{path}: a folder without {DIFFUSERS_WEIGHT_NAME}; pass the LoRA file itself")
        path = path / DIFFUSERS_WEIGHT_NAME
    return path


def load_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a LoRA file (``.safetensors``, ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``; a folder means its
    ``pytorch_lora_weights.safetensors``), in whatever format it is.

    A Diffusers file whose PEFT adapter metadata (``lora_adapter_metadata``, written by ``save_lora_weights`` with
    ``transformer_lora_adapter_metadata``) sets ``lora_alpha != r`` is returned with that scale folded into its
    factors (see :func:`alpha_scale_split`), so that every dict in this module means ``W + B @ A``.

    Example:
        >>> sd = load_lora_file("my_wan_lora.safetensors")  # doctest: +SKIP
        >>> diffusers_sd = convert_lora_state_dict(sd, "diffusers")  # doctest: +SKIP
    """
    path = _lora_path(path)
    state_dict = load_state_dict(path)
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        raw = header.get(LORA_ADAPTER_METADATA_KEY)
        if raw and detect_lora_format(state_dict) == "diffusers":
            try:
                metadata = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ConversionError(f"{path}: invalid {LORA_ADAPTER_METADATA_KEY} JSON ({e})") from e
            state_dict = _fold_adapter_metadata(state_dict, metadata)
    return state_dict


def save_lora_file(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
    *, overwrite: bool = True,
) -> Path:
    """Write a LoRA state dict to ``path`` (``.safetensors``, else ``torch.save``) through a temporary file in the
    same folder, moved into place when complete (:func:`~diffusers_wan_ext.utils.atomic.atomic_write_file`; the
    mode follows the umask).  ``metadata`` (strings) goes into the safetensors header.  With ``overwrite=False`` an
    existing ``path`` is an error (``diffusers-wan lora convert`` without ``--overwrite``)."""
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    header = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}

    def write(tmp: Path) -> None:
        if Path(path).suffix == ".safetensors":
            save_file(tensors, str(tmp), metadata=header)
        else:
            torch.save(tensors, tmp)

    return atomic_write_file(path, write, overwrite=overwrite)


def _component_file(name: str, component: str) -> str:
    if component == "transformer":
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}_{component}{dot}{ext}"


def export_lora(
    diffusers_state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    formats: Sequence[str] = LORA_FORMATS,
    *,
    metadata: Mapping[str, str] | None = None,
    adapter_config: Mapping | None = None,
    overwrite: bool = True,
) -> dict[str, Path]:
    """Write a Diffusers-format LoRA in several formats into ``out_dir``; return ``{name: path}``.

    * ``"diffusers"``: ``pytorch_lora_weights.safetensors`` with every component (``transformer.*``, and
      ``transformer_2.*`` for Wan2.2 A14B), loadable by stock ``WanPipeline.load_lora_weights`` (which reads the
      ``transformer.*`` part) and by our pipelines (both experts at once).  With a ``transformer_2`` part also
      ``pytorch_lora_weights_transformer_2.safetensors`` (key ``diffusers_transformer_2``): the same tensors under
      ``transformer.``, for stock ``load_lora_weights(..., load_into_transformer_2=True)``.
    * ``"original"`` / ``"kohya"`` / ``"diffsynth"``: ``lora_<format>.safetensors`` for ``transformer`` and
      ``lora_<format>_<component>.safetensors`` (key ``<format>_<component>``) for each other component -- these
      formats hold one model each (ComfyUI / DiffSynth load Wan2.2's high- and low-noise LoRAs separately).

    Every file is written atomically; with ``overwrite=False`` nothing is written when one of them exists
    (``diffusers-wan lora export`` without ``--overwrite``).  ``metadata`` goes into each safetensors header.
    ``adapter_config``: the PEFT config of raw ``get_peft_model_state_dict`` tensors (``LoraConfig.to_dict()``, or
    Diffusers' packed ``{"transformer.lora_alpha": ...}`` metadata) whose ``lora_alpha / r`` (patterns, rsLoRA) is
    then folded into the factors; not needed for :func:`peft_lora_state_dict` output, which is folded already.

    Example:
        >>> from peft.utils import get_peft_model_state_dict  # doctest: +SKIP
        >>> paths = export_lora(peft_lora_state_dict(transformer), "out/lora")  # doctest: +SKIP
        >>> sorted(paths)  # doctest: +SKIP
        ['diffsynth', 'diffusers', 'kohya', 'original']
    """
    for name in formats:
        _check_format(name, "export format")
    sd = convert_lora_state_dict(diffusers_state_dict, "diffusers", source="diffusers")
    if adapter_config:
        sd = _fold_adapter_metadata(sd, adapter_config)
    parts = split_lora_components(sd)
    out_dir = Path(out_dir)
    files: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}
    for fmt in formats:
        if fmt == "diffusers":
            files[fmt] = (out_dir / EXPORT_FILE_NAMES[fmt], sd)
            if "transformer_2" in parts:
                single = {"transformer." + k[len("transformer_2."):]: v for k, v in parts["transformer_2"].items()}
                files["diffusers_transformer_2"] = (out_dir / _component_file(EXPORT_FILE_NAMES[fmt], "transformer_2"),
                                                    single)
            continue
        for comp, part in parts.items():
            converted = convert_lora_state_dict(part, fmt, source="diffusers", transformer_name=comp)
            key = fmt if comp == "transformer" else f"{fmt}_{comp}"
            files[key] = (out_dir / _component_file(EXPORT_FILE_NAMES[fmt], comp), converted)
    existing = [str(path) for path, _ in files.values() if path.exists()]
    if existing and not overwrite:
        raise ConversionError(f"{', '.join(existing)} already exist(s); pass overwrite=True (--overwrite) to replace")
    return {key: save_lora_file(tensors, path, metadata, overwrite=overwrite) for key, (path, tensors) in files.items()}


# ------------------------------------------------------------------------------------------------ training helpers
def map_block_target_modules(names: Iterable[str], block_names: Sequence[tuple[str, str]]) -> list[str]:
    """PEFT ``target_modules`` from DiffSynth-Studio / original names on a transformer whose block modules are named
    by ``block_names`` (pairs ``(original, ours)`` inside one block, e.g. Wan2.2-Animate-2's ``self_attn.q`` ->
    ``self_attn.to_q``), not by the Wan DiT tables.

    As DiffSynth's PEFT suffixes: a name matches the original modules it is the path or a suffix of (``q`` ->
    ``self_attn.to_q`` and ``cross_attn.to_q``; ``self_attn.q`` -> ``self_attn.to_q``); names that already are our
    module names (or suffixes of them) are kept.  Unknown names raise ``ValueError``.

    Example:
        >>> map_block_target_modules(["q", "self_attn.k"], [("self_attn.q", "self_attn.to_q"),
        ...                           ("self_attn.k", "self_attn.to_k"), ("cross_attn.q", "cross_attn.to_q")])
        ['self_attn.to_q', 'cross_attn.to_q', 'self_attn.to_k']
    """
    out, unknown = [], []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        mapped = [ours for original, ours in block_names if original == name or original.endswith("." + name)]
        if not mapped and any(ours == name or ours.endswith("." + name) for _, ours in block_names):
            mapped = [name]
        if not mapped:
            unknown.append(name)
        out.extend(m for m in mapped if m not in out)
    if unknown:
        raise ValueError(
            f"unknown LoRA target module name(s) {', '.join(unknown)} for this transformer: use its original module "
            f"names ({', '.join(original for original, _ in block_names)}, or their suffixes) or ours "
            f"({', '.join(ours for _, ours in block_names)})"
        )
    return out


def map_lora_target_modules(names: str | Iterable[str]) -> list[str]:
    """PEFT ``target_modules`` for Diffusers' Wan transformer from DiffSynth-Studio / original names.

    DiffSynth's shorthands (``q,k,v,o,ffn.0,ffn.2``, ``k_img``, ``v_img``; see
    :data:`~diffusers_wan_ext.lora.formats.DIFFSYNTH_TARGET_MODULES`) become the Diffusers suffixes that match the
    same layers (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``ffn.net.0.proj``, ``ffn.net.2``, ...); full original
    paths (``self_attn.q``, ``blocks.3.cross_attn.o``, ``head.head``, ``vace_blocks.0.before_proj``) are renamed
    with the DiT key tables; names that already are Diffusers module names (or suffixes of them) are kept.
    ``names`` may be a comma-separated string.  Unknown names raise ``ValueError``.

    Example:
        >>> map_lora_target_modules("q,k,v,o,ffn.0,ffn.2")
        ['to_q', 'to_k', 'to_v', 'to_out.0', 'ffn.net.0.proj', 'ffn.net.2']
        >>> map_lora_target_modules(["self_attn.q", "attn2.to_k", "blocks.0.cross_attn.k_img"])
        ['attn1.to_q', 'attn2.to_k', 'blocks.0.attn2.add_k_proj']
    """
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    local = dict(BLOCK_KEY_MAP)
    diffusers_names = [d for _, d in BLOCK_KEY_MAP + TOP_LEVEL_KEY_MAP]
    out, unknown = [], []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        mapped = DIFFSYNTH_TARGET_MODULES.get(name) or local.get(name) or rename_dit_key(name)
        if mapped is None and any(d == name or d.endswith("." + name) for d in diffusers_names):
            mapped = name
        if mapped is None and rename_dit_key(name, reverse=True) is not None:
            mapped = name
        # LongCat-Video's original block modules (attn.qkv, cross_attn.kv_linear, adaLN_modulation.1, ffn.w1 ...)
        longcat = None if mapped is not None else (longcat_target_modules(f"blocks.0.{name}")
                                                   or longcat_target_modules(name))
        if longcat is not None:
            out.extend(m.removeprefix("blocks.0.") for m in longcat if m.removeprefix("blocks.0.") not in out)
        elif mapped is None:
            unknown.append(name)
        elif mapped not in out:
            out.append(mapped)
    if unknown:
        raise ValueError(
            f"unknown LoRA target module name(s) {', '.join(unknown)}: use DiffSynth names "
            f"({', '.join(DIFFSYNTH_TARGET_MODULES)}), original module paths (self_attn.q, ffn.0, ...) or Diffusers "
            "module names (to_q, attn1.to_q, ffn.net.0.proj, ...)"
        )
    return out


def peft_lora_state_dict(
    model: torch.nn.Module, adapter_name: str = "default", component: str = "transformer"
) -> dict[str, torch.Tensor]:
    """The Diffusers-format LoRA of a PEFT-wrapped model (``add_adapter`` / ``inject_adapter_in_model`` /
    ``get_peft_model``): ``get_peft_model_state_dict`` with each layer's PEFT scale (``lora_alpha / r``, rsLoRA,
    patterns) folded into its factors and ``component.`` prefixed -- self-contained, no adapter metadata needed.

    Example:
        >>> transformer.add_adapter(LoraConfig(r=16, lora_alpha=8, target_modules=["to_q", "to_v"]))  # doctest: +SKIP
        >>> export_lora(peft_lora_state_dict(transformer), "out")  # doctest: +SKIP
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    if component not in COMPONENT_RENAMERS:
        raise ValueError(f"component {component!r}: expected one of {sorted(COMPONENT_RENAMERS)}")
    raw = get_peft_model_state_dict(model, adapter_name=adapter_name)
    strip = "base_model.model."
    raw = {k[len(strip):] if k.startswith(strip) else k: v for k, v in raw.items()}
    scaling = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.scaling:
            scaling[name[len(strip):] if name.startswith(strip) else name] = float(module.scaling[adapter_name])
    entries = _parse({k: v.detach() for k, v in raw.items()}, FORMATS["diffusers"], component)
    return _fold_peft_scaling(entries, lambda comp, module, rank: scaling.get(module, 1.0))
