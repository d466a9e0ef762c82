"""Convert an original Wan release (folder or individual files) into a complete Diffusers pipeline folder.

The release converter reads the family registry (:mod:`diffusers_wan_ext.families`): a family that converts its
releases itself (LongCat-Video, Video-As-Prompt) claims them first; otherwise the DiT's family is detected from its
keys (:func:`~diffusers_wan_ext.conversion.dit.dit_config_from_state_dict`), the release row is chosen from the
families' rows, and each family adds the components it needs beyond the Wan core (audio encoder, motion controller,
relighting LoRA).

The destination is claimed before anything is loaded (a second conversion into it fails at once); nothing is written
until every component has been found and validated; the result is assembled in a temporary folder next to the
destination and moved into place only when complete, never over something the converter did not create unless
``overwrite`` (:mod:`diffusers_wan_ext.utils.atomic`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from .conversion.audio_encoder import WAV2VEC_DIR
from .conversion.dit import (
    DitInfo,
    build_transformer,
    convert_dit_state_dict,
    dit_config_from_state_dict,
    find_dit_files,
    load_converted_state_dict,
    locate_dit,
)
from .conversion.image_encoder import load_clip_from_original, make_clip_image_processor
from .conversion.quantized_dit import (check_fp8_storage, check_kept_quantized, is_single_file,
                                       kept_quantized_kind, load_quantized_dit, quantized_dit_from_tensors,
                                       read_quantized_dit, save_transformer, shape_state_dict)
from .conversion.release_io import (
    DTYPES,
    first_existing,
    library_of,
    progress_bar,
    progress_message,
    write_model_card,
)
from .conversion.quantized_text_encoder import load_text_encoder, save_component
from .conversion.tokenizer import load_umt5_tokenizer
from .conversion.vae import detect_vae_version, load_vae_from_original
from .families import FAMILIES, VARIANTS, ReleaseOptions, WanVariant, get_variant, variants_for_arch
from .schedulers import WanFlowMatchScheduler, WanFlowUniPCScheduler
from .utils.atomic import atomic_output_dir, claim_destination
from .utils.io import ConversionError, load_state_dict, strip_known_prefixes, with_path
from .utils.quantized_tensor import QuantizedTensor
from .utils.shims import rewrite_model_index_for_shims

__all__ = ["DTYPES", "LoadedRelease", "ReleaseFiles", "SCHEDULERS", "choose_variant", "convert_release",
           "describe_release", "find_release_files", "load_release"]

# Original release file names (Wan2.1 / Wan2.2 configs).
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILES = {"wan2.1": "Wan2.1_VAE.pth", "wan2.2": "Wan2.2_VAE.pth"}
TOKENIZER_DIR = "google/umt5-xxl"
EXPERT_DIRS = ("high_noise_model", "low_noise_model")  # -> transformer, transformer_2
SCHEDULERS = ("unipc", "euler", "diffsynth", "original-unipc")


def make_scheduler(kind: str, shift: float):
    """The converted folder's scheduler: ``unipc`` (what the Wan-AI *-Diffusers repos ship), ``euler``,
    ``diffsynth`` (DiffSynth-exact Euler) or ``original-unipc`` (the original FlowUniPC schedule)."""
    if kind == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
        )
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=shift)
    if kind == "diffsynth":
        return WanFlowMatchScheduler(shift=shift)
    if kind == "original-unipc":
        return WanFlowUniPCScheduler(flow_shift=shift)
    raise ConversionError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")


def name_hints(name: str) -> list[str]:
    """Release rows whose file-name hints all occur in ``name`` (lower-cased), in registry order."""
    name = name.lower()
    return [v.name for v in VARIANTS if any(all(f in name for f in hint) for hint in v.file_hints)]


@dataclass
class ReleaseFiles:
    """Where each component of an original release lives."""

    dit: list[Path] = field(default_factory=list)  # one per expert: high-noise first
    dit_config: list[dict] = field(default_factory=list)
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    vae: Path | None = None
    image_encoder: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # the families' own files (find_files)
    name_hints: list[str] = field(default_factory=list)


def _locate_dits(src: Path, explicit: list[Path], files: ReleaseFiles) -> list[tuple[Path, dict]]:
    if explicit:
        return [locate_dit(p) for p in explicit]
    if src.is_file():
        return [locate_dit(src)]
    if all((src / d).is_dir() for d in EXPERT_DIRS):
        return [locate_dit(src / d) for d in EXPERT_DIRS]
    w = find_dit_files(src)
    if w is None:
        singles = list(src.glob("*.safetensors")) + list(src.glob("*.gguf"))  # also ComfyUI / GGUF single files
        if len(singles) != 1:
            raise ConversionError(
                f"{src}: no DiT weights found (expected diffusion_pytorch_model*.safetensors, "
                f"{'/ '.join(EXPERT_DIRS)} sub-folders, or pass --transformer FILE)"
            )
        w = singles[0]
        files.name_hints = name_hints(w.name) + files.name_hints
    return [locate_dit(w)]


def find_release_files(
    src: str | os.PathLike,
    *,
    transformer: str | os.PathLike | None = None,
    transformer_2: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
    **family_files: str | os.PathLike | None,
) -> ReleaseFiles:
    """Locate the components of a release folder (or a single DiT file plus explicitly given component files).

    ``family_files`` are the files families read beyond the Wan core (``audio_encoder``, ``motion_controller``,
    ``relighting_lora``); each family finds its own next to the DiT when not given.
    """
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    files = ReleaseFiles(name_hints=name_hints(src.name))
    root = src if src.is_dir() else src.parent
    entries = _locate_dits(src, [Path(t) for t in (transformer, transformer_2) if t is not None], files)
    files.dit = [e[0] for e in entries]
    files.dit_config = [e[1] for e in entries]
    files.text_encoder = Path(text_encoder) if text_encoder else first_existing(root / T5_FILE)
    files.tokenizer = Path(tokenizer) if tokenizer else first_existing(root / TOKENIZER_DIR, root / "tokenizer")
    files.vae = Path(vae) if vae else first_existing(*(root / f for f in VAE_FILES.values()))
    files.image_encoder = Path(image_encoder) if image_encoder else first_existing(root / CLIP_FILE)
    for family in FAMILIES:
        files.extras.update(family.find_files(root, family_files))
    return files


def _check_variant_size(v: WanVariant, info: DitInfo) -> None:
    """``--variant`` of one release size for the weights of another (e.g. a 14B row for 1.3B weights) is refused;
    weights of no release size (tiny or custom models) may take any row of their architecture."""
    size = (info.config["num_attention_heads"] * info.config["attention_head_dim"], info.config["num_layers"])
    if v.dim is None or (v.dim, v.num_layers) == size:
        return
    if any((r.dim, r.num_layers) == size for r in VARIANTS):
        raise ConversionError(f"--variant {v.name} is a model of width {v.dim} with {v.num_layers} layers, but the "
                              f"weights have width {size[0]} with {size[1]} layers: pick the matching --variant or "
                              "leave it out (detected from the weights)")


def choose_variant(info: DitInfo, experts: int, name: str | None, hint: str | Sequence[str] | None) -> WanVariant:
    """The release row for these weights: ``name`` (``--variant``) if given and consistent, else the first row that
    ``hint`` names (file-name hints) and the weights fit, else detected."""
    if name:
        v = get_variant(name)
        if v.arch != info.arch or v.experts != experts:
            raise ConversionError(
                f"--variant {v.name} expects a {v.arch} DiT with {v.experts} expert(s), but the weights are "
                f"{info.arch} with {experts} expert(s) (patch_embedding.weight in_dim {info.config['in_channels']}, "
                f"img_emb.* {'present' if info.config.get('image_dim') else 'absent'})"
            )
        _check_variant_size(v, info)
        return v
    width = info.config["num_attention_heads"] * info.config["attention_head_dim"]
    for h in [hint] if isinstance(hint, str) else (hint or []):
        v = get_variant(h)
        if v.arch == info.arch and v.experts == experts and v.dim in (None, width):
            return v
    candidates = variants_for_arch(info.arch, experts)
    if not candidates:
        raise ConversionError(
            f"no Wan release has a {info.arch} DiT with {experts} expert(s); pass --variant "
            f"({', '.join(v.name for v in VARIANTS)})"
        )
    exact = [v for v in candidates if v.dim == width and v.num_layers == info.config["num_layers"]]
    if exact:
        return exact[0]
    # not a release width (tiny or custom model): keep the architecture's defaults, mark the size as custom
    base = candidates[0]
    return replace(base, name=f"{base.name.rsplit('-', 1)[0]}-custom", dim=None, num_layers=None)


@dataclass
class LoadedRelease:
    """Every component of an original release, loaded and validated (what :func:`load_release` returns).

    Attributes:
        variant: the release row (:data:`~diffusers_wan_ext.families.VARIANTS`).
        transformers: the DiT(s), high-noise expert first.
        components: ``text_encoder``, ``tokenizer``, ``vae``, ``scheduler`` (+ ``image_encoder``,
            ``image_processor`` and the families' extra components); empty with ``transformer_only``.
        extras: per family name, what the family writes beside the components (e.g. Animate's relighting LoRA).
    """

    variant: WanVariant
    transformers: list
    components: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def pipeline_class(self) -> str:
        return self.variant.pipeline

    def build_pipeline(self):
        """The pipeline (``variant.pipeline``, e.g. ``WanPipeline``) of these components, in memory; optional
        components the release lacks are ``None``.  With ``load_release(..., keep_quantized=True)`` the DiT stays
        quantized and the rest is in the release dtype."""
        if not self.components:
            raise ValueError("build_pipeline: this release was loaded with transformer_only=True (no text encoder, "
                             "tokenizer, VAE or scheduler)")
        pipe_cls = getattr(diffusers, self.variant.pipeline)
        expected, _ = pipe_cls._get_signature_keys(pipe_cls)
        kwargs: dict[str, Any] = {name: None for name in expected}
        kwargs.update({name: comp for name, comp in self.components.items() if name in expected})
        kwargs.update(zip(["transformer", "transformer_2"], self.transformers))
        init_params = set(pipe_cls.__init__.__code__.co_varnames)
        if "boundary_ratio" in init_params:
            kwargs["boundary_ratio"] = self.variant.boundary_ratio
        if "expand_timesteps" in init_params:
            kwargs["expand_timesteps"] = self.variant.expand_timesteps
        return pipe_cls(**kwargs)


def _read_dits(files: ReleaseFiles, keep_quantized: bool = False) -> tuple[list[dict], list[DitInfo]]:
    """The DiT state dicts (``keep_quantized``: a single file's stored tensors, nothing dequantized) and infos."""
    dit_sds, infos = [], []
    for path, cfg in zip(files.dit, files.dit_config):
        if keep_quantized and is_single_file(path):
            sd = read_quantized_dit(path)[0]
            infos.append(with_path(path, lambda: dit_config_from_state_dict(shape_state_dict(sd), cfg)))
            dit_sds.append(sd)
            continue
        sd = strip_known_prefixes(load_state_dict(path), "blocks.")
        infos.append(with_path(path, lambda: dit_config_from_state_dict(sd, cfg)))
        dit_sds.append(sd)
    if len(infos) == 2 and (infos[0].config != infos[1].config):
        diff = sorted(k for k in infos[0].config if infos[0].config[k] != infos[1].config[k])
        raise ConversionError(f"the two experts differ in {', '.join(diff)} ({files.dit[0]} vs {files.dit[1]})")
    return dit_sds, infos


def _check_unused(var: WanVariant, **given: str | os.PathLike | None) -> None:
    """A component file given for a release that has no such component is a mistake, not silently ignored."""
    for name, path in given.items():
        if path is not None and not getattr(var, name):
            raise ConversionError(f"--{name.replace('_', '-')} {path}: {var.name} has no {name.replace('_', ' ')}; "
                                  "leave it out")


def _check_complete(src, files: ReleaseFiles, var: WanVariant, transformer_only: bool) -> None:
    needed = {"transformer": files.dit[0]}
    if not transformer_only:
        needed.update(text_encoder=files.text_encoder, tokenizer=files.tokenizer, vae=files.vae)
        if var.image_encoder:
            needed["image_encoder"] = files.image_encoder
        if var.audio_encoder:
            needed["audio_encoder"] = files.extras.get("audio_encoder")
    missing = [k for k, v in needed.items() if v is None]
    if missing:
        flags = ", ".join(f"--{k.replace('_', '-')} PATH" for k in missing)
        raise ConversionError(
            f"{src}: missing component(s) for {var.name}: {', '.join(missing)}. Put the original files next to the DiT "
            f"({T5_FILE}, {TOKENIZER_DIR}/, {VAE_FILES[var.vae]}"
            f"{', ' + CLIP_FILE if var.image_encoder else ''}{', ' + WAV2VEC_DIR + '/' if var.audio_encoder else ''}) "
            f"or pass {flags} (or --transformer-only)."
        )


def _load_transformers(files: ReleaseFiles, dit_sds, infos, torch_dtype, bar) -> list:
    transformers_ = []
    for path, sd, inf in zip(files.dit, dit_sds, infos):
        bar.set_postfix_str(f"transformer {path.name}")
        if any(isinstance(v, QuantizedTensor) for v in sd.values()):  # load_release(keep_quantized=True)
            transformers_.append(with_path(path, lambda: quantized_dit_from_tensors(sd, inf, torch_dtype)))
            bar.update()
            continue
        converted = convert_dit_state_dict(sd)
        model = build_transformer(inf)
        transformers_.append(with_path(path, lambda: load_converted_state_dict(model, converted, torch_dtype)))
        bar.update()
    return transformers_


def _load_core_components(files: ReleaseFiles, var: WanVariant, info: DitInfo, torch_dtype, image_encoder_heads,
                          bar, keep_quantized: bool = False) -> dict[str, Any]:
    """Text encoder, tokenizer, VAE (+ CLIP), each checked against the DiT."""
    components: dict[str, Any] = {}
    bar.set_postfix_str("text encoder")
    components["text_encoder"] = with_path(files.text_encoder,
                                           lambda: load_text_encoder(files.text_encoder, torch_dtype, keep_quantized))
    bar.update()
    bar.set_postfix_str("tokenizer")
    components["tokenizer"] = with_path(files.tokenizer, lambda: load_umt5_tokenizer(files.tokenizer))
    bar.update()
    bar.set_postfix_str("vae")
    vae_sd = with_path(files.vae, lambda: load_state_dict(files.vae))
    version = with_path(files.vae, lambda: detect_vae_version(vae_sd))
    if version != var.vae:
        raise ConversionError(f"{files.vae}: a {version} VAE, but {var.name} needs the {var.vae} VAE ({VAE_FILES[var.vae]})")
    components["vae"] = with_path(files.vae, lambda: load_vae_from_original(vae_sd, torch_dtype=torch.float32))
    z_dim = components["vae"].config.z_dim
    if z_dim != info.config["out_channels"]:
        raise ConversionError(f"{files.vae}: VAE latent channels {z_dim} do not match the DiT's out channels "
                              f"{info.config['out_channels']} (head.head.weight)")
    bar.update()
    if var.image_encoder:
        bar.set_postfix_str("image encoder")
        clip = with_path(files.image_encoder, lambda: load_clip_from_original(
            files.image_encoder, num_heads=image_encoder_heads, torch_dtype=torch_dtype))
        if clip.config.hidden_size != info.config["image_dim"]:
            raise ConversionError(f"{files.image_encoder}: CLIP width {clip.config.hidden_size} does not match the "
                                  f"DiT's img_emb.proj.0 width {info.config['image_dim']}")
        components.update(image_encoder=clip, image_processor=make_clip_image_processor(clip.config.image_size))
        bar.update()
    return components


def describe_release(var: WanVariant, info: DitInfo, files: ReleaseFiles, transformer_only: bool = False) -> str:
    """One line: the detected release row, architecture, width, layers and experts, and the files used."""
    width = info.config["num_attention_heads"] * info.config["attention_head_dim"]
    experts = len(files.dit)
    used = {"DiT": ", ".join(str(p) for p in files.dit)}
    if not transformer_only:
        used.update({"text encoder": files.text_encoder, "tokenizer": files.tokenizer, "VAE": files.vae})
        if var.image_encoder:
            used["image encoder"] = files.image_encoder
        used.update({k.replace("_", " "): v for k, v in files.extras.items() if isinstance(v, Path)})
    return (f"detected {var.name} ({info.arch}, width {width}, {info.config['num_layers']} layers, {experts} "
            f"expert{'s' if experts > 1 else ''}); " + "; ".join(f"{k}: {v}" for k, v in used.items() if v))


def _claiming_family(src, transformer, variant):
    for family in FAMILIES:
        if family.claims_release(Path(src), Path(transformer) if transformer else None, variant):
            return family
    return None


def _check_options(dtype: str, scheduler: str) -> None:
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if scheduler not in SCHEDULERS:
        raise ConversionError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")


def load_release(
    src: str | os.PathLike,
    *,
    variant: str | None = None,
    dtype: str = "bf16",
    scheduler: str = "unipc",
    transformer: str | os.PathLike | None = None,
    transformer_2: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
    image_encoder_heads: int | None = None,
    audio_encoder: str | os.PathLike | None = None,
    motion_controller: str | os.PathLike | None = None,
    relighting_lora: str | os.PathLike | None = None,
    transformer_only: bool = False,
    progress: bool = True,
    keep_quantized: bool = False,
) -> LoadedRelease:
    """Load and validate every component of an original Wan release in memory (nothing is written).

    Arguments as :func:`convert_release`.  The trainer uses this to train from original files directly.
    ``keep_quantized``: a GGUF / fp8 single-file DiT (``transformer=`` / ``transformer_2=``) keeps its Linear
    weights quantized in memory (:func:`~diffusers_wan_ext.conversion.quantized_dit.load_quantized_dit`; ``dtype``
    is the compute dtype), the other components load in ``dtype`` as usual.

    Example:
        >>> release = load_release("Wan2.1-T2V-1.3B", dtype="bf16")  # doctest: +SKIP
        >>> release.variant.pipeline, type(release.transformers[0]).__name__  # doctest: +SKIP
        ('WanPipeline', 'WanTransformer3DModel')
    """
    claimed = _claiming_family(src, transformer, variant)
    if claimed is not None:
        raise ConversionError(f"{src}: a {claimed.title} release, which has its own converter: convert it with "
                              f"convert_release / `diffusers-wan convert` and use the converted folder")
    _check_options(dtype, scheduler)
    torch_dtype = DTYPES[dtype]
    files = find_release_files(
        src, transformer=transformer, transformer_2=transformer_2, text_encoder=text_encoder, tokenizer=tokenizer,
        vae=vae, image_encoder=image_encoder, audio_encoder=audio_encoder, motion_controller=motion_controller,
        relighting_lora=relighting_lora,
    )
    dit_sds, infos = _read_dits(files, keep_quantized)
    info = infos[0]
    var = choose_variant(info, len(infos), variant, files.name_hints)
    _check_unused(var, image_encoder=image_encoder, audio_encoder=audio_encoder)
    _check_complete(src, files, var, transformer_only)
    progress_message(describe_release(var, info, files, transformer_only), progress)
    extras = {f.name: f.check_extras(files.extras, info, transformer_only) for f in FAMILIES}
    family_components: dict[str, Any] = {}
    for family in FAMILIES if not transformer_only else ():  # validated before the big components load
        family_components.update(family.load_components(files.extras, info, var, torch_dtype))
        var = replace(var, pipeline=family.pipeline_override(family_components) or var.pipeline)
    steps = len(infos) + (0 if transformer_only else 4 + int(var.image_encoder) + int(var.audio_encoder))
    with progress_bar(steps, progress) as bar:  # closed before an error propagates: its message stays one line
        transformers_ = _load_transformers(files, dit_sds, infos, torch_dtype, bar)
        for family in FAMILIES:
            family.verify_extras(extras[family.name], transformers_[0], files.extras)
        components: dict[str, Any] = {}
        if not transformer_only:
            components = _load_core_components(files, var, info, torch_dtype, image_encoder_heads, bar,
                                               keep_quantized)
            components.update(family_components)
            bar.update(int(var.audio_encoder))
            components["scheduler"] = make_scheduler(scheduler, var.flow_shift)
            bar.update()
    return LoadedRelease(var, transformers_, components, extras={k: v for k, v in extras.items() if v is not None})


def _write_pipeline_folder(tmp: Path, release: LoadedRelease, src, torch_dtype, max_shard_size: str,
                           fp8_storage: str = "layerwise") -> None:
    var = release.variant
    index: dict[str, Any] = {"_class_name": var.pipeline}
    for name, model in zip(["transformer", "transformer_2"], release.transformers):
        # kept quantized: a folder Diffusers loads
        save_transformer(model, tmp / name, torch_dtype, max_shard_size, fp8_storage)
        # a GGUF folder loads through from_single_file only: the pipeline takes it as transformer=... (Diffusers
        # would load a listed optional transformer from the folder even when one is passed)
        index[name] = [None, None] if kept_quantized_kind(model) == "gguf" else library_of(model)
    for name, comp in release.components.items():
        save_component(comp, tmp / name, torch_dtype)  # a kept-quantized text encoder: its own folder
        index[name] = library_of(comp)
    pipe_cls = getattr(diffusers, var.pipeline)
    expected, _ = pipe_cls._get_signature_keys(pipe_cls)
    for name in sorted(expected):
        index.setdefault(name, [None, None])  # optional component not part of this release
    init_params = set(pipe_cls.__init__.__code__.co_varnames)
    if "boundary_ratio" in init_params:
        index["boundary_ratio"] = var.boundary_ratio
    if "expand_timesteps" in init_params:
        index["expand_timesteps"] = var.expand_timesteps
    index["_diffusers_version"] = diffusers.__version__
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    notes = "".join(f.write_extras(tmp, release.extras.get(f.name), torch_dtype) for f in FAMILIES)
    rewrite_model_index_for_shims(tmp)  # our pipeline classes: shim route for fresh interpreters
    call = next((f.card_calls[var.pipeline] for f in FAMILIES if var.pipeline in f.card_calls), None)
    write_model_card(tmp, var, var.pipeline, str(src), call=call, extra=notes)
    (tmp / "wan_variant.json").write_text(json.dumps(var.record(), indent=2) + "\n")


def convert_release(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    variant: str | None = None,
    dtype: str = "bf16",
    scheduler: str = "unipc",
    transformer: str | os.PathLike | None = None,
    transformer_2: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
    image_encoder_heads: int | None = None,
    audio_encoder: str | os.PathLike | None = None,
    motion_controller: str | os.PathLike | None = None,
    relighting_lora: str | os.PathLike | None = None,
    transformer_only: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: str = "5GB",
    keep_quantized: bool = False,
    fp8_storage: str = "layerwise",
) -> Path:
    """Convert an original Wan release to a Diffusers pipeline folder and return its path.

    Args:
        src: release folder (``diffusion_pytorch_model*.safetensors`` or ``high_noise_model/`` + ``low_noise_model/``,
            ``models_t5_umt5-xxl-enc-bf16.pth``, ``Wan2.x_VAE.pth``, ``google/umt5-xxl/``, CLIP ``.pth`` for I2V /
            FLF2V, ``wav2vec2-large-xlsr-53-english/`` for S2V) or a single DiT file (e.g. krea's).  A release a
            family converts itself is recognised first (LongCat-Video: its DiT keys; Video-As-Prompt:
            ``transformer/config.json`` class ``WanTransformer3DMOTModel``).
        dst: output folder; must not exist unless ``overwrite`` (an empty folder is fine).  It is claimed first
            (``.<name>.lock`` beside it: a second conversion into it fails at once); the result is written to
            ``.<name>.partial-<pid>`` and moved into place when complete; with ``overwrite`` the old folder is
            deleted only once the new one is in place.  SIGTERM / Ctrl-C remove the partial output; leftovers of a
            killed conversion are removed by the next one.
        variant: release name (``diffusers-wan variants`` lists them); detected from the weights when omitted.
        dtype: storage dtype of the transformer(s), text and image encoders (``bf16``, ``fp16``, ``fp32``); the VAE is
            kept in float32.
        scheduler: ``unipc`` (stock, as the Wan-AI Diffusers repos), ``euler`` (stock flow-match Euler),
            ``diffsynth`` (DiffSynth-exact Euler) or ``original-unipc`` (original Wan FlowUniPC schedule).
        audio_encoder: the S2V audio encoder folder (default: ``wav2vec2-large-xlsr-53-english/`` next to the DiT);
            it becomes ``audio_encoder`` (``Wav2Vec2Model``, float32) and ``audio_processor``.
        motion_controller: the speed-control module (``DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1``
            ``model.safetensors``) to add as a ``motion_controller`` component; the folder then loads as
            :class:`~diffusers_wan_ext.WanSpeedControlPipeline` (text-to-video DiTs only).
        relighting_lora: Wan2.2-Animate's relighting LoRA (``relighting_lora.ckpt``; found next to the DiT when
            omitted); written as a Diffusers LoRA to ``relighting_lora/pytorch_lora_weights.safetensors``.
        transformer_only: write only a transformer model folder (no other component needed).
        keep_quantized: a GGUF / fp8 single-file DiT stays quantized in the folder
            (:func:`~diffusers_wan_ext.conversion.quantized_dit.save_quantized_transformer`).
        fp8_storage: with ``keep_quantized``, how fp8 weights are written: ``"layerwise"`` (fp8 without a scale, for
            ``enable_layerwise_casting``) or ``"torchao"`` (torchao float8 weights keeping the file's scales).
        progress: the progress bar, and one line (stderr) with the detected release and the files used.

    Example:
        >>> convert_release("Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B-diffusers")  # doctest: +SKIP
    """
    check_fp8_storage(fp8_storage)
    with claim_destination(dst, overwrite=overwrite):  # before loading: a second writer of dst fails at once
        claimed = _claiming_family(src, transformer, variant)
        if claimed is not None:  # its own layout and pipeline; scheduler / CLIP / motion options do not apply
            if keep_quantized and not transformer_only:
                raise ConversionError(f"--keep-quantized: the {claimed.title} converter writes dequantized weights; "
                                      "keep its DiT alone quantized with --transformer-only, or convert without "
                                      "--keep-quantized")
            if keep_quantized:  # the DiT alone (load_quantized_dit reads the LongCat layout too)
                model = load_quantized_dit(transformer or src, torch_dtype=DTYPES[dtype])
                check_kept_quantized([model])
                with atomic_output_dir(dst, overwrite=overwrite) as tmp:
                    save_transformer(model, tmp, DTYPES[dtype], max_shard_size, fp8_storage)
                return Path(dst)
            progress_message(f"detected a {claimed.title} release ({src}); its own converter runs", progress)
            options = ReleaseOptions(dtype=dtype, transformer=transformer, text_encoder=text_encoder,
                                     tokenizer=tokenizer, vae=vae, transformer_only=transformer_only,
                                     overwrite=overwrite, progress=progress, max_shard_size=max_shard_size,
                                     image_encoder_heads=image_encoder_heads, variant=variant)
            return claimed.convert_release(Path(src), Path(dst), options)
        release = load_release(
            src, variant=variant, dtype=dtype, scheduler=scheduler, transformer=transformer,
            transformer_2=transformer_2, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
            image_encoder=image_encoder, image_encoder_heads=image_encoder_heads, audio_encoder=audio_encoder,
            motion_controller=motion_controller, relighting_lora=relighting_lora, transformer_only=transformer_only,
            progress=progress, keep_quantized=keep_quantized,
        )
        if keep_quantized:
            check_kept_quantized(release.transformers)
        with atomic_output_dir(dst, overwrite=overwrite) as tmp:
            if transformer_only:
                save_transformer(release.transformers[0], tmp, DTYPES[dtype], max_shard_size, fp8_storage)
                if len(release.transformers) == 2:
                    save_transformer(release.transformers[1], tmp / "transformer_2", DTYPES[dtype], max_shard_size,
                                     fp8_storage)
            else:
                _write_pipeline_folder(tmp, release, src, DTYPES[dtype], max_shard_size, fp8_storage)
    return Path(dst)
