"""The LongCat-Video family (meituan-longcat/LongCat-Video): its own DiT with the Wan2.1 VAE and umT5.

The DiT is not in the Wan layout: :mod:`diffusers_wan_ext.conversion.longcat` holds its key tables, config reading
and LoRA format; this module recognises the release (``dit/`` + ``vae/`` + ``text_encoder/`` + ``tokenizer/`` +
``scheduler/``, or ``dit/`` with the Wan2.1 ``.pth`` files DiffSynth-Studio pairs it with) and converts it into a
:class:`~diffusers_wan_ext.LongCatVideoPipeline` folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import UMT5EncoderModel

from ..conversion.dit import find_dit_files
from ..conversion.longcat import (
    convert_longcat_lora_state_dict,
    is_longcat_lora_state_dict,
    is_longcat_state_dict,
    load_longcat_transformer_from_original,
)
from ..conversion.release_io import DTYPES, progress_bar, with_path, write_model_card
from ..conversion.text_encoder import load_t5_from_original
from ..conversion.tokenizer import load_umt5_tokenizer
from ..conversion.vae import detect_vae_version, load_vae_from_original
from ..models import LongCatVideoTransformer3DModel
from ..models.transformer_longcat import LongCatVideoTransformerBlock
from ..pipelines import LongCatVideoPipeline
from ..utils.io import ConversionError, atomic_output_dir, load_state_dict
from .base import GenerateInput, ModelFamily, ReleaseOptions, WanVariant

__all__ = ["LongCatFamily", "convert_longcat_release", "find_longcat_dit"]

#: The release's sampling scheduler (``scheduler/scheduler_config.json`` of meituan-longcat/LongCat-Video).
RELEASE_SCHEDULER_SHIFT = 12.0
#: Original file names of the Wan2.1 components DiffSynth-Studio pairs with LongCat's ``dit/``.
WAN_T5_FILE, WAN_VAE_FILE, WAN_TOKENIZER_DIR = "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl"

VARIANT = WanVariant(
    "longcat-video", "longcat", "meituan-longcat/LongCat-Video", dim=4096, num_layers=48,
    pipeline="LongCatVideoPipeline", flow_shift=12.0, num_inference_steps=50, guidance_scale=4.0,
    height=480, width=832, num_frames=93, fps=15,
    notes="LongCatVideoTransformer3DModel; dit/ converted, vae/ text_encoder/ tokenizer/ scheduler/ kept; "
    "text-to-video and continuation (video=, num_cond_frames=13)",
)


def _peek_keys(path: Path) -> list[str]:
    """Key names of a safetensors file or shard index, without reading tensors ([] for anything else)."""
    try:
        if path.name.endswith(".index.json"):
            return list(json.loads(path.read_text()).get("weight_map", {}))
        if path.name.endswith(".safetensors"):
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
    except Exception:  # noqa: BLE001 - unreadable files are reported by the real loader
        return []
    return []


def find_longcat_dit(src: str | os.PathLike, transformer: str | os.PathLike | None = None) -> Path | None:
    """The LongCat-Video DiT of a release (``dit/`` folder, a DiT folder or file, or ``transformer``), else ``None``."""
    for cand in [transformer] if transformer is not None else [src, Path(src) / "dit"]:
        p = Path(cand)
        try:
            weights = find_dit_files(p) if p.is_dir() else (p if p.is_file() else None)
        except ConversionError:
            weights = None
        if weights is not None and is_longcat_state_dict(dict.fromkeys(_peek_keys(weights))):
            return p
    return None


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p is not None and p.exists()), None)


def _load_text_encoder(path: Path, torch_dtype: torch.dtype):
    """umT5 encoder from a Transformers folder (the LongCat release's ``text_encoder/``) or the Wan ``.pth``."""
    if path.is_dir() and (path / "config.json").is_file():
        try:
            return UMT5EncoderModel.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True).eval()
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{path}: cannot load a UMT5EncoderModel ({type(e).__name__}: {e})") from e
    return load_t5_from_original(path / WAN_T5_FILE if path.is_dir() else path, torch_dtype=torch_dtype)


