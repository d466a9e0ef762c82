"""Load what training needs from a converted Diffusers folder or an original Wan release.

Only the expert being trained is kept (Wan2.2 A14B trains ``transformer`` and ``transformer_2`` in separate runs),
and the encoders are skipped when training from a cache (``--task sft:train``).

Example:
    >>> c = load_training_components("Wan2.1-T2V-1.3B-diffusers", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> c.pipeline_class, c.spatial_multiple  # doctest: +SKIP
    ('WanPipeline', 16)
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch

from ..conversion.audio_encoder import load_audio_processor_from_release
from ..conversion.dit import find_dit_files, load_dit_from_original
from ..conversion.release_io import DTYPES, progress_message
from ..families import FAMILIES, ModelFamily, ReleaseOptions, training_declarations
from ..release_converter import load_release
from ..utils.io import read_json
from .release_cache import CACHE_OPTION, cached_conversion, check_cache_dir

__all__ = ["DTYPES", "ModelFolder", "WanTrainingComponents", "family_of_pipeline", "is_pipeline_class",
           "load_training_components", "load_transformer", "model_family", "model_folder", "release_family"]

ENCODERS = ("text_encoder", "tokenizer", "vae", "image_encoder", "image_processor", "audio_encoder", "audio_processor")
#: The pipeline components training reads besides the transformers.
SHARED_PARTS = ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor", "audio_encoder",
                "audio_processor")
#: The families' extra trainable components (``motion_controller`` ...).
EXTRA_PARTS = tuple(c.name for c in training_declarations()[1])


@dataclass
class WanTrainingComponents:
    """The pieces of a Wan pipeline that training uses.

    Attributes:
        pipeline_class: the folder's pipeline class name (``WanPipeline``, ``WanFunControlPipeline`` ...).
        expert: ``"transformer"`` or ``"transformer_2"`` (the expert being trained; for one-expert models
            ``"transformer"``).
        transformer: that expert.
        boundary_ratio: the two-expert switch (``None`` for one expert).
        expand_timesteps: Wan2.2 TI2V-5B's per-token timesteps / first-frame mode.
        vae, text_encoder, tokenizer, image_encoder, image_processor, audio_encoder, audio_processor: the other
            components (``None``
            if absent or not loaded; the S2V audio encoder stays frozen).
        extra_components: the families' extra trainable components the folder has, by name
            (:class:`~diffusers_wan_ext.families.TrainingComponent`).
    """

    pipeline_class: str
    expert: str
    transformer: Any
    boundary_ratio: float | None = None
    expand_timesteps: bool = False
    has_two_experts: bool = False
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    image_encoder: Any = None
    image_processor: Any = None
    audio_encoder: Any = None
    audio_processor: Any = None
    extra_components: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_multiple(self) -> int | None:
        """Frame sizes must be multiples of this: VAE spatial factor x patch size (16 for Wan2.1, 32 for TI2V-5B);
        ``None`` without a VAE (training from a cache)."""
        if self.vae is None:
            return None
        factor = int(getattr(self.vae.config, "scale_factor_spatial", None) or 8)
        return factor * int(self.transformer.config.patch_size[1])


def _read_index(folder: Path) -> dict[str, Any]:
    return read_json(folder / "model_index.json", "model index")  # bad content: one line naming the file


def load_transformer(path: str | os.PathLike, dtype: torch.dtype):
    """A transformer from a Diffusers model folder (``config.json`` + weights), original DiT weights, or a family's
    own release layout (:meth:`~diffusers_wan_ext.families.ModelFamily.load_training_transformer`)."""
    if isinstance(path, torch.nn.Module):  # loaded already (the trainer's quantized base)
        return path
    path = Path(path)
    for family in FAMILIES:  # a family's own release layout (LongCat-Video dit/, Video-As-Prompt transformer/)
        model = family.load_training_transformer(path, dtype)
        if model is not None:
            return model
    config_file = path / "config.json"
    config = read_json(config_file, "transformer config") if path.is_dir() and config_file.is_file() else {}
    if config.get("_class_name", "WanModel") != "WanModel":  # a Diffusers model folder (originals say WanModel)
        return diffusers.AutoModel.from_pretrained(str(path), dtype=dtype)
    return load_dit_from_original(path, torch_dtype=dtype)


def family_of_pipeline(pipeline_class: str) -> ModelFamily | None:
    """The family shipping the pipeline class named ``pipeline_class`` (``None``: a stock Wan pipeline)."""
    return next((f for f in FAMILIES if any(c.__name__ == pipeline_class for c in f.pipeline_classes)), None)


def is_pipeline_class(name: Any) -> bool:
    """Whether ``name`` (a ``model_index.json`` ``_class_name``) is a Diffusers pipeline class: a stock one or one a
    family ships (ours are registered on the ``diffusers`` namespace on import)."""
    if not isinstance(name, str):
        return False
    cls = getattr(diffusers, name, None)
    on_diffusers = isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)
    return on_diffusers or family_of_pipeline(name) is not None


def index_class_name(index: Any) -> Any:
    """The pipeline class a ``model_index.json`` names (``["diffusers_wan_ext", Name]``: ``Name``)."""
    name = index.get("_class_name") if isinstance(index, dict) else None
    return name[1] if isinstance(name, list) and len(name) == 2 else name


def release_family(folder: str | os.PathLike) -> ModelFamily | None:
    """The family whose release detector claims ``folder`` (a release it converts itself: MOVA, Wan2.2-Animate-2,
    Wan-Dancer, LongCat-Video, Video-As-Prompt), else ``None``."""
    return next((f for f in FAMILIES if f.claims_release(Path(folder), None, None)), None)


@dataclass(frozen=True)
class ModelFolder:
    """What ``--model_path`` is, told from its ``model_index.json`` and the families' release detectors before any
    weights load.

    Attributes:
        path: the folder (or file).
        kind: ``"converted"`` (a ``model_index.json`` naming a Diffusers pipeline class), ``"family_release"`` (a
            release a family converts itself, e.g. MOVA's, whose own ``model_index.json`` names ``MOVA``) or
            ``"release"`` (an original Wan release, read by the core release loader).
        family: the family of the converted pipeline class or of the release (``None``: the core Wan family).
        pipeline_class: the converted folder's pipeline class (``None`` for a release).
    """

    path: Path
    kind: str
    family: ModelFamily | None = None
    pipeline_class: str | None = None


def _has_wan_dit(folder: Path) -> bool:
    return folder.is_dir() and (find_dit_files(folder) is not None or (folder / "high_noise_model").is_dir())


def model_folder(model_path: str | os.PathLike) -> ModelFolder:
    """Route ``--model_path``: a ``model_index.json`` naming a stock or our Diffusers pipeline class is a converted
    folder; a release layout a family's detector claims is that family's release (whatever index it carries); any
    other folder is an original Wan release, unless it has a ``model_index.json`` and no Wan DiT: then one error line
    naming the folder and what was expected."""
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"--model_path {path}: no such folder; pass a converted Diffusers folder "
                                f"(model_index.json) or an original Wan release folder")
    has_index = (path / "model_index.json").is_file()
    name = index_class_name(_read_index(path)) if has_index else None
    if is_pipeline_class(name):
        return ModelFolder(path, "converted", family_of_pipeline(name), name)
    family = release_family(path) if path.is_dir() else None
    if family is not None:
        return ModelFolder(path, "family_release", family)
    if has_index and not _has_wan_dit(path):
        raise ValueError(
            f"--model_path {path}: its model_index.json names {name!r}, neither a Diffusers pipeline class nor a "
            f"release a model family reads; expected a converted Diffusers folder (model_index.json of WanPipeline, "
            f"MovaPipeline, ...) or an original release folder (Wan-AI, MOVA, Animate-2, Wan-Dancer, LongCat-Video, "
            f"Video-As-Prompt layout)")
    return ModelFolder(path, "release")


def model_family(model_path: str | os.PathLike, transformer_path: Any = None) -> ModelFamily | None:
    """The family of the model a run trains, told before any weights load: the one whose own release layout
    ``transformer_path`` is (LongCat-Video ``dit/``), else the one of ``model_path`` (:func:`model_folder`: the family
    shipping its ``model_index.json``'s pipeline class, or claiming its release layout); ``None`` when none does (a
    Wan model of the core family, or a missing folder: the loaders report that)."""
    if isinstance(transformer_path, (str, os.PathLike)) and Path(transformer_path).exists():
        found = release_family(transformer_path)
        if found is not None:
            return found
    if not Path(model_path).exists():
        return None
    return model_folder(model_path).family


def load_tokenizer(path: str | os.PathLike):
    """``--tokenizer_path``: a tokenizer folder (``google/umt5-xxl``), one error line naming it when unreadable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer_path {path}: not a tokenizer folder ({str(e).splitlines()[0]})") from e


def _check_audio_processor(model_path: Path, present: bool) -> None:
    if not present:
        raise ValueError(f"--audio_processor_path: {model_path} has no audio processor to replace (only Wan2.2-S2V "
                         f"models take audio)")


@dataclass(frozen=True)
class _LoadOptions:
    expert: str
    dtype: torch.dtype
    vae_dtype: torch.dtype
    load_encoders: bool
    transformer_path: Any
    image_encoder_heads: int | None
    tokenizer_path: Any
    audio_processor_path: Any
    progress: bool
    conversion_cache_dir: Path | None = None

    @property
    def dtype_name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]


