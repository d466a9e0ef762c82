"""The MOVA family (openmoss/MOVA-360p, openmoss/MOVA-720p): image -> video with its sound track.

A release is a Diffusers-style folder, one sub-folder per component: ``video_dit/`` and ``video_dit_2/`` (the
high- / low-noise Wan2.2-I2V experts without CLIP, original Wan keys -> stock ``WanTransformer3DModel``),
``audio_dit/`` (:class:`~diffusers_wan_ext.MovaAudioTransformer1DModel`), ``dual_tower_bridge/``
(:class:`~diffusers_wan_ext.MovaDualTowerBridge`), ``audio_vae/`` (:class:`~diffusers_wan_ext.AutoencoderDac`),
``video_vae/`` (Wan2.1 VAE), ``text_encoder/`` (umT5) and ``tokenizer/``.  :func:`convert_mova_release` turns it
into a :class:`~diffusers_wan_ext.pipelines.pipeline_mova.MovaPipeline` folder (key maps:
:mod:`diffusers_wan_ext.conversion.mova`).  The Wan2.1 files DiffSynth-Studio pairs with MOVA
(``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/``) work for the shared components.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from ..conversion.dit import export_dit_state_dict, find_dit_files, load_dit_from_original
from ..conversion.mova import (
    MOVA_AUDIO_DIT_MODULES,
    MOVA_BRIDGE_MODULES,
    MOVA_COMPONENT_FOLDERS,
    export_mova_audio_dit_state_dict,
    export_mova_bridge_state_dict,
    load_mova_audio_dit,
    load_mova_audio_vae,
    load_mova_bridge,
    mova_release_config,
    rename_mova_audio_dit_module,
    rename_mova_bridge_module,
)
from ..conversion.release_components import load_umt5_component, load_wan21_vae_component
from ..conversion.release_io import DTYPES, first_existing, progress_bar, write_model_card
from ..conversion.tokenizer import load_umt5_tokenizer, make_tiny_umt5_tokenizer
from ..lora.formats import register_lora_component
from ..models import AutoencoderDac, MovaAudioTransformer1DModel, MovaDualTowerBridge
from ..models.mova_joint_forward import mova_joint_forward
from ..pipelines import MovaPipeline
from ..pipelines.pipeline_mova import check_mova_pipeline_fields, mova_audio_length
from ..schedulers import WanFlowMatchScheduler
from ..utils.atomic import atomic_output_dir
from ..utils.io import ConversionError, read_json, safetensors_shapes, with_path
from .base import ExtraInput, ModelFamily, ReleaseOptions, TrainingComponent, WanVariant
from .tiny import TINY, tiny_t5, tiny_vae21

__all__ = ["MOVA_TRAINING_COMPONENTS", "MOVA_VARIANTS", "MovaFamily", "TINY_MOVA", "convert_mova_release",
           "encode_mova_audio", "is_mova_release", "make_tiny_mova_release", "mova_component_of",
           "mova_release_index_fields", "mova_training_forward"]

_COMMON = dict(
    arch="mova", dim=5120, num_layers=40, experts=2, pipeline="MovaPipeline", boundary_ratio=0.9, flow_shift=5.0,
    num_inference_steps=50, guidance_scale=5.0, num_frames=121, fps=24,
)
MOVA_VARIANTS = (
    WanVariant("mova-360p", release="openmoss/MOVA-360p", height=352, width=640, file_hints=(("360p",),),
               notes="image -> video + 48 kHz audio; video_dit/ + video_dit_2/ (stock WanTransformer3DModel), "
                     "audio_dit/, dual_tower_bridge/, audio_vae/ converted", **_COMMON),
    WanVariant("mova-720p", release="openmoss/MOVA-720p", height=720, width=1280, file_hints=(("720p",),),
               notes="as mova-360p at 720 x 1280", **_COMMON),
)
WAN_T5_FILE, WAN_VAE_FILE, WAN_TOKENIZER_DIR = "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl"
CARD_CALL = ('image=load_image("first_frame.png"), prompt="...", height={height}, width={width}, '
             'num_frames={num_frames}, frame_rate=24, num_inference_steps={num_inference_steps}, '
             'guidance_scale={guidance_scale}')


def is_mova_release(src: str | os.PathLike) -> bool:
    """Whether ``src`` is a MOVA release folder (``dual_tower_bridge/`` and ``audio_dit/`` sub-folders)."""
    src = Path(src)
    return src.is_dir() and (src / "dual_tower_bridge").is_dir() and (src / "audio_dit").is_dir()


def _peek_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file (or the first shard of an index), without reading tensors; ``{}`` for
    anything else."""
    try:
        weights = find_dit_files(path) if path.is_dir() else path
        if weights is None:
            return {}
        if weights.name.endswith(".index.json"):
            shards = sorted(set(read_json(weights, "shard index").get("weight_map", {}).values()))
            weights = weights.parent / shards[0] if shards else weights
    except Exception:  # noqa: BLE001 - an unreadable folder or index is reported by the real loaders
        return {}
    if not weights.name.endswith(".safetensors"):
        return {}
    return safetensors_shapes(weights) or {}