def _load_vae(path: Path):
    """Wan2.1 VAE from a Diffusers folder (the LongCat release's ``vae/``) or ``Wan2.1_VAE.pth``, in float32."""
    if path.is_dir() and (path / "config.json").is_file():
        try:
            return AutoencoderKLWan.from_pretrained(str(path), dtype=torch.float32).eval()
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{path}: cannot load an AutoencoderKLWan ({type(e).__name__}: {e})") from e
    sd = load_state_dict(path / WAN_VAE_FILE if path.is_dir() else path)
    if detect_vae_version(sd) != "wan2.1":
        raise ConversionError(f"{path}: a {detect_vae_version(sd)} VAE, but LongCat-Video uses the Wan2.1 VAE ({WAN_VAE_FILE})")
    return load_vae_from_original(sd, torch_dtype=torch.float32)


def _load_scheduler(root: Path):
    cfg = root / "scheduler" / "scheduler_config.json"
    if cfg.is_file():
        try:
            return FlowMatchEulerDiscreteScheduler.from_pretrained(str(cfg.parent))
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{cfg}: not a FlowMatchEulerDiscreteScheduler config ({type(e).__name__}: {e})") from e
    return FlowMatchEulerDiscreteScheduler(shift=RELEASE_SCHEDULER_SHIFT)


def _component_paths(src: Path, root: Path, options: ReleaseOptions) -> dict[str, Path | None]:
    paths = {
        "text_encoder": Path(options.text_encoder) if options.text_encoder else _first(root / "text_encoder", root / WAN_T5_FILE),
        "tokenizer": Path(options.tokenizer) if options.tokenizer else _first(root / "tokenizer", root / WAN_TOKENIZER_DIR),
        "vae": Path(options.vae) if options.vae else _first(root / "vae", root / WAN_VAE_FILE),
    }
    missing = [] if options.transformer_only else [k for k, v in paths.items() if v is None]
    if missing:
        flags = ", ".join(f"--{k.replace('_', '-')} PATH" for k in missing)
        raise ConversionError(
            f"{src}: missing component(s) for LongCat-Video: {', '.join(missing)}. Keep the release's text_encoder/, "
            f"tokenizer/, vae/ folders next to dit/ (or the Wan2.1 {WAN_T5_FILE}, {WAN_TOKENIZER_DIR}/, "
            f"{WAN_VAE_FILE}), or pass {flags} (or --transformer-only)."
        )
    return paths


def _load_components(model, paths: dict[str, Path], root: Path, torch_dtype: torch.dtype, bar) -> dict[str, Any]:
    """Text encoder, tokenizer, VAE and scheduler, each checked against the DiT."""
    bar.set_postfix_str("text encoder")
    te = with_path(paths["text_encoder"], lambda: _load_text_encoder(paths["text_encoder"], torch_dtype))
    if te.config.d_model != model.config.text_dim:
        raise ConversionError(
            f"{paths['text_encoder']}: text encoder width {te.config.d_model} does not match the DiT's caption "
            f"width {model.config.text_dim} (y_embedder.y_proj.0.weight)"
        )
    bar.update()
    bar.set_postfix_str("tokenizer")
    tokenizer = with_path(paths["tokenizer"], lambda: load_umt5_tokenizer(paths["tokenizer"]))
    bar.update()
    bar.set_postfix_str("vae")
    vae = with_path(paths["vae"], lambda: _load_vae(paths["vae"]))
    if vae.config.z_dim != model.config.in_channels or vae.config.z_dim != model.config.out_channels:
        raise ConversionError(
            f"{paths['vae']}: VAE latent channels {vae.config.z_dim} do not match the DiT's "
            f"{model.config.in_channels} in / {model.config.out_channels} out channels"
        )
    bar.update()
    components = dict(text_encoder=te, tokenizer=tokenizer, vae=vae, scheduler=_load_scheduler(root))
    bar.update()
    return components