def load_training_components(
    model_path: str | os.PathLike,
    *,
    expert: str = "transformer",
    dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype | None = None,
    load_encoders: bool = True,
    transformer_path: str | os.PathLike | None = None,
    image_encoder_heads: int | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    audio_processor_path: str | os.PathLike | None = None,
    progress: bool = False,
    conversion_cache_dir: str | os.PathLike | None = None,
) -> WanTrainingComponents:
    """Load the trained expert (+ the encoders) from a Diffusers folder or an original release folder.

    Args:
        model_path: converted Diffusers pipeline folder (``model_index.json``) or original release folder: a Wan
            release read in memory, or a release a family converts itself (MOVA, Wan2.2-Animate-2, Wan-Dancer,
            LongCat-Video, Video-As-Prompt), converted into a temporary folder that is removed once loaded, or
            kept in ``conversion_cache_dir`` (:func:`model_folder` tells which).
        expert: ``"transformer"`` or ``"transformer_2"``.
        dtype: dtype of the transformer and the text / image encoders; ``vae_dtype`` of the VAE (default ``dtype``).
        load_encoders: ``False`` skips text encoder, tokenizer, VAE and CLIP (training from a cache).
        transformer_path: load the expert from here instead (Diffusers transformer folder or original DiT).
        tokenizer_path, audio_processor_path: load the tokenizer / the S2V audio processor from these folders
            instead (DiffSynth-Studio's ``--tokenizer_path`` / ``--audio_processor_path``).
        conversion_cache_dir: keep a family release's converted folder here for later runs
            (:func:`~diffusers_wan_ext.training.release_cache.cached_conversion`); checked before anything loads.
    """
    cache = check_cache_dir(conversion_cache_dir) if conversion_cache_dir is not None else None
    opts = _LoadOptions(expert, dtype, vae_dtype or dtype, load_encoders, transformer_path, image_encoder_heads,
                        tokenizer_path, audio_processor_path, progress, cache)
    folder = model_folder(model_path)
    if folder.kind == "converted":
        return _load_converted(folder.path, opts, folder.path)
    if folder.kind == "family_release":
        return _load_family_release(folder, opts)
    return _load_release(folder.path, opts)