def mova_component_of(path: str | os.PathLike) -> str | None:
    """Which MOVA component a single folder or weights file holds (``audio_dit``, ``dual_tower_bridge`` or
    ``audio_vae``, told by its keys and shapes), else ``None``."""
    shapes = _peek_shapes(Path(path))
    if any(k.startswith("audio_to_video_conditioners.") for k in shapes):
        return "dual_tower_bridge"
    if len(shapes.get("patch_embedding.weight", ())) == 3 and "blocks.0.self_attn.q.weight" in shapes:
        return "audio_dit"
    if "quant_conv.weight" in shapes and any(k.startswith("decoder.model.") for k in shapes):
        return "audio_vae"
    return None


def _pick_variant(src: Path, variant: str | None) -> WanVariant:
    if variant:
        for v in MOVA_VARIANTS:
            if v.name == variant.lower():
                return v
        raise ConversionError(f"--variant {variant}: a MOVA release converts as one of "
                              f"{', '.join(v.name for v in MOVA_VARIANTS)}")
    name = src.resolve().name.lower()
    return next((v for v in MOVA_VARIANTS if any(all(h in name for h in hint) for hint in v.file_hints)),
                MOVA_VARIANTS[-1])


def mova_release_index_fields(root: Path, row: WanVariant) -> dict[str, Any]:
    """The pipeline fields of the release's ``model_index.json`` (what OpenMOSS ``MOVA.__init__`` registers):
    ``boundary_ratio`` (the expert switch) and ``audio_vae_type``; the variant row's values (0.9, ``"dac"``) where
    the file or the field is absent (a folder assembled from ModelScope files).  A value the pipeline cannot honour
    is refused in one line naming the file and the field."""
    fields: dict[str, Any] = {"boundary_ratio": row.boundary_ratio, "audio_vae_type": "dac"}
    path = root / "model_index.json"
    if not path.exists():
        return fields
    index = read_json(path, "model_index.json")
    if not isinstance(index, dict):
        raise ConversionError(f"{path}: expected a JSON object (the release's pipeline index)")
    fields.update({k: index[k] for k in fields if k in index})
    try:
        check_mova_pipeline_fields(fields["boundary_ratio"], fields["audio_vae_type"], str(path))
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return fields


