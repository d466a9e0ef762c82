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
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

from ..conversion.dit import find_dit_files
from ..conversion.longcat import (
    BLOCK_KEY_MAP,
    BLOCK_SPLITS,
    LORA_HYPHEN,
    LORA_PREFIX,
    TOP_LEVEL_KEY_MAP,
    export_longcat_state_dict,
    convert_longcat_lora_state_dict,
    is_longcat_lora_state_dict,
    is_longcat_state_dict,
    load_longcat_transformer_from_original,
)
from ..conversion.release_components import load_umt5_component, load_wan21_vae_component
from ..conversion.release_io import DTYPES, first_existing, progress_bar, write_model_card
from ..conversion.text_encoder import export_t5_state_dict
from ..conversion.tokenizer import load_umt5_tokenizer, make_tiny_umt5_tokenizer
from ..conversion.vae import export_vae_state_dict
from ..models import LongCatVideoTransformer3DModel
from ..models.transformer_longcat import LongCatVideoAttnProcessor, LongCatVideoTransformerBlock, longcat_ffn_dim
from ..pipelines import LongCatVideoPipeline
from ..utils.atomic import atomic_output_dir
from ..utils.gguf_files import read_gguf
from ..utils.io import ConversionError, load_state_dict, read_json, safetensors_keys, with_path
from .base import Conditioning, ExtraInput, GenerateInput, ModelFamily, ReleaseOptions, WanVariant
from .tiny import TINY, tiny_t5, tiny_vae21

__all__ = ["LongCatFamily", "TINY_LONGCAT", "convert_longcat_release", "encode_longcat_condition",
           "export_longcat_lora", "find_longcat_dit", "make_tiny_longcat_lora", "make_tiny_longcat_release"]

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
            return list(read_json(path, "shard index").get("weight_map", {}))
        if path.name.endswith(".safetensors"):
            return safetensors_keys(path) or []
        if path.name.endswith(".gguf"):  # a GGUF DiT (memory-mapped, nothing dequantized)
            return list(read_gguf(path)[0])
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
        "text_encoder": Path(options.text_encoder) if options.text_encoder else first_existing(root / "text_encoder", root / WAN_T5_FILE),
        "tokenizer": Path(options.tokenizer) if options.tokenizer else first_existing(root / "tokenizer", root / WAN_TOKENIZER_DIR),
        "vae": Path(options.vae) if options.vae else first_existing(root / "vae", root / WAN_VAE_FILE),
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
    te = with_path(paths["text_encoder"], lambda: load_umt5_component(paths["text_encoder"], torch_dtype))
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
    vae = with_path(paths["vae"], lambda: load_wan21_vae_component(paths["vae"], "LongCat-Video"))
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
    with atomic_output_dir(dst, overwrite=options.overwrite) as tmp:  # claimed before loading
        with progress_bar(1 if options.transformer_only else 5, options.progress) as bar:
            bar.set_postfix_str("transformer")
            model = with_path(dit, lambda: load_longcat_transformer_from_original(dit, torch_dtype=torch_dtype))
            bar.update()
            components = {} if options.transformer_only else _load_components(model, paths, root, torch_dtype,
                                                                                bar)
            if options.transformer_only:
                model.save_pretrained(tmp, max_shard_size=options.max_shard_size)
            else:
                LongCatVideoPipeline(transformer=model, **components).save_pretrained(
                    tmp, max_shard_size=options.max_shard_size)
                _write_loras(root, tmp)
                write_model_card(tmp, VARIANT, "LongCatVideoPipeline", str(src))
                (tmp / "wan_variant.json").write_text(json.dumps(VARIANT.record(), indent=2) + "\n")
    return Path(dst)


#: Original ``dit/config.json`` fields of the tiny LongCat-Video DiT (release: hidden 4096, depth 48, 32 heads,
#: caption 4096, adaLN 512, frequency 256).
TINY_LONGCAT = dict(
    in_channels=16, out_channels=16, hidden_size=48, depth=2, num_heads=2, caption_channels=TINY["text_dim"],
    mlp_ratio=4, adaln_tembed_dim=32, frequency_embedding_size=32, patch_size=[1, 2, 2], enable_flashattn3=False,
    enable_flashattn2=True, enable_xformers=False, enable_bsa=False, cp_split_hw=None, text_tokens_zero_pad=True,
)


