"""``diffusers-wan generate``'s checks, all made before any model loads.

The model folder is read as JSON (``model_index.json``, ``transformer/config.json``, ``vae/config.json``,
``wan_variant.json``); the pipeline class it names is resolved by name (Diffusers, or a class of this package) and
its ``__call__`` signature says which inputs it takes and which it needs -- a parameter without a default, or one
that defaults to ``None`` but whose docstring entry does not call it *optional* (Diffusers' docstring convention).
The families' registry adds their options (``--pose-video`` ...) and the pipeline class a folder is upgraded to for
them.  Every mistake is a ``ValueError`` naming the option or file: ``diffusers-wan`` prints it as one
``error: ...`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import transformers

from ..families import FAMILIES, ModelFamily, registered_classes
from ..lora import WanLoraInteropMixin, convert_lora_state_dict, load_lora_file, split_lora_components
from ..utils.io import ConversionError, read_json as read_json_file
from ..utils.media import read_image_file
from ..utils.validation import check_input_file, check_output_file, validate_video_size

__all__ = [
    "FRAME_PARAMETERS", "LAST_IMAGE_PARAMETERS", "GeneratePlan", "LoraRequest", "call_inputs", "check_generate",
    "pipeline_class",
]

#: call parameters ``--num-frames`` sets (a family's ``prepare_generate`` may rename it, e.g. frames per segment)
FRAME_PARAMETERS = ("num_frames", "segment_frame_length")
#: call parameters ``--last-image`` sets, the first one the pipeline takes
LAST_IMAGE_PARAMETERS = ("last_image", "end_image")
#: ``generate`` options that map one-to-one onto a call parameter: (flag, args attribute, parameter)
SAMPLING_OPTIONS = (
    ("--height", "height", "height"), ("--width", "width", "width"),
    ("--steps", "steps", "num_inference_steps"), ("--guidance-scale", "guidance_scale", "guidance_scale"),
    ("--negative-prompt", "negative_prompt", "negative_prompt"),
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoraRequest:
    """One ``--lora FILE[:SCALE]``: the file, its weight and its tensors with Diffusers keys (checked)."""

    file: str
    scale: float
    state_dict: dict[str, Any]
    adapter_name: str


@dataclass
class GeneratePlan:
    """What :func:`check_generate` found: the pipeline class to run, its call arguments (images loaded, no models),
    the families' options, the LoRAs and the output path."""

    folder: Path
    folder_class: str
    pipeline_class: type | None  # None: custom pipeline code (--trust-remote-code), not checked
    kwargs: dict[str, Any]
    fps: int
    output: Path
    family_options: list[tuple[ModelFamily, dict[str, Any]]] = field(default_factory=list)
    loras: list[LoraRequest] = field(default_factory=list)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; ``ValueError`` naming ``what`` and the file when it is unreadable."""
    try:
        data = read_json_file(path)
    except (OSError, ConversionError) as e:
        raise ValueError(f"{what}: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} does not hold a JSON object")
    return data


def model_folder(model: str) -> Path:
    """The local folder of ``--model``: the folder itself, or the configs (``*.json``) of a Hub repo."""
    path = Path(model)
    if not path.exists():
        if not _REPO_ID.match(model):
            raise ValueError(f"--model: {model} does not exist")
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, allow_patterns=["*.json"]))
        except Exception as e:  # noqa: BLE001 -- offline, unknown repo, gated ...: all are "cannot read it"
            raise ValueError(f"--model: {model} is no local folder, and its configs could not be fetched from the "
                             f"Hub ({type(e).__name__})") from None
    if not path.is_dir():
        raise ValueError(f"--model: {model} is not a folder (a converted Diffusers folder has model_index.json)")
    if not (path / "model_index.json").is_file():
        hint = (" (it looks like a single model folder: pass the pipeline folder above it)"
                if (path / "config.json").is_file() else " (convert a release with `diffusers-wan convert` first)")
        raise ValueError(f"--model: {model} has no model_index.json{hint}")
    return path


#: the libraries whose classes are resolved by name here (this package registers its classes with Diffusers)
OWN_LIBRARIES = ("diffusers", "diffusers_wan_ext")


def own_class(name: str) -> type | None:
    """A Diffusers class or one of this package's, by name."""
    cls = getattr(diffusers, name, None)
    if isinstance(cls, type):
        return cls
    return next((c for c in registered_classes() if c.__name__ == name), None)