def _write_loras(root: Path, folder: Path) -> None:
    """The release's ``lora/*.safetensors`` (original LoRA format) -> ``folder/lora/`` in the Diffusers format."""
    for lora in sorted((root / "lora").glob("*.safetensors")) if (root / "lora").is_dir() else []:
        sd = with_path(lora, lambda: load_state_dict(lora))
        if is_longcat_lora_state_dict(sd):
            sd = with_path(lora, lambda: convert_longcat_lora_state_dict(sd))
        (folder / "lora").mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "lora" / lora.name))


def convert_longcat_release(src: str | os.PathLike, dst: str | os.PathLike, options: ReleaseOptions | None = None,
                            **kwargs: Any) -> Path:
    """Convert meituan-longcat/LongCat-Video into a :class:`~diffusers_wan_ext.LongCatVideoPipeline` folder.

    ``src`` is the release folder: ``dit/`` (original DiT layout, converted), ``vae/`` (Diffusers
    ``AutoencoderKLWan``), ``text_encoder/`` (``UMT5EncoderModel``), ``tokenizer/`` and ``scheduler/`` (kept as they
    are), and ``lora/*.safetensors`` (original LoRA format, written to ``dst/lora/`` in the Diffusers format).  The
    Wan2.1 files DiffSynth-Studio pairs with ``dit/`` work as well (``models_t5_umt5-xxl-enc-bf16.pth``,
    ``Wan2.1_VAE.pth``, ``google/umt5-xxl/``), next to it or passed explicitly.  ``options`` (or the same names as
    keyword arguments): ``dtype`` (transformer and text encoder; the VAE and the transformer's float32 modules stay
    float32), explicit component paths, ``transformer_only``, ``overwrite``, ``progress``, ``max_shard_size``.

    Example:
        >>> convert_longcat_release("LongCat-Video", "LongCat-Video-diffusers")  # doctest: +SKIP
    """
    options = options or ReleaseOptions(**kwargs)
    if options.dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {options.dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[options.dtype]
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    root = src if src.is_dir() else src.parent
    dit = find_longcat_dit(src, options.transformer)
    if dit is None:
        raise ConversionError(
            f"{options.transformer or src}: no LongCat-Video DiT found (expected dit/diffusion_pytorch_model*.safetensors "
            "with x_embedder.* and blocks.N.attn.qkv.* keys, or pass --transformer)"
        )
    paths = _component_paths(src, root, options)
    bar = progress_bar(1 if options.transformer_only else 5, options.progress)
    bar.set_postfix_str("transformer")
    model = with_path(dit, lambda: load_longcat_transformer_from_original(dit, torch_dtype=torch_dtype))
    bar.update()
    components = {} if options.transformer_only else _load_components(model, paths, root, torch_dtype, bar)
    with atomic_output_dir(dst, overwrite=options.overwrite) as tmp:
        if options.transformer_only:
            model.save_pretrained(tmp, max_shard_size=options.max_shard_size)
        else:
            LongCatVideoPipeline(transformer=model, **components).save_pretrained(
                tmp, max_shard_size=options.max_shard_size)
            _write_loras(root, tmp)
            write_model_card(tmp, VARIANT, "LongCatVideoPipeline", str(src))
            (tmp / "wan_variant.json").write_text(json.dumps(VARIANT.record(), indent=2) + "\n")
        bar.close()
    return Path(dst)


class LongCatFamily(ModelFamily):
    name = "longcat"
    title = "LongCat-Video (own DiT; Wan2.1 VAE and umT5)"
    variants = (VARIANT,)
    model_classes = (LongCatVideoTransformer3DModel,)
    pipeline_classes = (LongCatVideoPipeline,)
    hook_blocks = (LongCatVideoTransformerBlock,)
    generate_inputs = (
        GenerateInput("--video", "video", "video to continue (LongCat-Video); the output includes its conditioning "
                      "frames"),
        GenerateInput("--num-cond-frames", "num_cond_frames", "with --video: condition on its last N frames (4n+1)",
                      kind="int"),
    )

    def claims_release(self, src: Path, transformer: Path | None, variant: str | None) -> bool:
        return (variant or "").lower() == VARIANT.name or find_longcat_dit(src, transformer) is not None

    def convert_release(self, src: Path, dst: Path, options: ReleaseOptions) -> Path:
        return convert_longcat_release(src, dst, options)