#: Modules of the tiny original-format LoRA (module, number of up blocks: the fused projections get one per part).
TINY_LONGCAT_LORA_TARGETS = (
    ("blocks.{i}.attn.qkv", 3), ("blocks.{i}.attn.proj", 1), ("blocks.{i}.cross_attn.kv_linear", 2),
    ("blocks.{i}.cross_attn.q_linear", 1), ("blocks.{i}.ffn.w1", 1), ("blocks.{i}.ffn.w2", 1),
    ("blocks.{i}.adaLN_modulation.1", 1), ("final_layer.linear", 1),
)


def make_tiny_longcat_lora(dit_state_dict: dict, rank: int = 4, seed: int = 0, alpha_scale: float = 0.5,
                           fused_single_up: bool = False) -> dict:
    """A LoRA in the original LongCat-Video format (``lora_utils.LoRANetwork`` state dict) for an original-layout
    DiT state dict: ``lora_down`` / ``lora_up`` (or ``lora_up.blocks.N`` for fused projections) and
    ``alpha_scale``.  ``fused_single_up`` gives fused projections one up matrix instead of one block per part."""
    g = torch.Generator().manual_seed(seed)
    depth = len({k.split(".")[1] for k in dit_state_dict if k.startswith("blocks.")})
    out = {}
    for template, parts in TINY_LONGCAT_LORA_TARGETS:
        for i in range(depth) if "{i}" in template else [None]:
            module = template.format(i=i)
            w = dit_state_dict[module + ".weight"]
            name = LORA_PREFIX + module.replace(".", LORA_HYPHEN)
            n = 1 if fused_single_up else parts
            out[f"{name}.lora_down.weight"] = torch.randn(n * rank, w.shape[1], generator=g) * 0.1
            if n == 1:
                out[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
            else:
                for b in range(n):
                    out[f"{name}.lora_up.blocks.{b}.weight"] = torch.randn(w.shape[0] // n, rank, generator=g) * 0.1
            out[f"{name}.alpha_scale"] = torch.tensor(alpha_scale)
    return out


def make_tiny_longcat_release(folder: str | os.PathLike, seed: int = 0, layout: str = "release",
                              shards: int = 1) -> Path:
    """Write a tiny meituan-longcat/LongCat-Video release (original ``dit/`` key layout) into ``folder``.

    Args:
        layout: ``"release"`` -- the Hub folders ``dit/``, ``vae/`` (Diffusers), ``text_encoder/`` (Transformers),
            ``tokenizer/``, ``scheduler/``, ``lora/cfg_step_lora.safetensors`` (original LoRA format); ``"wan"`` --
            ``dit/`` with the Wan2.1 files DiffSynth-Studio pairs it
            with (``models_t5_umt5-xxl-enc-bf16.pth``, ``Wan2.1_VAE.pth``, ``google/umt5-xxl/``).
        shards: split the DiT into this many safetensors shards plus an index, as the release does.

    Example:
        >>> path = make_tiny_longcat_release("/tmp/tiny-longcat")  # doctest: +SKIP
    """
    if layout not in ("release", "wan"):
        raise ValueError(f"layout must be 'release' or 'wan'; got {layout!r}")
    folder = Path(folder)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c = TINY_LONGCAT
    model = LongCatVideoTransformer3DModel(
        patch_size=tuple(c["patch_size"]), num_attention_heads=c["num_heads"],
        attention_head_dim=c["hidden_size"] // c["num_heads"], in_channels=c["in_channels"],
        out_channels=c["out_channels"], num_layers=c["depth"], text_dim=c["caption_channels"],
        freq_dim=c["frequency_embedding_size"], time_embed_dim=c["adaln_tembed_dim"],
        ffn_dim=longcat_ffn_dim(c["hidden_size"], c["mlp_ratio"]),
    )
    sd = {}
    for k, v in model.state_dict().items():
        std = 0.05 if v.ndim > 1 else 0.02
        sd[k] = torch.randn(v.shape, generator=g) * std + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
    sd = export_longcat_state_dict(sd)
    dit = folder / "dit"
    dit.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    if shards == 1:
        save_file({k: sd[k].contiguous() for k in keys}, str(dit / "diffusion_pytorch_model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: sd[k].contiguous() for k in part}, str(dit / name))
            weight_map.update(dict.fromkeys(part, name))
        index = {"metadata": {"total_size": sum(v.numel() * 4 for v in sd.values())}, "weight_map": weight_map}
        (dit / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dit / "config.json").write_text(json.dumps(
        {"_class_name": "LongCatVideoTransformer3DModel", "_diffusers_version": "0.32.0", **c}, indent=2))

    t5, vae = tiny_t5(), tiny_vae21()
    if layout == "release":
        t5.save_pretrained(folder / "text_encoder")
        vae.save_pretrained(folder / "vae")
        make_tiny_umt5_tokenizer(folder / "tokenizer", vocab_size=TINY["t5_vocab"])
        FlowMatchEulerDiscreteScheduler(shift=12.0).save_pretrained(folder / "scheduler")
        (folder / "lora").mkdir(exist_ok=True)
        save_file(make_tiny_longcat_lora(sd, seed=seed + 1), str(folder / "lora" / "cfg_step_lora.safetensors"))
    else:
        torch.save(export_t5_state_dict(t5.state_dict()), folder / "models_t5_umt5-xxl-enc-bf16.pth")
        torch.save(export_vae_state_dict(vae.state_dict()), folder / "Wan2.1_VAE.pth")
        make_tiny_umt5_tokenizer(folder / "google" / "umt5-xxl", vocab_size=TINY["t5_vocab"])
    return folder


# ------------------------------------------------------------------------------------------------------- training


def encode_longcat_condition(builder, sample: dict, inputs, num_frames: int, height: int, width: int) -> None:
    """LongCat-Video training inputs: the prompt's attention mask (rows past the prompt are zero, as DiffSynth-Studio
    derives it) and, with ``longcat_video`` (continuation), its frames as clean conditioning latents that replace
    the clip's first latent frames -- kept clean, passed as ``num_cond_latents`` and left out of the loss, as the
    pipeline keeps them during sampling."""
    kwargs = {"encoder_attention_mask": (inputs.prompt_embeds != 0).any(dim=-1).long()}
    if "longcat_video" in builder.extra_inputs:
        frames = builder.video(sample, "longcat_video").to(builder.device)
        k = (frames.shape[2] - 1) // 4 + 1
        if k >= inputs.latents.shape[2]:
            raise ValueError(f"longcat_video has {frames.shape[2]} frame(s), which fill the clip's {num_frames}: the "
                             f"clip must be longer than its conditioning frames by at least 4 frames")
        cond = builder.encode_latents(frames).to(inputs.latents)
        inputs.latents = torch.cat([cond, inputs.latents[:, :, k:]], dim=2)
        inputs.clean_frames = k
        kwargs["num_cond_latents"] = torch.tensor(k)
    inputs.transformer_kwargs = kwargs


LONGCAT_CONDITIONING = Conditioning("LongCat-Video (text-to-video, continuation)", LongCatVideoPipeline,
                                    optional=("longcat_video",), encode=encode_longcat_condition, output_sign=-1.0)


def _original_module(module: str) -> tuple[str, int, int] | None:
    """Diffusers module -> (original module, part index, parts) of the LongCat DiT (``blocks.3.attn1.to_k`` ->
    ``("blocks.3.attn.qkv", 1, 3)``)."""
    for src, dst in TOP_LEVEL_KEY_MAP:
        if module == dst:
            return src, 0, 1
    head, _, local = module.partition(".")
    index, _, local = local.partition(".")
    if head != "blocks" or not index.isdigit():
        return None
    for src, parts in BLOCK_SPLITS:
        if local in parts:
            return f"blocks.{index}.{src}", parts.index(local), len(parts)
    for src, dst in BLOCK_KEY_MAP:
        if local == dst:
            return f"blocks.{index}.{src}", 0, 1
    return None


def export_longcat_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Diffusers LoRA of the LongCat-Video transformer (``transformer.<module>.lora_A/B.weight``, scale folded in:
    what training writes) in the original LongCat-Video format (``lora_utils.LoRANetwork``: ``lora_down``,
    ``lora_up`` or ``lora_up.blocks.N`` for the fused ``qkv`` / ``kv_linear``, ``alpha_scale`` 1), which the
    release's code and :class:`~diffusers_wan_ext.LongCatVideoPipeline` load.  A fused projection whose parts were
    not all trained gets zero factors for the others.  A key of another module is a ``ValueError`` naming it.

    Example:
        >>> sd = {"transformer.blocks.0.ffn.w1.lora_A.weight": torch.ones(4, 8),
        ...       "transformer.blocks.0.ffn.w1.lora_B.weight": torch.ones(16, 4)}
        >>> sorted(export_longcat_lora(sd))[:2]
        ['lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___ffn___lorahyphen___w1.alpha_scale', \
'lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___ffn___lorahyphen___w1.lora_down.weight']
    """
    grouped: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    parts_of: dict[str, int] = {}
    for key in sorted(state_dict):
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ValueError(f"{key}: not a LoRA factor (lora_A / lora_B weight)")
            continue
        module = key[: -len(".lora_A.weight")].removeprefix("transformer.")
        found = _original_module(module)
        up = state_dict.get(key.replace(".lora_A.", ".lora_B."))
        if found is None or up is None:
            raise ValueError(f"{key}: {'no lora_B for it' if up is None else 'no LongCat-Video module ' + module}")
        original, part, parts = found
        grouped.setdefault(original, {})[part] = (state_dict[key], up)
        parts_of[original] = parts
    out: dict[str, torch.Tensor] = {}
    for original, factors in grouped.items():
        name = LORA_PREFIX + original.replace(".", LORA_HYPHEN)
        down0, up0 = next(iter(factors.values()))
        rank, parts = down0.shape[0], parts_of[original]
        downs, ups = [], []
        for i in range(parts):
            down, up = factors.get(i, (torch.zeros_like(down0), torch.zeros_like(up0)))
            if down.shape[0] != rank:
                raise ValueError(f"{original}: its parts have LoRA ranks {down.shape[0]} and {rank}")
            downs.append(down)
            ups.append(up)
        out[f"{name}.lora_down.weight"] = torch.cat(downs).contiguous()
        if parts == 1:
            out[f"{name}.lora_up.weight"] = ups[0].contiguous()
        else:
            out.update({f"{name}.lora_up.blocks.{i}.weight": u.contiguous() for i, u in enumerate(ups)})
        out[f"{name}.alpha_scale"] = torch.tensor(1.0)
    return out


class LongCatFamily(ModelFamily):
    name = "longcat"
    title = "LongCat-Video (own DiT; Wan2.1 VAE and umT5)"
    variants = (VARIANT,)
    model_classes = (LongCatVideoTransformer3DModel,)
    pipeline_classes = (LongCatVideoPipeline,)
    hook_blocks = (LongCatVideoTransformerBlock,)
    hook_processors = (LongCatVideoAttnProcessor,)
    generate_inputs = (
        GenerateInput("--video", "video", "video to continue (LongCat-Video); the output includes its conditioning "
                      "frames"),
        GenerateInput("--num-cond-frames", "num_cond_frames", "with --video: condition on its last N frames (4n+1)",
                      kind="int"),
    )

    conditionings = (LONGCAT_CONDITIONING,)
    #: DiffSynth-Studio's LongCat-Video column: the conditioning frames of continuation (4n+1, the clip's first)
    dataset_inputs = {"longcat_video": ExtraInput("video_prefix")}
    #: its LoRAs name LongCat modules (``attn.qkv``, ``ffn.w1`` ...): the Wan DiT layouts of ``--export_format`` do
    #: not hold them; ``longcat`` is the original LongCat layout (:func:`export_longcat_lora`)
    lora_export_formats = ("longcat",)
    own_lora_formats = {"longcat": "lora_longcat.safetensors"}

    def export_own_lora(self, fmt: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if fmt != "longcat":
            return super().export_own_lora(fmt, state_dict)
        return export_longcat_lora(state_dict)

    def claims_release(self, src: Path, transformer: Path | None, variant: str | None) -> bool:
        return (variant or "").lower() == VARIANT.name or find_longcat_dit(src, transformer) is not None

    def claims_config(self, config: Any) -> bool:
        return "text_tokens_zero_pad" in config

    def training_conditioning(self, config: Any, expand_timesteps: bool) -> Conditioning | None:
        return LONGCAT_CONDITIONING if self.claims_config(config) else None

    def load_training_transformer(self, path: Path, torch_dtype: torch.dtype) -> torch.nn.Module | None:
        dit = find_longcat_dit(path)
        return None if dit is None else load_longcat_transformer_from_original(dit, torch_dtype=torch_dtype)

    def convert_release(self, src: Path, dst: Path, options: ReleaseOptions) -> Path:
        return convert_longcat_release(src, dst, options)
