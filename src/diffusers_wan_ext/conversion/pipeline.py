"""Convert an original Wan release (folder or individual files) into a complete Diffusers pipeline folder.

Nothing is written until every component has been found and validated; the result is assembled in a temporary
folder next to the destination and moved into place only when complete (:func:`~diffusers_wan_ext.utils.atomic_output_dir`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..utils.shims import rewrite_model_index_for_shims
from ..utils.io import ConversionError, atomic_output_dir, load_state_dict, strip_known_prefixes
from .dit import (
    DitInfo,
    build_transformer,
    cast_state_dict,
    check_shapes,
    convert_dit_state_dict,
    dit_config_from_state_dict,
    find_dit_files,
    locate_dit,
)
from .audio_encoder import WAV2VEC_DIR
from .variants import VARIANTS, WanVariant, get_variant, variants_for_arch

__all__ = ["LoadedRelease", "ReleaseFiles", "find_release_files", "load_release", "convert_release", "add_motion_controller", "DTYPES", "SCHEDULERS", "write_model_card"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Original release file names (Wan2.1 / Wan2.2 configs).
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILES = {"wan2.1": "Wan2.1_VAE.pth", "wan2.2": "Wan2.2_VAE.pth"}
TOKENIZER_DIR = "google/umt5-xxl"
EXPERT_DIRS = ("high_noise_model", "low_noise_model")  # -> transformer, transformer_2
# File-name hints for single-file DiTs whose weights alone do not name the release.
# (fragments that must all occur in the lower-cased name, variant) -- first match wins.
FILENAME_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("krea",), "krea-realtime-video"),
    (("fun", "1.3b", "inp"), "wan2.1-fun-1.3b-inp"),
    (("wan2.2", "fun", "inp"), "wan2.2-fun-a14b-inp"),
    (("fun", "inp"), "wan2.1-fun-14b-inp"),
)


def _name_hint(name: str) -> str | None:
    name = name.lower()
    for frags, variant in FILENAME_HINTS:
        if all(f in name for f in frags):
            return variant
    return None


def _scheduler_factory(kind: str, shift: float):
    if kind == "unipc":  # what the Wan-AI *-Diffusers repos ship
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
        )
    if kind == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(shift=shift)
    if kind == "diffsynth":
        from ..schedulers import WanFlowMatchScheduler

        return WanFlowMatchScheduler(shift=shift)
    if kind == "original-unipc":
        from ..schedulers import WanFlowUniPCScheduler

        return WanFlowUniPCScheduler(flow_shift=shift)
    raise ConversionError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")


SCHEDULERS = ("unipc", "euler", "diffsynth", "original-unipc")


@dataclass
class ReleaseFiles:
    """Where each component of an original release lives."""

    dit: list[Path] = field(default_factory=list)  # one per expert: high-noise first
    dit_config: list[dict] = field(default_factory=list)
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    vae: Path | None = None
    image_encoder: Path | None = None
    audio_encoder: Path | None = None  # Wan2.2-S2V: the wav2vec2 folder (model + processor)
    relighting_lora: Path | None = None  # Wan2.2-Animate
    name_hint: str | None = None


def _first_existing(*paths: Path) -> Path | None:
    for p in paths:
        if p is not None and p.exists():
            return p
    return None


def find_release_files(
    src: str | os.PathLike,
    *,
    transformer: str | os.PathLike | None = None,
    transformer_2: str | os.PathLike | None = None,
    text_encoder: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
    audio_encoder: str | os.PathLike | None = None,
    relighting_lora: str | os.PathLike | None = None,
) -> ReleaseFiles:
    """Locate the components of a release folder (or a single DiT file plus explicitly given component files)."""
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    files = ReleaseFiles()
    root = src if src.is_dir() else src.parent
    files.name_hint = _name_hint(src.name)

    explicit = [Path(t) for t in (transformer, transformer_2) if t is not None]
    if explicit:
        entries = [locate_dit(p) for p in explicit]
    elif src.is_file():
        entries = [locate_dit(src)]
    elif all((src / d).is_dir() for d in EXPERT_DIRS):
        entries = [locate_dit(src / d) for d in EXPERT_DIRS]
    else:
        w = find_dit_files(src)
        if w is None:
            singles = [p for p in src.glob("*.safetensors")]
            if len(singles) == 1:
                w = singles[0]
                files.name_hint = _name_hint(w.name) or files.name_hint
            else:
                raise ConversionError(
                    f"{src}: no DiT weights found (expected diffusion_pytorch_model*.safetensors, "
                    f"{'/ '.join(EXPERT_DIRS)} sub-folders, or pass --transformer FILE)"
                )
        entries = [locate_dit(w)]
    files.dit = [e[0] for e in entries]
    files.dit_config = [e[1] for e in entries]

    files.text_encoder = Path(text_encoder) if text_encoder else _first_existing(root / T5_FILE)
    files.tokenizer = Path(tokenizer) if tokenizer else _first_existing(root / TOKENIZER_DIR, root / "tokenizer")
    files.vae = Path(vae) if vae else _first_existing(*(root / f for f in VAE_FILES.values()))
    files.image_encoder = Path(image_encoder) if image_encoder else _first_existing(root / CLIP_FILE)
    files.audio_encoder = Path(audio_encoder) if audio_encoder else _first_existing(root / WAV2VEC_DIR)
    from .animate import find_relighting_lora

    files.relighting_lora = Path(relighting_lora) if relighting_lora else find_relighting_lora(root)
    return files


def choose_variant(info: DitInfo, experts: int, name: str | None, hint: str | None) -> WanVariant:
    """The release row for these weights: ``name`` (``--variant``) if given and consistent, else detected."""
    if name:
        v = get_variant(name)
        if v.arch != info.arch or v.experts != experts:
            raise ConversionError(
                f"--variant {v.name} expects a {v.arch} DiT with {v.experts} expert(s), but the weights are "
                f"{info.arch} with {experts} expert(s) (patch_embedding.weight in_dim {info.config['in_channels']}, "
                f"img_emb.* {'present' if info.config.get('image_dim') else 'absent'})"
            )
        return v
    width = info.config["num_attention_heads"] * info.config["attention_head_dim"]
    if hint:
        v = get_variant(hint)
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


#: Example call of the model card per pipeline class (default: text to video).
CARD_CALLS = {
    "WanAnimatePipeline": (
        'image=load_image("character.png"), pose_video=load_video("src_pose.mp4"),\n'
        '             face_video=load_video("src_face.mp4"), prompt="a person dancing", mode="animate",\n'
        "             height={height}, width={width}, segment_frame_length={num_frames}, "
        "num_inference_steps={num_inference_steps},\n             guidance_scale={guidance_scale}"
    ),
    "WanSpeechToVideoPipeline": (  # num_frames: frames per clip; the clips follow the audio
        'image=load_image("person.png"), audio="speech.wav", prompt="a person is talking",\n'
        "             height={height}, width={width}, num_frames_per_clip={num_frames}, "
        "num_inference_steps={num_inference_steps},\n             guidance_scale={guidance_scale}"
    ),
}
_DEFAULT_CARD_CALL = (
    'prompt="a cat surfing a wave", height={height}, width={width},\n'
    "             num_frames={num_frames}, num_inference_steps={num_inference_steps},\n"
    "             guidance_scale={guidance_scale}"
)


def write_model_card(folder: Path, variant: WanVariant, pipeline_class: str, source: str) -> None:
    call = CARD_CALLS.get(pipeline_class, _DEFAULT_CARD_CALL).format(
        height=variant.height, width=variant.width, num_frames=variant.num_frames,
        num_inference_steps=variant.num_inference_steps, guidance_scale=variant.guidance_scale,
    )
    imports = "from diffusers.utils import load_image, load_video\n" if pipeline_class in CARD_CALLS else ""
    extra = ""
    if (folder / "relighting_lora").is_dir():
        extra = ("\nThe release's relighting LoRA (for `mode=\"replace\"`) is in `relighting_lora/` as a Diffusers LoRA:\n"
                 "`pipe.load_lora_weights(\"<this repo>\", subfolder=\"relighting_lora\")`.\n")
    text = f"""---
