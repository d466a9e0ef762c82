"""The Wan2.2-Dancer family (Wan-AI/Wan-Dancer-14B; DiffSynth-Studio's "WanToDance"): music-driven dance video.

The release ships two DiTs of one layout -- ``global_model.safetensors`` (keyframes at a low frame rate, 7.5 fps)
and ``local_model.safetensors`` (30-fps rendering between keyframes) -- plus the Wan2.1 umT5, VAE and CLIP files.
Each DiT is a Wan I2V DiT with a music encoder, per-layer music injection, reference-image tokens and a global patch
embedding / head (:class:`~diffusers_wan_ext.models.WanDancerTransformer3DModel`; key tables and detection in
:mod:`diffusers_wan_ext.conversion.dancer`).

The family claims a release folder holding ``global_model.safetensors`` / ``local_model.safetensors``
(:meth:`DancerFamily.claims_release`) and converts it into one pipeline folder: ``transformer`` = the global model,
``transformer_2`` = the local model (:class:`~diffusers_wan_ext.pipelines.WanDancerPipeline`), plus umT5, tokenizer
(the release takes it from Wan-AI/Wan2.1-T2V-1.3B: ``google/umt5-xxl/`` beside the files or ``--tokenizer``), the
Wan2.1 VAE, CLIP and DiffSynth's flow-match Euler schedule (:class:`~diffusers_wan_ext.WanFlowMatchScheduler`, shift
5)::

    diffusers-wan convert Wan-Dancer-14B Wan-Dancer-14B-diffusers --tokenizer umt5-xxl

``--variant wan-dancer-14b-global`` / ``-local`` converts one DiT alone; a single DiT file given with
``--transformer`` goes through the Wan DiT converter (``transformer`` only).  TeaCache is refused (the music
injections between the blocks are not part of its cached residual), and so are context parallelism and sliding
windows (the music tokens and the keyframe RoPE span the whole clip): see the model class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import __version__ as diffusers_version
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file

from ..conversion.dancer import (
    DANCER_BLOCK_TABLES,
    DANCER_RELEASE_FILES,
    DANCER_TOP_LEVEL_KEYS,
    dancer_config,
    detect_dancer,
    is_dancer_state_dict,
)
from ..conversion.dit import DitExtension, DitInfo, load_dit_from_original
from ..conversion.image_encoder import load_clip_from_original
from ..conversion.release_io import DTYPES, first_existing, library_of, progress_bar, write_model_card
from ..conversion.text_encoder import load_t5_from_original
from ..conversion.tokenizer import load_umt5_tokenizer
from ..conversion.vae import detect_vae_version, load_vae_from_original
from ..utils.atomic import atomic_output_dir
from ..utils.io import ConversionError, load_state_dict, safetensors_keys, with_path
from ..utils.shims import rewrite_model_index_for_shims
from ..models import WanDancerTransformer3DModel
from ..models.transformer_wan_dancer import WanDancerCrossAttnProcessor, is_global_fps
from ..pipelines import WanDancerPipeline
from ..pipelines.dancer_conditioning import FEATURE_FPS, keyframe_condition, music_features, slice_music
from ..schedulers import WanFlowMatchScheduler
from .base import Conditioning, ExtraInput, GenerateInput, ModelFamily, ReleaseOptions, TinyArch, WanVariant

__all__ = ["DancerFamily", "TINY_DANCER_CONFIG", "convert_dancer_release", "encode_dancer_condition",
           "find_dancer_dits", "read_music_features"]

_COMMON = dict(arch="dancer", release="Wan-AI/Wan-Dancer-14B", dim=5120, num_layers=40, image_encoder=True,
               pipeline="WanDancerPipeline", flow_shift=5.0, guidance_scale=5.0, height=1280, width=720,
               num_frames=149, fps=30)
# Sampling defaults of DiffSynth-Studio's examples (Wan-Dancer-14B-global.py / -local.py): 1280x720 portrait,
# 149 keyframes at 7.5 fps (48 steps), 149-frame local segments at 30 fps (24 steps), CFG 5 with the negative branch
# skipping block 9, sigma shift 5.
WAN_DANCER = WanVariant(
    "wan-dancer-14b", experts=2, num_inference_steps=48,
    notes="transformer = global_model (keyframes at 7.5 fps), transformer_2 = local_model (30 fps); music + "
          "reference image -> dance video; 24 local steps",
    aliases=("wan2.2-dancer-14b",), **_COMMON,
)
WAN_DANCER_GLOBAL = WanVariant(
    "wan-dancer-14b-global", num_inference_steps=48,
    notes="global_model.safetensors alone: keyframes at 7.5 fps", file_hints=(("global",),),
    aliases=("wan2.2-dancer-14b-global",), **_COMMON,
)
WAN_DANCER_LOCAL = WanVariant(
    "wan-dancer-14b-local", num_inference_steps=24,
    notes="local_model.safetensors alone: 30-fps segments between given keyframes", file_hints=(("local",),),
    aliases=("wan2.2-dancer-14b-local",), **_COMMON,
)

#: The tiny Dancer DiT's Dancer options (release: 4 music heads, 2 layers; widths 256 / 1024; 8 inject layers).
TINY_DANCER_CONFIG = dict(music_latent_dim=32, music_ff_size=64, music_num_heads=4, music_num_layers=2,
                          music_inject_layers=[0, 1])


def _model_class(info: DitInfo) -> type:
    return WanDancerTransformer3DModel


#: Component files of the release (the tokenizer comes from Wan-AI/Wan2.1-T2V-1.3B's ``google/umt5-xxl``).
T5_FILE, CLIP_FILE, VAE_FILE = ("models_t5_umt5-xxl-enc-bf16.pth",
                                "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "Wan2.1_VAE.pth")
TOKENIZER_DIRS = ("google/umt5-xxl", "umt5-xxl", "tokenizer")
#: Pipeline component -> which release DiT (the global model first: it runs first).
STAGE_COMPONENTS = (("transformer", "global"), ("transformer_2", "local"))


def _has_dancer_keys(path: Path) -> bool | None:
    """Whether ``path`` holds Dancer keys; ``None`` when it cannot be read (the loader reports why)."""
    keys = safetensors_keys(path)
    return None if keys is None else is_dancer_state_dict(dict.fromkeys(keys))


def find_dancer_dits(src: str | os.PathLike, variant: str | None = None) -> dict[str, Path]:
    """The Dancer DiTs of a release folder, ``{"global": path, "local": path}``: the release files present, when one
    of them has Dancer keys or cannot be read (a truncated download); the converter's loader then names a file that is
    unreadable or not a Dancer DiT, never skips it.  ``variant`` ``wan-dancer-14b-global`` / ``-local`` keeps one."""
    src = Path(src)
    if not src.is_dir():
        return {}
    found = {stage: src / name for stage, name in DANCER_RELEASE_FILES.items() if (src / name).is_file()}
    if not any(_has_dancer_keys(path) is not False for path in found.values()):
        return {}
    name = (variant or "").lower()
    for row, stage in ((WAN_DANCER_GLOBAL, "global"), (WAN_DANCER_LOCAL, "local")):
        if name in (row.name, *row.aliases):
            return {stage: found[stage]} if stage in found else {}
    return found


def _variant_for(dits: dict[str, Path]) -> WanVariant:
    if len(dits) == 2:
        return WAN_DANCER
    return WAN_DANCER_GLOBAL if "global" in dits else WAN_DANCER_LOCAL


def _component_paths(root: Path, options: ReleaseOptions) -> dict[str, Path | None]:
    paths = {
        "text_encoder": Path(options.text_encoder) if options.text_encoder else first_existing(root / T5_FILE),
        "tokenizer": Path(options.tokenizer) if options.tokenizer else first_existing(
            *(root / t for t in TOKENIZER_DIRS)),
        "vae": Path(options.vae) if options.vae else first_existing(root / VAE_FILE),
        "image_encoder": first_existing(root / CLIP_FILE),
    }
    missing = [] if options.transformer_only else [k for k, v in paths.items() if v is None]
    if missing:
        raise ConversionError(
            f"{root}: missing component(s) for Wan-Dancer: {', '.join(missing)}. Keep {T5_FILE}, {VAE_FILE} and "
            f"{CLIP_FILE} beside the DiT files (as released) and the umT5 tokenizer (google/umt5-xxl/ of "
            "Wan-AI/Wan2.1-T2V-1.3B) there too, or pass --text-encoder / --tokenizer / --vae PATH (or "
            "--transformer-only)"
        )
    return paths


def _load_components(paths: dict[str, Path], model, torch_dtype: torch.dtype, heads: int | None) -> dict[str, Any]:
    """umT5, tokenizer, Wan2.1 VAE and CLIP, each checked against the DiT."""
    t5 = with_path(paths["text_encoder"], lambda: load_t5_from_original(paths["text_encoder"], torch_dtype=torch_dtype))
    if t5.config.d_model != model.config.text_dim:
        raise ConversionError(f"{paths['text_encoder']}: text encoder width {t5.config.d_model} does not match the "
                              f"DiT's text_embedding.0 width {model.config.text_dim}")
    vae_sd = with_path(paths["vae"], lambda: load_state_dict(paths["vae"]))
    if with_path(paths["vae"], lambda: detect_vae_version(vae_sd)) != "wan2.1":
        raise ConversionError(f"{paths['vae']}: Wan-Dancer uses the Wan2.1 VAE ({VAE_FILE})")
    vae = with_path(paths["vae"], lambda: load_vae_from_original(vae_sd, torch_dtype=torch.float32))
    clip = with_path(paths["image_encoder"], lambda: load_clip_from_original(
        paths["image_encoder"], num_heads=heads, torch_dtype=torch_dtype))
    if clip.config.hidden_size != model.config.image_dim:
        raise ConversionError(f"{paths['image_encoder']}: CLIP width {clip.config.hidden_size} does not match the "
                              f"DiT's img_emb.proj.0 width {model.config.image_dim}")
    return dict(text_encoder=t5, tokenizer=with_path(paths["tokenizer"], lambda: load_umt5_tokenizer(paths["tokenizer"])),
                vae=vae, image_encoder=clip)


def _load_dit(path: Path, torch_dtype: torch.dtype):
    model = with_path(path, lambda: load_dit_from_original(path, torch_dtype=torch_dtype))
    if not isinstance(model, WanDancerTransformer3DModel):
        raise ConversionError(f"{path}: not a Wan-Dancer DiT (no music_* / img_emb_refimage.* keys)")
    return model


def _write_pipeline_index(folder: Path, components: dict[str, Any]) -> None:
    index: dict[str, Any] = {"_class_name": "WanDancerPipeline", "_diffusers_version": diffusers_version}
    expected, _ = WanDancerPipeline._get_signature_keys(WanDancerPipeline)
    for name in sorted(expected):
        index[name] = library_of(components[name]) if name in components else [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    rewrite_model_index_for_shims(folder)


def convert_dancer_release(src: str | os.PathLike, dst: str | os.PathLike, options: ReleaseOptions | None = None,
                           variant: str | None = None, **kwargs: Any) -> Path:
    """Convert a Wan-AI/Wan-Dancer-14B release folder into ``dst``: ``transformer/`` (global model) and
    ``transformer_2/`` (local model) -- or the one DiT ``variant`` names / the folder has -- and, unless
    ``transformer_only``, ``text_encoder/``, ``tokenizer/``, ``vae/``, ``image_encoder/``, ``scheduler/`` (DiffSynth's
    flow-match Euler, shift 5), ``model_index.json`` (:class:`WanDancerPipeline`), a model card and ``wan_variant.json``.  A
    ``config.json`` beside the DiT files (optional; the release has none) may give ``num_heads`` / ``text_len`` /
    ``wantodance_music_inject_layers``.

    Example:
        >>> convert_dancer_release("Wan-Dancer-14B", "Wan-Dancer-14B-diffusers", tokenizer="umt5-xxl")  # doctest: +SKIP
    """
    options = options or ReleaseOptions(**kwargs)
    if options.dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {options.dtype!r}; choose one of {', '.join(DTYPES)}")
    src, torch_dtype = Path(src), DTYPES[options.dtype]
    dits = find_dancer_dits(src, variant)
    if not dits:
        raise ConversionError(f"{src}: no Wan-Dancer DiT found (expected {' / '.join(DANCER_RELEASE_FILES.values())} "
                              "with music_* keys)")
    var = _variant_for(dits)
    paths = _component_paths(src, options)
    with atomic_output_dir(dst, overwrite=options.overwrite) as tmp:
        steps = len(dits) + (0 if options.transformer_only else 5)
        with progress_bar(steps, options.progress) as bar:  # closed before an error propagates
            models = {}
            for component, stage in STAGE_COMPONENTS:
                if stage in dits:
                    bar.set_postfix_str(dits[stage].name)
                    models["transformer" if not models else component] = _load_dit(dits[stage], torch_dtype)
                    bar.update()
            for name, model in models.items():
                model.save_pretrained(tmp if options.transformer_only and name == "transformer" else tmp / name,
                                      max_shard_size=options.max_shard_size)
            if not options.transformer_only:
                components = _load_components(paths, models["transformer"], torch_dtype,
                                              options.image_encoder_heads)
                components["scheduler"] = WanFlowMatchScheduler(shift=var.flow_shift)
                for name, component in components.items():
                    component.save_pretrained(tmp / name)
                    bar.update()
                _write_pipeline_index(tmp, {**components, **models})
                write_model_card(tmp, var, var.pipeline, str(src), call=DancerFamily.card_calls[var.pipeline])
                (tmp / "wan_variant.json").write_text(json.dumps(var.record(), indent=2) + "\n")
    return Path(dst)


# ------------------------------------------------------------------------------------------------------- training
#: Music features per frame (onset, 20 MFCC, 12 chroma, peak, beat).
MUSIC_FEATURE_DIM = 35
#: Frames between two default local keyframes: the pipeline's keyframe positions at 7.5 fps on the 30-fps axis.
LOCAL_KEYFRAME_STRIDE = 16


def read_music_features(path: str | os.PathLike, name: str = "wantodance_music_path") -> torch.Tensor:
    """The music features ``[frames, 35]`` (30 per second) of a dataset's music column: an audio file through the
    pipeline's own feature code (:func:`~diffusers_wan_ext.pipelines.dancer_conditioning.music_features`, needs
    librosa), or precomputed features in a ``.npy`` file / a one-tensor ``.safetensors`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".safetensors"):
        try:  # optional third-party dependency, checked before the audio is read
            import librosa
        except ImportError:
            librosa = None
        if librosa is None:
            raise ValueError(f"{name}: {path}: Wan-Dancer's music features need librosa (pip install "
                             "'diffusers_wan_ext[dancer]'), or give precomputed features [frames, 35] at 30 per "
                             "second in a .npy / .safetensors file")
        return music_features(str(path), name=name)
    try:
        if suffix == ".npy":
            feats = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            tensors = load_safetensors(str(path))
            if len(tensors) != 1:
                raise ValueError(f"holds {len(tensors)} tensors; expected one [frames, {MUSIC_FEATURE_DIM}]")
            feats = next(iter(tensors.values()))
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: {path}: not readable music features ({str(e).splitlines()[0]})") from None
    if feats.ndim != 2 or feats.shape[1] != MUSIC_FEATURE_DIM or feats.shape[0] == 0 or not torch.isfinite(
            feats.float()).all():
        raise ValueError(f"{name}: {path}: music features must be finite [frames, {MUSIC_FEATURE_DIM}] at "
                         f"{FEATURE_FPS} per second, got shape {tuple(feats.shape)}")
    return feats.float()


def _keyframe_mask(sample: dict, frames: int, global_stage: bool) -> torch.Tensor:
    """``wantodance_keyframes_mask`` (1 at the clip's keyframes) or the default: the first frame (global) / every
    16th frame (local: the pipeline's keyframe positions)."""
    values = sample.get("wantodance_keyframes_mask")
    if values is None:
        mask = torch.zeros(frames)
        mask[:: frames if global_stage else LOCAL_KEYFRAME_STRIDE] = 1
        return mask
    if len(values) != frames or any(v not in (0.0, 1.0) for v in values) or values[0] != 1.0:
        raise ValueError(f"wantodance_keyframes_mask must be {frames} values (one per frame of the clip) of 0 / 1 "
                         f"starting with 1, got {len(values)} values")
    return torch.tensor(values, dtype=torch.float32)


def encode_dancer_condition(builder, sample: dict, inputs, num_frames: int, height: int, width: int) -> None:
    """Wan-Dancer training inputs, as the pipeline's stages build them (DiffSynth-Studio's ``WanToDance`` units).

    The clip is ``F = 4 k + 1`` frames at ``wantodance_fps``.  ``wantodance_fps`` picks the model's path as the DiT
    does: 30 = the local model (target: the clip's VAE latents), any other rate = the global model (target: frames
    ``0, 4, 8, ...`` each encoded alone -- the pipeline decodes the global latents frame by frame -- so ``k + 1``
    latent frames).  The keyframe condition ``y`` is the clip (or ``wantodance_keyframes``) at the frames
    ``wantodance_keyframes_mask`` marks, black elsewhere; CLIP of its first frame, CLIP of
    ``wantodance_reference_image`` and the music features of ``F / fps`` seconds from ``wantodance_music_path``.
    """
    pipe = builder.pipe
    if pipe.image_encoder is None:
        raise ValueError("Wan-Dancer training needs the image_encoder (CLIP) of the model folder")
    fps = float(sample["wantodance_fps"])
    if not fps > 0:
        raise ValueError(f"wantodance_fps must be positive, got {fps!r}")
    global_stage = is_global_fps(fps)
    video = builder.video(sample, "video")
    if global_stage:  # each keyframe latent alone, as the pipeline's framewise decoding reads them
        inputs.latents = torch.cat([builder.encode_latents(video[:, :, i : i + 1].to(builder.device))
                                    for i in range(0, num_frames, 4)], dim=2)
    source = builder.video(sample, "wantodance_keyframes") if "wantodance_keyframes" in sample else video
    mask = _keyframe_mask(sample, num_frames, global_stage)
    keyframes = torch.where(mask.view(1, 1, -1, 1, 1) > 0, source, torch.full_like(source, -1.0)).to(builder.device)
    y = keyframe_condition(builder.encode_latents(keyframes).float(), mask, pipe.vae_scale_factor_temporal)
    reference = builder.image(sample, "wantodance_reference_image").to(builder.device)
    music = read_music_features(sample["wantodance_music_path"])
    inputs.y = y
    inputs.image_embeds = pipe.clip_features(keyframes[:, :, 0])
    inputs.transformer_kwargs = {
        "reference_image_embeds": pipe.clip_features(reference),
        "music_features": slice_music(music, 0.0, num_frames / fps).to(builder.device),
        "fps": torch.tensor(fps),
    }


DANCER_CONDITIONING = Conditioning(
    "Wan-Dancer (music + reference image -> dance video)", WanDancerPipeline,
    required=("wantodance_music_path", "wantodance_reference_image", "wantodance_fps"),
    optional=("wantodance_keyframes", "wantodance_keyframes_mask"), encode=encode_dancer_condition,
)


class DancerFamily(ModelFamily):
    name = "dancer"
    title = "Wan2.2-Dancer (music + reference image -> dance video)"
    variants = (WAN_DANCER, WAN_DANCER_GLOBAL, WAN_DANCER_LOCAL)
    dit = DitExtension(
        name="dancer", arches=("dancer",), layouts="Dancer 36/16 + music_* / img_emb_refimage / head_global",
        top_level_keys=DANCER_TOP_LEVEL_KEYS, block_tables=DANCER_BLOCK_TABLES, config=dancer_config,
        detect=detect_dancer, model_class=_model_class, priority=25,
    )
    model_classes = (WanDancerTransformer3DModel,)
    pipeline_classes = (WanDancerPipeline,)
    hook_processors = (WanDancerCrossAttnProcessor,)
    generate_inputs = (
        GenerateInput("--music", "music", "Wan-Dancer: the music file (wav / mp3 / flac); --image = the dancer's "
                      "reference image"),
    )
    card_calls = {
        "WanDancerPipeline": (
            'image=load_image("dancer.png"), music="music.wav", prompt="a person is dancing",\n'
            "             height={height}, width={width}, num_inference_steps={num_inference_steps}, "
            "guidance_scale={guidance_scale}"
        ),
    }
    tiny_arches = {"dancer": TinyArch("i2v", 36, 16, clip=True)}
    conditionings = (DANCER_CONDITIONING,)
    #: DiffSynth-Studio's Wan-Dancer dataset columns (``wantodance_music_path``: an audio file, or precomputed
    #: features ``[frames, 35]`` in a .npy / .safetensors file)
    dataset_inputs = {
        "wantodance_music_path": ExtraInput("file"),
        "wantodance_reference_image": ExtraInput("image"),
        "wantodance_fps": ExtraInput("float"),
        "wantodance_keyframes": ExtraInput("video"),
        "wantodance_keyframes_mask": ExtraInput("floats"),
    }

    def __init__(self) -> None:
        #: the ``--variant`` of the release being claimed (``convert_release`` receives no variant)
        self.claimed_variant: str | None = None

    def claims_release(self, src: Path, transformer: Path | None, variant: str | None) -> bool:
        claimed = transformer is None and bool(find_dancer_dits(src, variant))
        self.claimed_variant = variant if claimed else None
        return claimed

    def convert_release(self, src: Path, dst: Path, options: ReleaseOptions) -> Path:
        return convert_dancer_release(src, dst, options, variant=self.claimed_variant)

    def claims_config(self, config: Any) -> bool:
        return getattr(config, "music_inject_layers", None) is not None

    def training_conditioning(self, config: Any, expand_timesteps: bool) -> Conditioning | None:
        return DANCER_CONDITIONING if self.claims_config(config) else None

    def tiny_dit_model(self, arch: str, experts: int, kwargs: dict[str, Any]):
        model = WanDancerTransformer3DModel(**kwargs, **TINY_DANCER_CONFIG, ref_conv_in_channels=16)
        extra = dict(wantodance_music_inject_layers=TINY_DANCER_CONFIG["music_inject_layers"],
                     music_num_heads=TINY_DANCER_CONFIG["music_num_heads"])
        return model, extra

    def tiny_release_files(self, folder: Path, dit_folder: Path, arch: str, dit_state_dict: dict, seed: int) -> None:
        """The release layout: the tiny DiT as ``global_model.safetensors`` and a second draw as
        ``local_model.safetensors`` (one ``config.json`` for both: the tiny head dim is not 128)."""
        weights = dit_folder / "diffusion_pytorch_model.safetensors"
        if dit_folder != folder or not weights.is_file():  # two-expert sub-folders: not the release's layout
            return
        weights.rename(dit_folder / DANCER_RELEASE_FILES["global"])
        g = torch.Generator().manual_seed(seed + 1)
        local = {k: (v + torch.randn(v.shape, generator=g) * 0.01).contiguous() for k, v in dit_state_dict.items()}
        save_file(local, str(dit_folder / DANCER_RELEASE_FILES["local"]))