def _component_paths(root: Path, options: ReleaseOptions, experts: int) -> dict[str, Path | None]:
    """The release's component paths; the ones the conversion needs (both video experts where the variant has two,
    as MOVA-360p and 720p do) must be there."""
    paths = {
        "video_dit": first_existing(Path(options.transformer) if options.transformer else None, root / "video_dit"),
        "video_dit_2": first_existing(root / "video_dit_2"),
        "audio_dit": first_existing(root / "audio_dit"),
        "dual_tower_bridge": first_existing(root / "dual_tower_bridge"),
        "audio_vae": first_existing(root / "audio_vae"),
        "text_encoder": Path(options.text_encoder) if options.text_encoder else first_existing(
            root / "text_encoder", root / WAN_T5_FILE),
        "tokenizer": Path(options.tokenizer) if options.tokenizer else first_existing(
            root / "tokenizer", root / WAN_TOKENIZER_DIR),
        "vae": Path(options.vae) if options.vae else first_existing(root / "video_vae", root / "vae",
                                                                    root / WAN_VAE_FILE),
    }
    needed = ["video_dit", *(["video_dit_2"] if experts > 1 else []), "audio_dit", "dual_tower_bridge"]
    if not options.transformer_only:
        needed += ["audio_vae", "text_encoder", "tokenizer", "vae"]
    missing = [k for k in needed if paths[k] is None]
    if missing:
        raise ConversionError(
            f"{root}: missing MOVA component(s): {', '.join(missing)}. Keep the release's video_dit/, video_dit_2/, "
            f"audio_dit/, dual_tower_bridge/, audio_vae/ (MOVA-720p's for 360p too), video_vae/, text_encoder/, "
            f"tokenizer/ sub-folders together (or the Wan2.1 {WAN_VAE_FILE}, {WAN_T5_FILE}, {WAN_TOKENIZER_DIR}/; "
            f"--vae / --text-encoder / --tokenizer PATH)"
        )
    return paths


def _check_towers(video, video_2, audio, bridge) -> None:
    cfg_b, cfg_a, cfg_v = bridge.config, audio.config, video.config
    dim_v = cfg_v.num_attention_heads * cfg_v.attention_head_dim
    dim_a = cfg_a.num_attention_heads * cfg_a.attention_head_dim
    if (cfg_b.visual_hidden_dim, cfg_b.audio_hidden_dim) != (dim_v, dim_a):
        raise ConversionError(f"dual_tower_bridge widths {cfg_b.visual_hidden_dim} / {cfg_b.audio_hidden_dim} do not "
                              f"match video_dit {dim_v} / audio_dit {dim_a}")
    if cfg_a.num_layers > cfg_v.num_layers or max(bridge.interaction_layers) >= cfg_a.num_layers:
        raise ConversionError(f"audio_dit has {cfg_a.num_layers} blocks and video_dit {cfg_v.num_layers}; the bridge "
                              f"interacts at layers {bridge.interaction_layers}: they do not fit together")
    if cfg_v.in_channels != 36 or cfg_v.image_dim is not None:
        raise ConversionError(f"video_dit: in_dim {cfg_v.in_channels} {'with' if cfg_v.image_dim else 'without'} CLIP; "
                              "MOVA's video tower is Wan2.2-I2V without CLIP (in_dim 36)")
    if video_2 is not None and dict(video_2.config) != dict(cfg_v):
        raise ConversionError("video_dit_2 has another architecture than video_dit (the two experts must match)")
    if cfg_a.text_dim != cfg_v.text_dim:
        raise ConversionError(f"audio_dit text_dim {cfg_a.text_dim} differs from video_dit's {cfg_v.text_dim}")


def _load_towers(paths: dict[str, Path | None], torch_dtype: torch.dtype, bar) -> dict[str, Any]:
    towers = {}
    for name, key, loader in (("transformer", "video_dit", load_dit_from_original),
                              ("transformer_2", "video_dit_2", load_dit_from_original),
                              ("audio_transformer", "audio_dit", load_mova_audio_dit),
                              ("bridge", "dual_tower_bridge", load_mova_bridge)):
        bar.set_postfix_str(key)
        path = paths[key]
        towers[name] = None if path is None else with_path(path, lambda: loader(path, torch_dtype=torch_dtype))
        bar.update()
    _check_towers(towers["transformer"], towers["transformer_2"], towers["audio_transformer"], towers["bridge"])
    return towers