def component_class_exists(library: str, name: str) -> bool:
    """Whether ``library.name`` is installed (other libraries than Diffusers / this package / transformers are left
    to ``from_pretrained``)."""
    if library in OWN_LIBRARIES:
        return own_class(name) is not None
    if library == "transformers":
        return hasattr(transformers, name)
    return True


#: what a model component's weights are stored as (Diffusers and transformers, sharded or not)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def check_components(folder: Path, index: dict[str, Any], trust_remote_code: bool, weights: bool = True) -> None:
    """Every component ``model_index.json`` lists has its folder and an installed class, and (``weights``: a local
    folder, not the configs of a Hub repo) a model component (``config.json``) has a weights file."""
    components = {name: entry for name, entry in index.items()
                  if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and None not in entry}
    for name, (library, cls) in components.items():
        if not (folder / name).is_dir():
            raise ValueError(f"--model: {folder} lists the component {name} ({library}.{cls}) in model_index.json "
                             f"but has no {name}/ folder")
        if not trust_remote_code and not component_class_exists(library, cls):
            raise ValueError(f"--model: {folder / 'model_index.json'}: the class {cls} of {name} is not installed "
                             f"in {library} (upgrade it, or pass --trust-remote-code for the folder's own code)")
    for name in components if weights else ():
        if (folder / name / "config.json").is_file() and not any(
                f.suffix in WEIGHT_SUFFIXES for f in (folder / name).iterdir()):
            raise ValueError(f"--model: {folder / name} has a config.json but no weights file "
                             f"({' / '.join(WEIGHT_SUFFIXES)}): an incomplete copy or conversion?")


def class_entry(entry: Any) -> tuple[str, str]:
    """``(library, class name)`` of a ``_class_name`` entry: ``"WanPipeline"`` or ``["diffusers_wan_ext", "..."]``."""
    if isinstance(entry, str):
        return "diffusers", entry
    if isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry):
        return entry[0], entry[1]
    raise ValueError(f"--model: model_index.json has no valid _class_name (found {entry!r})")


def pipeline_class(entry: Any, trust_remote_code: bool = False) -> type | None:
    """The pipeline class ``model_index.json`` names (``_class_name``): Diffusers' or this package's; ``None`` for
    custom code allowed by ``trust_remote_code``."""
    library, name = class_entry(entry)
    cls = own_class(name) if library in OWN_LIBRARIES else None
    if cls is not None and issubclass(cls, diffusers.DiffusionPipeline):
        return cls
    if trust_remote_code:
        return None
    raise ValueError(f"--model: model_index.json names the pipeline {library}.{name}, which neither diffusers "
                     f"{diffusers.__version__} nor diffusers_wan_ext provides (upgrade them, or pass "
                     "--trust-remote-code for custom pipeline code)")