def _load_family_release(folder: ModelFolder, opts: _LoadOptions) -> WanTrainingComponents:
    """A release its family converts itself: converted (every component, the run's dtype) into a temporary folder
    (under ``TMPDIR``), loaded from there as a converted folder, and the temporary folder removed; with
    ``conversion_cache_dir`` the converted folder is kept there and reused while the release and options are the
    same."""
    options = ReleaseOptions(dtype=opts.dtype_name, tokenizer=opts.tokenizer_path if opts.load_encoders else None,
                             progress=opts.progress, image_encoder_heads=opts.image_encoder_heads, overwrite=True)
    if opts.conversion_cache_dir is not None:
        converted = cached_conversion(opts.conversion_cache_dir, folder.path, folder.family, options, opts.progress)
        return _load_converted(converted, opts, folder.path)
    with tempfile.TemporaryDirectory(prefix="diffusers-wan-train-", ignore_cleanup_errors=True) as tmp:
        progress_message(f"{folder.path}: a {folder.family.short_title} release; converting it for training "
                         f"into {tmp} (removed once loaded; {CACHE_OPTION} DIR keeps it for later runs)",
                         opts.progress)
        converted = folder.family.convert_release(folder.path, Path(tmp) / "model", options)
        return _load_converted(Path(converted), opts, folder.path)