def _load_shared(paths: dict[str, Path | None], towers: dict[str, Any], torch_dtype: torch.dtype) -> dict[str, Any]:
    te = with_path(paths["text_encoder"], lambda: load_umt5_component(paths["text_encoder"], torch_dtype))
    if te.config.d_model != towers["transformer"].config.text_dim:
        raise ConversionError(f"{paths['text_encoder']}: text encoder width {te.config.d_model} does not match the "
                              f"DiTs' text_dim {towers['transformer'].config.text_dim}")
    vae = with_path(paths["vae"], lambda: load_wan21_vae_component(paths["vae"], "MOVA"))
    audio_vae = with_path(paths["audio_vae"], lambda: load_mova_audio_vae(paths["audio_vae"], torch_dtype=torch.float32))
    if audio_vae.config.latent_dim != towers["audio_transformer"].config.in_channels:
        raise ConversionError(f"{paths['audio_vae']}: {audio_vae.config.latent_dim} latent channels, the audio DiT "
                              f"takes {towers['audio_transformer'].config.in_channels}")
    return dict(text_encoder=te, tokenizer=with_path(paths["tokenizer"], lambda: load_umt5_tokenizer(paths["tokenizer"])),
                vae=vae, audio_vae=audio_vae, scheduler=WanFlowMatchScheduler(shift=5.0))