def call_inputs(cls: type) -> dict[str, tuple[bool, Any]]:
    """``{parameter: (required, default)}`` of ``cls.__call__``: required when it has no default, or defaults to
    ``None`` while its docstring entry does not say *optional*."""
    doc = inspect.getdoc(cls.__call__) or ""
    out = {}
    for p in list(inspect.signature(cls.__call__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        required = p.default is p.empty
        if p.default is None:
            entry = re.search(rf"^\s*{re.escape(p.name)} \(([^\n]*?)\):", doc, re.M)
            required = entry is not None and "optional" not in entry.group(1)
        out[p.name] = (required, None if p.default is p.empty else p.default)
    return out


def component_config(folder: Path, index: dict[str, Any], name: str) -> dict[str, Any]:
    """``NAME/config.json`` of a component ``model_index.json`` lists (``{}`` when it has none)."""
    path = folder / name / "config.json"
    return read_json(path, "--model") if name in index and path.is_file() else {}


def size_factors(vae: dict[str, Any], transformer: dict[str, Any]) -> tuple[int, int, int]:
    """(VAE spatial factor, VAE temporal factor, transformer patch) from the component configs."""
    p = transformer.get("patch_size", 2)
    patch = p[-1] if isinstance(p, (list, tuple)) else p
    return int(vae.get("scale_factor_spatial", 8)), int(vae.get("scale_factor_temporal", 4)), int(patch)


def upgraded_class(folder_class: str, cls: type) -> type:
    """The pipeline class a family runs a folder of ``folder_class`` as (file inputs, input checks)."""
    for family in FAMILIES:
        if folder_class in family.generate_pipeline:
            return family.generate_pipeline[folder_class]
    return cls


def merged_inputs(folder_cls: type, cls: type) -> dict[str, tuple[bool, Any]]:
    """The inputs of the class that runs (``cls``); an input is required when either class requires it."""
    inputs = call_inputs(cls)
    for name, (required, _) in call_inputs(folder_cls).items():
        if name in inputs and required:
            inputs[name] = (True, inputs[name][1])
    return inputs


def sampling_arguments(args: argparse.Namespace, cls: type, inputs: dict, defaults: dict, kw: dict) -> None:
    """Height, width, steps, guidance and negative prompt: given, else the release's default, else the pipeline's."""
    for flag, attr, param in SAMPLING_OPTIONS:
        value = getattr(args, attr)
        if param not in inputs:
            if value is not None:
                raise ValueError(f"{flag}: {cls.__name__} takes no {param}")
            continue
        if value is None:
            value = defaults.get(param, inputs[param][1])
        if value is not None:
            kw[param] = value


def frame_arguments(args: argparse.Namespace, cls: type, inputs: dict, defaults: dict, kw: dict,
                    factors: tuple[int, int, int]) -> None:
    """``num_frames`` (when the pipeline takes a frame count) and the size check against the folder's factors."""
    param = next((p for p in FRAME_PARAMETERS if p in inputs), None)
    frames = args.num_frames
    if param is None and frames is not None:
        raise ValueError(f"--num-frames: {cls.__name__} takes no frame count ({', '.join(FRAME_PARAMETERS)})")
    if param is not None:
        frames = frames if frames is not None else defaults.get("num_frames", inputs[param][1])
        kw["num_frames"] = frames
    spatial, temporal, patch = factors
    size = {"--height": kw.get("height"), "--width": kw.get("width")}
    ok = spatial * patch
    try:
        validate_video_size(ok, ok, frames if frames is not None else 1, spatial, temporal, patch)
    except ValueError as e:
        raise ValueError(f"--num-frames: {e}") from None
    try:
        validate_video_size(*(ok if v is None else v for v in size.values()), 1, spatial, temporal, patch)
    except ValueError as e:
        flags = [flag for flag, v in size.items() if v is not None and (v <= 0 or v % ok)]
        raise ValueError(f"{' / '.join(flags)}: {e}") from None


def read_image(path: str, what: str):
    """A PIL image from ``path``; ``ValueError`` naming ``what`` when it is missing or not an image."""
    check_input_file(path, what)
    return read_image_file(path, what)  # 16-bit scaled to 8-bit, EXIF orientation applied, one-line errors


def image_arguments(args: argparse.Namespace, cls: type, inputs: dict, kw: dict, model: str,
                    transformer: dict[str, Any]) -> None:
    """``--image`` / ``--last-image``: only for pipelines that take them; loaded now (a bad file fails early).

    ``last_image`` (stock semantics: the CLIP features of both frames) also needs a transformer with the
    first-last-frame position embedding (``pos_embed_seq_len``) when it has a CLIP branch (``image_dim``): an I2V
    transformer would fail on the second frame's tokens after loading.
    """
    if args.image is not None:
        if "image" not in inputs:
            raise ValueError(f"--image: {cls.__name__} (the pipeline of {model}) takes no image; it generates from "
                             "text only")
        kw["image"] = read_image(args.image, "--image")
    if args.last_image is not None:
        param = next((p for p in LAST_IMAGE_PARAMETERS if p in inputs), None)
        if param is None:
            raise ValueError(f"--last-image: {cls.__name__} (the pipeline of {model}) takes no last frame")
        if param == "last_image" and transformer.get("image_dim") and not transformer.get("pos_embed_seq_len"):
            raise ValueError(f"--last-image: the transformer of {model} has no first-last-frame embedding "
                             "(pos_embed_seq_len in transformer/config.json): an image-to-video model, not FLF2V")
        kw[param] = read_image(args.last_image, "--last-image")


def family_options(args: argparse.Namespace, folder_class: str, cls: type, model: str) -> list:
    """The families' options given: each only for its family's pipelines, files checked; ``[(family, given)]`` for
    the family whose pipeline runs."""
    out = []
    for family in FAMILIES:
        given = {i.argument: getattr(args, i.argument) for i in family.generate_inputs
                 if getattr(args, i.argument, None) is not None}
        ours = issubclass(cls, family.pipeline_classes) or folder_class in family.generate_pipeline
        if given and not ours:
            flags = "/".join(i.flag for i in family.generate_inputs if i.argument in given)
            raise ValueError(f"{flags}: only for {family.title} folders; {model} is a {folder_class}")
        for i in family.generate_inputs:
            value = given.get(i.argument)
            if value is None:
                continue
            if i.kind == "path":
                check_input_file(value, i.flag)
            elif i.kind == "optional-path" and value != "auto" and not Path(value).exists():
                raise ValueError(f"{i.flag}: {value} does not exist")
            elif i.kind == "int" and int(value) < 1:
                raise ValueError(f"{i.flag}: {value} must be a positive integer")
            elif i.kind == "float" and not math.isfinite(float(value)):
                raise ValueError(f"{i.flag}: {value} must be a finite number")
        if ours:
            out.append((family, given))
    return out


def check_required(cls: type, inputs: dict, kw: dict, options: list) -> None:
    """Every input the pipeline needs is given (``--image`` for image-to-video models ...)."""
    flags = {"image": "--image", **{p: "--last-image" for p in LAST_IMAGE_PARAMETERS}}
    flags.update({i.argument: i.flag for f in FAMILIES for i in f.generate_inputs})
    given = set(kw) | {name for _, g in options for name in g}
    for name, (required, _) in inputs.items():
        if required and name not in given:
            if name in flags:
                raise ValueError(f"{flags[name]} is required: {cls.__name__} needs `{name}`")
            raise ValueError(f"{cls.__name__} needs `{name}`, which `diffusers-wan generate` has no option for; "
                             "call the pipeline from Python")


def lora_requests(args: argparse.Namespace, folder: Path, index: dict[str, Any],
                  cls: type | None = None) -> list[LoraRequest]:
    """``--lora FILE[:SCALE]``: each file read and converted to Diffusers keys now (by the pipeline class's own
    ``lora_state_dict`` when it is one of ours: Animate-2 reads DiffSynth's Animate-2 LoRAs), its components checked
    against the folder's."""
    components = {n for n, e in index.items() if not n.startswith("_") and isinstance(e, list) and None not in e}
    out = []
    for i, (file, scale) in enumerate(args.lora):
        if not Path(file).exists():
            raise ValueError(f"--lora: {file} does not exist")
        try:
            if cls is not None and issubclass(cls, WanLoraInteropMixin):
                sd = cls.lora_state_dict(str(file))
            else:
                sd = convert_lora_state_dict(load_lora_file(file), "diffusers")
        except Exception as e:  # noqa: BLE001 -- unreadable or unknown layout: the user's file either way
            raise ValueError(f"--lora {file}: {e}") from None
        missing = sorted(set(split_lora_components(sd)) - components)
        if missing:
            raise ValueError(f"--lora {file}: it has weights for {', '.join(missing)}, which {folder} does not have")
        out.append(LoraRequest(file, scale, sd, adapter_name=f"lora_{i}"))
    return out


def check_generate(args: argparse.Namespace) -> GeneratePlan:
    """Check every ``generate`` argument, the model folder and the input files without loading a model."""
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    folder = model_folder(args.model)
    index = read_json(folder / "model_index.json", "--model")
    entry = index.get("_class_name")
    cls = pipeline_class(entry, args.trust_remote_code)
    check_components(folder, index, args.trust_remote_code, weights=Path(args.model).exists())
    folder_class = class_entry(entry)[1]
    variant = folder / "wan_variant.json"
    defaults = read_json(variant, "--model") if variant.is_file() else {}
    kw: dict[str, Any] = {"prompt": args.prompt}
    options = []
    if cls is None:  # custom pipeline code: what was given, as given (family options belong to our pipelines)
        kw.update({p: getattr(args, a) for _, a, p in SAMPLING_OPTIONS if getattr(args, a) is not None})
        if args.num_frames is not None:
            kw["num_frames"] = args.num_frames
        for flag, attr, param in (("--image", "image", "image"), ("--last-image", "last_image", "last_image")):
            if getattr(args, attr) is not None:
                kw[param] = read_image(getattr(args, attr), flag)
        family_options(args, folder_class, object, args.model)
    else:
        cls = upgraded_class(folder_class, cls)
        inputs = merged_inputs(pipeline_class(entry), cls)
        sampling_arguments(args, cls, inputs, defaults, kw)
        transformer = component_config(folder, index, "transformer")
        factors = size_factors(component_config(folder, index, "vae"), transformer)
        frame_arguments(args, cls, inputs, defaults, kw, factors)
        image_arguments(args, cls, inputs, kw, args.model, transformer)
        options = family_options(args, folder_class, cls, args.model)
        check_required(cls, inputs, kw, options)
    loras = lora_requests(args, folder, index, cls)
    output = check_output_file(args.output, args.overwrite)
    fps = args.fps if args.fps is not None else int(defaults.get("fps", 16))
    return GeneratePlan(folder, folder_class, cls, kw, fps, output, options, loras)