def _load_converted(model_path: Path, opts: _LoadOptions, shown: Path) -> WanTrainingComponents:
    """A converted Diffusers folder (``shown``: the folder the user passed, for the messages)."""
    expert = opts.expert
    index = _read_index(model_path)
    pipeline_class = index_class_name(index)
    has_two = bool(index.get("transformer_2", [None, None])[0]) and index.get("boundary_ratio") is not None
    if expert == "transformer_2" and not index.get("transformer_2", [None, None])[0]:  # Wan-Dancer: no boundary
        raise ValueError(f"{shown} has one transformer; transformer_2 exists only in two-expert (Wan2.2 "
                         f"A14B) and Wan-Dancer (local model) folders: train --lora_base_model transformer")
    overrides: dict[str, Any] = {"transformer_2" if expert == "transformer" else "transformer": None}
    if not opts.load_encoders:
        overrides.update({name: None for name in ENCODERS if name in index})
    if opts.transformer_path is not None:
        overrides[expert] = load_transformer(opts.transformer_path, opts.dtype)
    if opts.load_encoders and opts.tokenizer_path is not None:
        overrides["tokenizer"] = load_tokenizer(opts.tokenizer_path)
    if opts.load_encoders and opts.audio_processor_path is not None:
        _check_audio_processor(shown, "audio_processor" in index)
        overrides["audio_processor"] = load_audio_processor_from_release(opts.audio_processor_path)
    # the folder's own class: ``DiffusionPipeline.from_pretrained`` would take the passed ``transformer`` /
    # ``transformer_2`` (optional components of the Wan pipelines, not of ``DiffusionPipeline``) for config
    # values and load the folder's weights instead
    pipeline_cls = getattr(diffusers, pipeline_class, None)
    if not (isinstance(pipeline_cls, type) and issubclass(pipeline_cls, diffusers.DiffusionPipeline)):
        pipeline_cls = diffusers.DiffusionPipeline
    pipe = pipeline_cls.from_pretrained(str(model_path), dtype={"default": opts.dtype, "vae": opts.vae_dtype},
                                        **overrides)
    return _components(
        shown, opts, pipeline_class, getattr(pipe, expert), {name: getattr(pipe, name, None) for name in SHARED_PARTS},
        {name: getattr(pipe, name, None) for name in EXTRA_PARTS}, has_two,
        pipe.config.get("boundary_ratio") if has_two else None, bool(pipe.config.get("expand_timesteps", False)))


def _load_release(model_path: Path, opts: _LoadOptions) -> WanTrainingComponents:
    """An original Wan release, read in memory by the core release loader."""
    expert = opts.expert
    release = load_release(model_path, dtype=opts.dtype_name, transformer_only=not opts.load_encoders,
                           image_encoder_heads=opts.image_encoder_heads, progress=opts.progress,
                           tokenizer=opts.tokenizer_path if opts.load_encoders else None)
    has_two = len(release.transformers) == 2
    if expert == "transformer_2" and not has_two:
        raise ValueError(f"{model_path} has one DiT; transformer_2 exists only in two-expert (Wan2.2 A14B) "
                         f"releases (high_noise_model/ + low_noise_model/)")
    transformer = release.transformers[1 if expert == "transformer_2" else 0]
    if opts.transformer_path is not None:
        transformer = load_transformer(opts.transformer_path, opts.dtype)
    parts = {name: release.components.get(name) for name in SHARED_PARTS}
    if parts["vae"] is not None:
        parts["vae"] = parts["vae"].to(opts.vae_dtype)
    if opts.load_encoders and opts.audio_processor_path is not None:
        _check_audio_processor(model_path, parts["audio_processor"] is not None)
        parts["audio_processor"] = load_audio_processor_from_release(opts.audio_processor_path)
    return _components(
        model_path, opts, release.pipeline_class, transformer, parts,
        {name: release.components.get(name) for name in EXTRA_PARTS}, has_two,
        release.variant.boundary_ratio if has_two else None, bool(release.variant.expand_timesteps))


def _components(shown: Path, opts: _LoadOptions, pipeline_class: str, transformer: Any, parts: dict[str, Any],
                extras: dict[str, Any], has_two: bool, boundary_ratio: float | None,
                expand: bool) -> WanTrainingComponents:
    if transformer is None:
        raise ValueError(f"{shown}: the pipeline has no {opts.expert}")
    return WanTrainingComponents(
        pipeline_class=pipeline_class, expert=opts.expert, transformer=transformer, boundary_ratio=boundary_ratio,
        expand_timesteps=expand, has_two_experts=has_two, **parts,
        extra_components={k: v for k, v in extras.items() if v is not None},
    )