def convert_mova_release(src: str | os.PathLike, dst: str | os.PathLike, options: ReleaseOptions | None = None,
                         variant: str | None = None, **kwargs: Any) -> Path:
    """Convert openmoss/MOVA-360p or MOVA-720p into a :class:`~diffusers_wan_ext.pipelines.pipeline_mova.MovaPipeline`
    folder (``transformer_only``: the four DiT components' folders only).

    ``options`` (or the same names as keyword arguments): ``dtype`` (DiTs and text encoder; the VAEs stay float32),
    ``vae`` / ``text_encoder`` / ``tokenizer`` paths, ``transformer_only``, ``overwrite``, ``progress``,
    ``max_shard_size``.  Everything is checked before the destination is written.  The release's
    ``model_index.json`` fields ``boundary_ratio`` and ``audio_vae_type`` become the pipeline's config
    (:func:`mova_release_index_fields`).

    Example:
        >>> convert_mova_release("MOVA-360p", "MOVA-360p-diffusers")  # doctest: +SKIP
    """
    options = options or ReleaseOptions(**kwargs)
    if options.dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {options.dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[options.dtype]
    src = Path(src)
    row = _pick_variant(src, variant or options.variant)  # a bad --variant fails before anything is read
    component = None if is_mova_release(src) else mova_component_of(src)
    if component is not None:
        raise ConversionError(
            f"{src}: this is MOVA's {component} ({MOVA_COMPONENT_FOLDERS[component]}) alone; convert the whole release "
            "folder (video_dit/, video_dit_2/, audio_dit/, dual_tower_bridge/, audio_vae/, ... side by side)"
        )
    if not is_mova_release(src):
        raise ConversionError(f"{src}: not a MOVA release folder (expected audio_dit/ and dual_tower_bridge/ "
                              "sub-folders next to video_dit/)")
    fields = mova_release_index_fields(src, row)
    row = dataclasses.replace(row, boundary_ratio=fields["boundary_ratio"])
    paths = _component_paths(src, options, row.experts)
    with atomic_output_dir(dst, overwrite=options.overwrite) as tmp:
        with progress_bar(4, options.progress) as bar:  # closed before an error propagates
            towers = _load_towers(paths, torch_dtype, bar)
        if options.transformer_only:
            for name, model in towers.items():
                if model is not None:
                    model.save_pretrained(tmp / name, max_shard_size=options.max_shard_size)
        else:
            shared = _load_shared(paths, towers, torch_dtype)
            pipe = MovaPipeline(**towers, **shared, **fields)
            pipe.save_pretrained(tmp, max_shard_size=options.max_shard_size)
            write_model_card(tmp, row, "MovaPipeline", str(src), call=CARD_CALL,
                             extra="The output has `frames` and `audio` (48 kHz mono); see `examples/mova.py` for an "
                                   "mp4 with the audio muxed in.\n")
        (tmp / "wan_variant.json").write_text(json.dumps(row.record(), indent=2) + "\n")
    return Path(dst)


#: Tiny widths of the MOVA test release (the release: video 5120 / 40 heads / 40 layers, audio 1536 / 12 / 30,
#: bridge head dim 128, DAC 48 kHz with hop 960).
TINY_MOVA = dict(
    video=dict(dim=TINY["dim"], num_heads=TINY["num_heads"], ffn_dim=TINY["ffn_dim"], num_layers=3),
    audio=dict(dim=36, num_heads=3, ffn_dim=60, num_layers=2, freq_dim=24),
    bridge_head_dim=12,
    audio_vae=dict(encoder_dim=4, encoder_rates=(2, 4, 4, 5), latent_dim=128, decoder_dim=32,
                   decoder_rates=(5, 4, 4, 2), sample_rate=8000),
)


def _randomized(model: torch.nn.Module, g: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        scale = 0.05 if v.ndim > 1 else 0.02
        base = 1.0 if (k.endswith("weight") and v.ndim == 1 and "norm" in k) or k.endswith("alpha") else 0.0
        out[k] = (torch.randn(v.shape, generator=g) * scale + base).contiguous()
    return out


def _write_component(folder: Path, sd: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_tiny_mova_release(folder: str | os.PathLike, seed: int = 0, experts: int = 2) -> Path:
    """Write a tiny MOVA release (the release's sub-folders and key layouts, tiny widths) into ``folder``.

    Example:
        >>> path = make_tiny_mova_release("/tmp/tiny-mova")  # doctest: +SKIP
    """
    folder, g = Path(folder), torch.Generator().manual_seed(seed)
    v, a = TINY_MOVA["video"], TINY_MOVA["audio"]
    for i in range(experts):
        video = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=v["num_heads"], attention_head_dim=v["dim"] // v["num_heads"],
            in_channels=36, out_channels=16, text_dim=TINY["text_dim"], freq_dim=TINY["freq_dim"],
            ffn_dim=v["ffn_dim"], num_layers=v["num_layers"])
        _write_component(folder / ("video_dit" if i == 0 else "video_dit_2"),
                         export_dit_state_dict(_randomized(video, g)),
                         mova_release_config("video_dit" if i == 0 else "video_dit_2",
                                             dict(v, text_dim=TINY["text_dim"], freq_dim=TINY["freq_dim"])))
    audio = MovaAudioTransformer1DModel(num_attention_heads=a["num_heads"], attention_head_dim=a["dim"] // a["num_heads"],
                                        text_dim=TINY["text_dim"], freq_dim=a["freq_dim"], ffn_dim=a["ffn_dim"],
                                        num_layers=a["num_layers"], rope_max_seq_len=1024)
    _write_component(folder / "audio_dit", export_mova_audio_dit_state_dict(_randomized(audio, g)),
                     mova_release_config("audio_dit", dict(a, text_dim=TINY["text_dim"])))
    bridge_cfg = dict(visual_layers=v["num_layers"], audio_layers=a["num_layers"], visual_hidden_dim=v["dim"],
                      audio_hidden_dim=a["dim"], head_dim=TINY_MOVA["bridge_head_dim"], audio_fps=50.0,
                      interaction_strategy="full")
    _write_component(folder / "dual_tower_bridge",
                     export_mova_bridge_state_dict(_randomized(MovaDualTowerBridge(**bridge_cfg), g)),
                     mova_release_config("dual_tower_bridge", bridge_cfg))
    dac_cfg = TINY_MOVA["audio_vae"]
    dac = AutoencoderDac(**dac_cfg)
    _write_component(folder / "audio_vae", _randomized(dac, g), mova_release_config(
        "audio_vae", {k: list(x) if isinstance(x, tuple) else x for k, x in dac_cfg.items()}))
    tiny_t5().save_pretrained(folder / "text_encoder")
    tiny_vae21().save_pretrained(folder / "video_vae")
    make_tiny_umt5_tokenizer(folder / "tokenizer", vocab_size=TINY["t5_vocab"])
    # the pipeline fields of the release's index (OpenMOSS ``MOVA``'s registered config)
    index = {"_class_name": "MOVA", "audio_vae_type": "dac", "boundary_ratio": 0.9}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


# --------------------------------------------------------------------------------------------------------- training
#: Video frame rate of MOVA training (DiffSynth-Studio's ``--frame_rate`` default, the release's): clips are resampled
#: to it when read (its ``fix_frame_rate``); it sets the audio span of a clip and the bridge's time alignment.
#: ``--frame_rate`` overrides the first two as in DiffSynth-Studio, whose bridge keeps 24 (its ``frame_rate`` input).
MOVA_TRAINING_FRAME_RATE = 24.0
#: Rate of the ``input_audio`` column as the training dataset reads it (mono): the release's DAC rate
#: (``audio_vae/config.json`` ``sample_rate``; DiffSynth-Studio resamples the file to ``audio_vae.sample_rate``).
MOVA_COLUMN_SAMPLE_RATE = 48000


def _audio_samples(value: Any) -> torch.Tensor:
    """The ``input_audio`` column (mono samples) as a float32 tensor (kept in the training cache)."""
    return torch.as_tensor(value, dtype=torch.float32).flatten()


@torch.no_grad()
def encode_mova_audio(audio_vae: AutoencoderDac, builder, sample: dict[str, Any], inputs) -> None:
    """MOVA's audio training latents (DiffSynth-Studio's ``MovaAudioVideoUnit_InputAudioEmbedder``): the clip's
    ``input_audio`` (read at :data:`MOVA_COLUMN_SAMPLE_RATE`) cut / zero-padded to ``num_frames / frame_rate``
    seconds (24, or the sample's ``frame_rate``: ``--frame_rate``, as DiffSynth-Studio's audio loader does),
    linearly resampled to the DAC rate where that differs (a tiny test DAC), its posterior mean ->
    ``inputs.joint_latents["audio"]`` ``[1, C, L]``."""
    samples = _audio_samples(sample["input_audio"])
    if samples.numel() == 0:
        raise ValueError("column 'input_audio': the audio file holds no samples")
    num_frames = int(sample["video"].shape[0])
    fps = float(sample.get("frame_rate") or MOVA_TRAINING_FRAME_RATE)  # --frame_rate: the rate the clip was read at
    rate = int(audio_vae.config.sample_rate)
    length = int(rate * num_frames / fps)
    span = int(MOVA_COLUMN_SAMPLE_RATE * num_frames / fps)
    samples = torch.nn.functional.pad(samples[:span], (0, max(0, span - samples.numel())))
    wav = samples[None, None]
    if wav.shape[-1] != length:
        wav = torch.nn.functional.interpolate(wav, size=length, mode="linear", align_corners=False)
    param = next(audio_vae.parameters())
    latents = audio_vae.encode(wav.to(device=param.device, dtype=param.dtype)).latent_dist.mode()
    expected = mova_audio_length(num_frames, fps, rate, audio_vae.hop_length)
    if latents.shape[-1] != expected:
        raise ValueError(f"the audio VAE gave {latents.shape[-1]} latents for {num_frames} frames, not {expected}")
    inputs.joint_latents["audio"] = latents.float().to(builder.device)


def mova_training_forward(module: torch.nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
                          encoder_hidden_states: torch.Tensor, joint_latents: dict[str, torch.Tensor],
                          **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One joint MOVA forward for training: the trained video expert (``hidden_states`` carries the I2V ``y``), the
    audio DiT and the bridge at the same timestep -> ``(video velocity, {"audio": audio velocity})``."""
    if kwargs:
        raise ValueError(f"MOVA training takes no transformer inputs besides the I2V condition; got {sorted(kwargs)}")
    for name in ("audio_transformer", "bridge"):
        if not hasattr(module, name):
            raise ValueError(f"MOVA training needs the {name} component of the MovaPipeline folder")
    video, audio = mova_joint_forward(module.transformer, module.audio_transformer, module.bridge, hidden_states,
                                      joint_latents["audio"], timestep, encoder_hidden_states,
                                      frame_rate=MOVA_TRAINING_FRAME_RATE)
    return video, {"audio": audio}


def _no_context(component: torch.nn.Module, transformer: torch.nn.Module, value: torch.Tensor):
    return contextlib.nullcontext()


_MISSING = ("--extra_inputs input_audio with this model: a MovaPipeline folder (audio_transformer/, bridge/, "
            "audio_vae/) takes it; Wan2.2-S2V takes it through its own conditioning")
#: MOVA's training components: with ``--extra_inputs input_audio`` the audio DiT and the bridge run with the
#: trained video expert (one joint forward) and the audio VAE encodes the audio latents; the loss adds the audio
#: flow-matching MSE (DiffSynth-Studio's ``FlowMatchSFTAudioVideoLoss``).  The audio DiT and the bridge take a LoRA
#: (``--lora_base_model audio_dit`` / ``dual_tower_bridge``, DiffSynth-Studio's pipeline names) or train fully.
MOVA_TRAINING_COMPONENTS = (
    TrainingComponent("audio_transformer", "input_audio", _no_context,
                      help="audio_transformer (audio_dit: MOVA's audio DiT)", missing=_MISSING,
                      make_input=_audio_samples, joint_forward=mova_training_forward, aliases=("audio_dit",), lora=True,
                      family_only=True),
    TrainingComponent("bridge", "input_audio", _no_context, help="bridge (dual_tower_bridge: MOVA's dual-tower bridge)",
                      missing=_MISSING, make_input=_audio_samples, aliases=("dual_tower_bridge",), lora=True,
                      family_only=True),
    TrainingComponent("audio_vae", "input_audio", _no_context, missing=_MISSING, make_input=_audio_samples,
                      encode=encode_mova_audio, family_only=True),
)


class MovaFamily(ModelFamily):
    name = "mova"
    title = "MOVA (image -> video + audio; Wan2.2-I2V video tower, audio DiT, dual-tower bridge, DAC audio VAE)"
    variants = MOVA_VARIANTS
    model_classes = (MovaAudioTransformer1DModel, MovaDualTowerBridge, AutoencoderDac)
    pipeline_classes = (MovaPipeline,)
    training_components = MOVA_TRAINING_COMPONENTS
    dataset_inputs = {"input_audio": ExtraInput("audio", sample_rate=MOVA_COLUMN_SAMPLE_RATE)}
    training_frame_rate = MOVA_TRAINING_FRAME_RATE
    #: DiffSynth-Studio's MovaAudioVideoPipeline names its video experts (high, low noise) video_dit / video_dit2
    training_component_aliases = {"video_dit": "transformer", "video_dit2": "transformer_2"}

    def claims_release(self, src: Path, transformer: Path | None, variant: str | None) -> bool:
        """A MOVA release folder, a ``--variant mova-*``, or one MOVA component alone (refused with the reason)."""
        return ((variant or "").lower() in {v.name for v in MOVA_VARIANTS} or is_mova_release(src)
                or mova_component_of(src) is not None)

    def convert_release(self, src: Path, dst: Path, options: ReleaseOptions) -> Path:
        return convert_mova_release(src, dst, options)

    def register_lora_components(self) -> None:
        register_lora_component("audio_transformer", rename_mova_audio_dit_module, MOVA_AUDIO_DIT_MODULES)
        register_lora_component("bridge", rename_mova_bridge_module, MOVA_BRIDGE_MODULES)