library_name: diffusers
tags:
- video-generation
- wan
- diffusers_wan_ext
base_model: {variant.release}
---

# {variant.release} (Diffusers format)

Converted with [diffusers_wan_ext](https://pypi.org/project/diffusers_wan_ext) from `{source}`.
Variant `{variant.name}`; pipeline `{pipeline_class}`.

```python
import torch
from diffusers import DiffusionPipeline
{imports}
pipe = DiffusionPipeline.from_pretrained("<this repo>", torch_dtype=torch.bfloat16, trust_remote_code=True)
video = pipe({call}).frames[0]
```
{extra}
Sampling defaults of the original release: flow shift {variant.flow_shift}, {variant.num_inference_steps} steps,
guidance {variant.guidance_scale}{f' / {variant.guidance_scale_2} (low-noise expert)' if variant.guidance_scale_2 else ''},
{variant.num_frames} frames{" per clip" if variant.audio_encoder else ""} at {variant.fps} fps.
"""
    (folder / "README.md").write_text(text)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="converting", unit="component", disable=not enabled)


@dataclass
class LoadedRelease:
    """Every component of an original release, loaded and validated (what :func:`load_release` returns).

    Attributes:
        variant: the release row (:data:`~diffusers_wan_ext.conversion.variants.VARIANTS`).
        transformers: the DiT(s), high-noise expert first.
        components: ``text_encoder``, ``tokenizer``, ``vae``, ``scheduler`` (+ ``image_encoder``,
            ``image_processor``, ``motion_controller``); empty with ``transformer_only``.
        relighting_lora: Wan2.2-Animate's relighting LoRA (Diffusers layout), if the release has one.
    """

    variant: WanVariant
    transformers: list
    components: dict[str, Any]
    relighting_lora: Any = None  # Wan2.2-Animate: the converted relighting LoRA (written by convert_release)

    @property
    def pipeline_class(self) -> str:
        return self.variant.pipeline


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
) -> LoadedRelease:
    """Load and validate every component of an original Wan release in memory (nothing is written).

    Arguments as :func:`convert_release`.  The trainer uses this to train from original files directly.

    Example:
        >>> release = load_release("Wan2.1-T2V-1.3B", dtype="bf16")  # doctest: +SKIP
        >>> release.variant.pipeline, type(release.transformers[0]).__name__  # doctest: +SKIP
        ('WanPipeline', 'WanTransformer3DModel')
    """
    from .longcat import find_longcat_dit

    if (variant or "").lower() == "longcat-video" or find_longcat_dit(src, transformer) is not None:
        raise ConversionError(f"{src}: a LongCat-Video release, which has its own converter: convert it with "
                              f"convert_release / `diffusers-wan convert` and use the converted folder")
    from .vap import is_vap_release

    if Path(src).is_dir() and is_vap_release(src):
        raise ConversionError(f"{src}: a Video-As-Prompt release (Diffusers format), which has its own converter: "
                              f"convert it with convert_release / `diffusers-wan convert` and use the converted folder")
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if scheduler not in SCHEDULERS:
        raise ConversionError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    torch_dtype = DTYPES[dtype]
    files = find_release_files(
        src, transformer=transformer, transformer_2=transformer_2, text_encoder=text_encoder,
        tokenizer=tokenizer, vae=vae, image_encoder=image_encoder, audio_encoder=audio_encoder,
        relighting_lora=relighting_lora,
    )
    # --- DiT(s): read, detect, validate ----------------------------------------------------------------------
    dit_sds, infos = [], []
    for path, cfg in zip(files.dit, files.dit_config):
        sd = strip_known_prefixes(load_state_dict(path), "blocks.")
        try:
            infos.append(dit_config_from_state_dict(sd, cfg))
        except ConversionError as e:
            raise ConversionError(f"{path}: {e}") from e
        dit_sds.append(sd)
    if len(infos) == 2 and (infos[0].config != infos[1].config):
        diff = sorted(k for k in infos[0].config if infos[0].config[k] != infos[1].config[k])
        raise ConversionError(f"the two experts differ in {', '.join(diff)} ({files.dit[0]} vs {files.dit[1]})")
    info = infos[0]
    var = choose_variant(info, len(infos), variant, files.name_hint)

    needed = {"transformer": files.dit[0]}
    if not transformer_only:
        needed.update(text_encoder=files.text_encoder, tokenizer=files.tokenizer, vae=files.vae)
        if var.image_encoder:
            needed["image_encoder"] = files.image_encoder
        if var.audio_encoder:
            needed["audio_encoder"] = files.audio_encoder
    missing = [k for k, v in needed.items() if v is None]
    if missing:
        flags = ", ".join(f"--{k.replace('_', '-')} PATH" for k in missing)
        raise ConversionError(
            f"{src}: missing component(s) for {var.name}: {', '.join(missing)}. Put the original files next to the DiT "
            f"({T5_FILE}, {TOKENIZER_DIR}/, {VAE_FILES[var.vae]}"
            f"{', ' + CLIP_FILE if var.image_encoder else ''}{', ' + WAV2VEC_DIR + '/' if var.audio_encoder else ''}) "
            f"or pass {flags} (or --transformer-only)."
        )

    lora = None
    if relighting_lora is not None and info.arch != "animate":
        raise ConversionError(f"{relighting_lora}: the relighting LoRA belongs to Wan2.2-Animate, not a {info.arch} DiT")
    if info.arch == "animate" and files.relighting_lora is not None and not transformer_only:
        from .animate import convert_relighting_lora

        lora = _wrap(files.relighting_lora, lambda: convert_relighting_lora(files.relighting_lora))

    mc_model = None
    if motion_controller is not None:
        mc_model = _load_motion_controller_for(motion_controller, info, torch_dtype)
        var = replace(var, pipeline="WanSpeedControlPipeline")

    # --- Load & validate every component before writing anything ----------------------------------------------
    steps = len(infos) + (0 if transformer_only else 4 + int(var.image_encoder) + int(var.audio_encoder))
    bar = _progress(steps, progress)
    transformers_ = []
    for path, sd, inf in zip(files.dit, dit_sds, infos):
        bar.set_postfix_str(f"transformer {path.name}")
        converted = convert_dit_state_dict(sd)
        model = build_transformer(inf)
        try:
            check_shapes(model, converted)
        except ConversionError as e:
            raise ConversionError(f"{path}: {e}") from e
        converted = cast_state_dict(converted, torch_dtype, getattr(model, "_keep_in_fp32_modules", None))
        model.load_state_dict(converted, strict=True, assign=True)
        transformers_.append(model)
        bar.update()
    if lora is not None:  # the LoRA must load into the converted transformer (named keys otherwise)
        from ..lora.loader import check_lora_state_dict

        try:
            check_lora_state_dict(transformers_[0], lora)
        except ValueError as e:
            raise ConversionError(f"{files.relighting_lora}: {e}") from e
    components: dict[str, Any] = {}
    if not transformer_only:
        from .image_encoder import load_clip_from_original, make_clip_image_processor
        from .text_encoder import load_t5_from_original
        from .tokenizer import load_umt5_tokenizer
        from .vae import detect_vae_version, load_vae_from_original

        bar.set_postfix_str("text encoder")
        components["text_encoder"] = _wrap(files.text_encoder, lambda: load_t5_from_original(files.text_encoder, torch_dtype=torch_dtype))
        bar.update()
        bar.set_postfix_str("tokenizer")
        components["tokenizer"] = _wrap(files.tokenizer, lambda: load_umt5_tokenizer(files.tokenizer))
        bar.update()
        bar.set_postfix_str("vae")
        vae_sd = _wrap(files.vae, lambda: load_state_dict(files.vae))
        version = _wrap(files.vae, lambda: detect_vae_version(vae_sd))
        if version != var.vae:
            raise ConversionError(
                f"{files.vae}: a {version} VAE, but {var.name} needs the {var.vae} VAE ({VAE_FILES[var.vae]})"
            )
        components["vae"] = _wrap(files.vae, lambda: load_vae_from_original(vae_sd, torch_dtype=torch.float32))
        z_dim = components["vae"].config.z_dim
        if z_dim != info.config["out_channels"]:
            raise ConversionError(
                f"{files.vae}: VAE latent channels {z_dim} do not match the DiT's out channels "
                f"{info.config['out_channels']} (head.head.weight)"
            )
        bar.update()
        if var.image_encoder:
            bar.set_postfix_str("image encoder")
            components["image_encoder"] = _wrap(
                files.image_encoder,
                lambda: load_clip_from_original(files.image_encoder, num_heads=image_encoder_heads, torch_dtype=torch_dtype),
            )
            clip_width = components["image_encoder"].config.hidden_size
            if clip_width != info.config["image_dim"]:
                raise ConversionError(
                    f"{files.image_encoder}: CLIP width {clip_width} does not match the DiT's img_emb.proj.0 width "
                    f"{info.config['image_dim']}"
                )
            components["image_processor"] = make_clip_image_processor(components["image_encoder"].config.image_size)
            bar.update()
        if var.audio_encoder:
            bar.set_postfix_str("audio encoder")
            components.update(_load_audio_encoder_for(files.audio_encoder, info))
            bar.update()
        if mc_model is not None:
            components["motion_controller"] = mc_model
        components["scheduler"] = _scheduler_factory(scheduler, var.flow_shift)
        bar.update()
    bar.close()
    return LoadedRelease(var, transformers_, components, relighting_lora=lora)


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
) -> Path:
    """Convert an original Wan release to a Diffusers pipeline folder and return its path.

    Args:
        src: release folder (``diffusion_pytorch_model*.safetensors`` or ``high_noise_model/`` + ``low_noise_model/``,
            ``models_t5_umt5-xxl-enc-bf16.pth``, ``Wan2.x_VAE.pth``, ``google/umt5-xxl/``, CLIP ``.pth`` for I2V /
            FLF2V, ``wav2vec2-large-xlsr-53-english/`` for S2V) or a single DiT file (e.g. krea's).  A LongCat-Video release (``dit/``, ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``scheduler/``) is recognised by its DiT keys and converted by
            :func:`~diffusers_wan_ext.conversion.longcat.convert_longcat_release`; the Diffusers-format ByteDance
            Video-As-Prompt release (``transformer/config.json`` class ``WanTransformer3DMOTModel``) by
            :func:`~diffusers_wan_ext.conversion.vap.convert_vap_release` (only its transformer changes).
        dst: output folder; must not exist unless ``overwrite``.
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
            omitted); written as a Diffusers LoRA to ``relighting_lora/pytorch_lora_weights.safetensors`` in the
            output (``pipe.load_lora_weights(dst, subfolder="relighting_lora")``).
        transformer_only: write only a transformer model folder (no other component needed).

    Example:
        >>> convert_release("Wan2.1-T2V-1.3B", "Wan2.1-T2V-1.3B-diffusers")  # doctest: +SKIP
    """
    from .longcat import convert_longcat_release, find_longcat_dit

    if (variant or "").lower() == "longcat-video" or find_longcat_dit(src, transformer) is not None:
        return convert_longcat_release(  # its own DiT and pipeline; scheduler / CLIP / motion options do not apply
            src, dst, dtype=dtype, transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
            transformer_only=transformer_only, overwrite=overwrite, progress=progress, max_shard_size=max_shard_size,
        )
    from .vap import convert_vap_release, is_vap_release

    if Path(src).is_dir() and is_vap_release(src):  # a Diffusers-format release: only the transformer converts
        return convert_vap_release(src, dst, dtype=dtype, overwrite=overwrite, max_shard_size=max_shard_size)
    release = load_release(
        src, variant=variant, dtype=dtype, scheduler=scheduler, transformer=transformer, transformer_2=transformer_2,
        text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, image_encoder=image_encoder,
        image_encoder_heads=image_encoder_heads, audio_encoder=audio_encoder, motion_controller=motion_controller,
        relighting_lora=relighting_lora, transformer_only=transformer_only, progress=progress,
    )
    var, transformers_, components = release.variant, release.transformers, release.components
    lora, torch_dtype = release.relighting_lora, DTYPES[dtype]

    # --- Write ----------------------------------------------------------------------------------------------------
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        if transformer_only:
            transformers_[0].save_pretrained(tmp, max_shard_size=max_shard_size)
            if len(transformers_) == 2:
                transformers_[1].save_pretrained(tmp / "transformer_2", max_shard_size=max_shard_size)
        else:
            pipeline_class = var.pipeline
            index: dict[str, Any] = {"_class_name": pipeline_class}
            names = ["transformer", "transformer_2"]
            for name, model in zip(names, transformers_):
                model.save_pretrained(tmp / name, max_shard_size=max_shard_size)
                index[name] = _library_of(model)
            for name, comp in components.items():
                comp.save_pretrained(tmp / name)
                index[name] = _library_of(comp)
            import diffusers

            pipe_cls = getattr(diffusers, pipeline_class)
            expected, _ = pipe_cls._get_signature_keys(pipe_cls)
            for name in sorted(expected):
                index.setdefault(name, [None, None])  # optional component not part of this release
            init_params = set(pipe_cls.__init__.__code__.co_varnames)
            if "boundary_ratio" in init_params:
                index["boundary_ratio"] = var.boundary_ratio
            if "expand_timesteps" in init_params:
                index["expand_timesteps"] = var.expand_timesteps
            import diffusers

            index["_diffusers_version"] = diffusers.__version__
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            if lora is not None:
                from .animate import save_relighting_lora

                save_relighting_lora(lora, tmp / "relighting_lora", dtype=torch_dtype)
            rewrite_model_index_for_shims(tmp)  # our pipeline classes: shim route for fresh interpreters
            write_model_card(tmp, var, pipeline_class, str(src))
            (tmp / "wan_variant.json").write_text(json.dumps(_variant_record(var), indent=2) + "\n")
    return Path(dst)


def _load_audio_encoder_for(folder: Path, info: DitInfo) -> dict[str, Any]:
    """The S2V ``audio_encoder`` (float32, as the original runs it) and ``audio_processor``, checked against the DiT."""
    from .audio_encoder import load_audio_encoder_from_release, load_audio_processor_from_release

    encoder = _wrap(folder, lambda: load_audio_encoder_from_release(folder))
    processor = _wrap(folder, lambda: load_audio_processor_from_release(folder))
    width, layers = encoder.config.hidden_size, encoder.config.num_hidden_layers + 1
    if (width, layers) != (info.config["audio_dim"], info.config["audio_num_layers"]):
        raise ConversionError(
            f"{folder}: Wav2Vec2 with hidden size {width} and {layers} hidden states, but the DiT's audio encoder takes "
            f"{info.config['audio_dim']} x {info.config['audio_num_layers']} (casual_audio_encoder.*)"
        )
    return {"audio_encoder": encoder, "audio_processor": processor}


def _load_motion_controller_for(path: str | os.PathLike, info: DitInfo, torch_dtype: torch.dtype):
    from .motion_controller import load_motion_controller_from_original

    if info.arch != "t2v":
        raise ConversionError(
            f"{path}: the speed-control motion controller belongs on a Wan2.1 text-to-video DiT, not a {info.arch} DiT"
        )
    model = _wrap(path, lambda: load_motion_controller_from_original(path, torch_dtype=torch_dtype))
    width = info.config["num_attention_heads"] * info.config["attention_head_dim"]
    if model.config.dim != width or model.config.freq_dim != info.config["freq_dim"]:
        raise ConversionError(
            f"{path}: motion controller for dim {model.config.dim} / freq_dim {model.config.freq_dim}, but the DiT has "
            f"dim {width} / freq_dim {info.config['freq_dim']} (the speed-control model fits Wan2.1-T2V-1.3B)"
        )
    return model


def add_motion_controller(folder: str | os.PathLike, motion_controller: str | os.PathLike, dtype: str | None = None) -> Path:
    """Add the speed-control module to an already converted Wan2.1 T2V folder (it becomes a
    :class:`~diffusers_wan_ext.WanSpeedControlPipeline`).  The folder is only changed once everything is written.

    Example:
        >>> add_motion_controller("Wan2.1-T2V-1.3B-diffusers", "Wan2.1-1.3b-speedcontrol-v1/model.safetensors")  # doctest: +SKIP
    """
    import shutil

    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ConversionError(f"{folder}: not a converted pipeline folder (no model_index.json)")
    tcfg_path = folder / "transformer" / "config.json"
    if not tcfg_path.is_file():
        raise ConversionError(f"{folder}: no transformer/config.json")
    tcfg = json.loads(tcfg_path.read_text())
    info = DitInfo(
        arch="t2v" if tcfg.get("in_channels") == tcfg.get("out_channels", 16) and not tcfg.get("image_dim")
        and "vace_layers" not in tcfg else "other",
        config=tcfg, text_len=512,
    )
    torch_dtype = DTYPES[dtype] if dtype else None
    model = _load_motion_controller_for(motion_controller, info, torch_dtype or torch.float32)
    if torch_dtype is None:  # match the transformer's storage dtype
        torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(_stored_dtype(folder / "transformer"), torch.float32)
        model = model.to(torch_dtype)
    index = json.loads(index_path.read_text())
    tmp = folder / ".motion_controller.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if (folder / "motion_controller").exists():
            shutil.rmtree(folder / "motion_controller")
        tmp.rename(folder / "motion_controller")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    index["_class_name"] = "WanSpeedControlPipeline"
    index["motion_controller"] = _library_of(model)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    rewrite_model_index_for_shims(folder)
    return folder


def _stored_dtype(model_folder: Path) -> str | None:
    from safetensors import safe_open

    for f in sorted(model_folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                return str(h.get_slice(k).get_dtype()).lower().replace("bf16", "bfloat16").replace("f16", "float16")
    return None


def _variant_record(v: WanVariant) -> dict:
    from dataclasses import asdict

    rec = asdict(v)
    rec.pop("aliases", None)
    return rec


def _library_of(obj) -> list[str]:
    from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple

    library, cls = _fetch_class_library_tuple(obj)
    return [library, cls]


def _wrap(path, fn: Callable):
    try:
        return fn()
    except ConversionError as e:
        msg = str(e)
        raise ConversionError(msg if str(path) in msg else f"{path}: {msg}") from e
