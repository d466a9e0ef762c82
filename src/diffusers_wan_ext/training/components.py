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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch

from ..conversion.audio_encoder import load_audio_processor_from_release
from ..conversion.dit import load_dit_from_original
from ..conversion.release_io import DTYPES
from ..families import FAMILIES, ModelFamily, training_declarations
from ..release_converter import load_release
from ..utils.io import read_json

__all__ = ["DTYPES", "WanTrainingComponents", "family_of_pipeline", "load_training_components", "load_transformer",
           "model_family"]

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


def model_family(model_path: str | os.PathLike, transformer_path: Any = None) -> ModelFamily | None:
    """The family of the model a run trains, told before any weights load: the one whose own release layout
    ``transformer_path`` is (LongCat-Video ``dit/``), else the one shipping the pipeline class of ``model_path``'s
    ``model_index.json``, else the one that claims the release folder ``model_path``; ``None`` when none does (a Wan
    model of the core family, or an unreadable folder: the loaders report that)."""
    if isinstance(transformer_path, (str, os.PathLike)) and Path(transformer_path).exists():
        found = next((f for f in FAMILIES if f.claims_release(Path(transformer_path), None, None)), None)
        if found is not None:
            return found
    model_path = Path(model_path)
    index = model_path / "model_index.json"
    if index.is_file():
        name = _read_index(model_path).get("_class_name")
        return family_of_pipeline(name[1] if isinstance(name, list) else name)
    if model_path.is_dir():
        return next((f for f in FAMILIES if f.claims_release(model_path, None, None)), None)
    return None


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
) -> WanTrainingComponents:
    """Load the trained expert (+ the encoders) from a Diffusers folder or an original release folder.

    Args:
        model_path: converted Diffusers pipeline folder (``model_index.json``) or original release folder.
        expert: ``"transformer"`` or ``"transformer_2"``.
        dtype: dtype of the transformer and the text / image encoders; ``vae_dtype`` of the VAE (default ``dtype``).
        load_encoders: ``False`` skips text encoder, tokenizer, VAE and CLIP (training from a cache).
        transformer_path: load the expert from here instead (Diffusers transformer folder or original DiT).
        tokenizer_path, audio_processor_path: load the tokenizer / the S2V audio processor from these folders
            instead (DiffSynth-Studio's ``--tokenizer_path`` / ``--audio_processor_path``).
    """
    model_path = Path(model_path)
    vae_dtype = vae_dtype or dtype
    other = "transformer_2" if expert == "transformer" else "transformer"
    if (model_path / "model_index.json").is_file():
        index = _read_index(model_path)
        pipeline_class = index["_class_name"] if isinstance(index["_class_name"], str) else index["_class_name"][1]
        has_two = bool(index.get("transformer_2", [None, None])[0]) and index.get("boundary_ratio") is not None
        if expert == "transformer_2" and not index.get("transformer_2", [None, None])[0]:  # Wan-Dancer: no boundary
            raise ValueError(f"{model_path} has one transformer; transformer_2 exists only in two-expert (Wan2.2 "
                             f"A14B) and Wan-Dancer (local model) folders: train --lora_base_model transformer")
        overrides: dict[str, Any] = {other: None}
        if not load_encoders:
            overrides.update({name: None for name in ENCODERS if name in index})
        if transformer_path is not None:
            overrides[expert] = load_transformer(transformer_path, dtype)
        if load_encoders and tokenizer_path is not None:
            overrides["tokenizer"] = load_tokenizer(tokenizer_path)
        if load_encoders and audio_processor_path is not None:
            _check_audio_processor(model_path, "audio_processor" in index)
            overrides["audio_processor"] = load_audio_processor_from_release(audio_processor_path)
        # the folder's own class: ``DiffusionPipeline.from_pretrained`` would take the passed ``transformer`` /
        # ``transformer_2`` (optional components of the Wan pipelines, not of ``DiffusionPipeline``) for config
        # values and load the folder's weights instead
        pipeline_cls = getattr(diffusers, pipeline_class, None)
        if not (isinstance(pipeline_cls, type) and issubclass(pipeline_cls, diffusers.DiffusionPipeline)):
            pipeline_cls = diffusers.DiffusionPipeline
        pipe = pipeline_cls.from_pretrained(str(model_path), dtype={"default": dtype, "vae": vae_dtype}, **overrides)
        parts = {name: getattr(pipe, name, None) for name in SHARED_PARTS}
        extras = {name: getattr(pipe, name, None) for name in EXTRA_PARTS}
        transformer = getattr(pipe, expert)
        boundary_ratio = pipe.config.get("boundary_ratio") if has_two else None
        expand = bool(pipe.config.get("expand_timesteps", False))
    elif model_path.exists():
        name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        release = load_release(model_path, dtype=name, transformer_only=not load_encoders,
                               image_encoder_heads=image_encoder_heads, progress=progress,
                               tokenizer=tokenizer_path if load_encoders else None)
        pipeline_class = release.pipeline_class
        has_two = len(release.transformers) == 2
        if expert == "transformer_2" and not has_two:
            raise ValueError(f"{model_path} has one DiT; transformer_2 exists only in two-expert (Wan2.2 A14B) "
                             f"releases (high_noise_model/ + low_noise_model/)")
        transformer = release.transformers[1 if expert == "transformer_2" else 0]
        if transformer_path is not None:
            transformer = load_transformer(transformer_path, dtype)
        parts = {name: release.components.get(name) for name in SHARED_PARTS}
        extras = {name: release.components.get(name) for name in EXTRA_PARTS}
        if parts["vae"] is not None:
            parts["vae"] = parts["vae"].to(vae_dtype)
        if load_encoders and audio_processor_path is not None:
            _check_audio_processor(model_path, parts["audio_processor"] is not None)
            parts["audio_processor"] = load_audio_processor_from_release(audio_processor_path)
        boundary_ratio = release.variant.boundary_ratio if has_two else None
        expand = bool(release.variant.expand_timesteps)
    else:
        raise FileNotFoundError(f"--model_path {model_path}: no such folder; pass a converted Diffusers folder "
                                f"(model_index.json) or an original Wan release folder")
    if transformer is None:
        raise ValueError(f"{model_path}: the pipeline has no {expert}")
    return WanTrainingComponents(
        pipeline_class=pipeline_class, expert=expert, transformer=transformer, boundary_ratio=boundary_ratio,
        expand_timesteps=expand, has_two_experts=has_two, **parts,
        extra_components={k: v for k, v in extras.items() if v is not None},
    )
