"""The Wan2.2-Animate-2 family (Wan-AI/Wan2.2-Animate-2-14B and its distilled DiT): character animation with
in-context attention to a cached reference (driving) video.

The release folder holds ``wan_animate_2/wan_animate_2_bf16.safetensors`` (and the distilled
``wan_animate_2/wan_animate_2_bf16_distillation.safetensors``) in DiffSynth-Studio's ``WanAnimate2Transformer`` layout
(``blocks.N.block.*``), which is not the Wan DiT table layout: this family claims the release
(:meth:`Animate2Family.claims_release`) and converts it with :mod:`diffusers_wan_ext.conversion.animate2` into
``transformer/`` (stock ``WanAnimate2Transformer3DModel`` when the CLIP width is the release's 1280, else our
:class:`~diffusers_wan_ext.models.WanAnimate2ExtTransformer3DModel`), plus the umT5 text encoder, tokenizer, Wan2.1
VAE, CLIP image encoder and a flow-match Euler scheduler (shift 5) as component sub-folders, with a
``model_index.json`` naming our classic :class:`~diffusers_wan_ext.pipelines.WanAnimate2Pipeline` (with
``log_scale = -1.3`` for the distilled DiT): ``DiffusionPipeline.from_pretrained(folder)`` and ``diffusers-wan
generate`` load it, and stock Diffusers' modular pipeline still does (``WanAnimate2Blocks().init_pipeline(folder)``:
it reads only the component entries).  Its :class:`DitExtension` makes the Wan DiT converter name the layout when it
meets these keys.

Runtime declarations: LoRA through our loader (the pipeline's ``load_lora_weights``), VRAM plans (the generic
planner: block-level offload of ``transformer.blocks``), TeaCache refused (no reference coefficients; the cached
reference pass), sequence parallel refused by the transformer (``_cp_unsupported_reason``), and training (the
dataset columns ``animate2_reference_image`` / ``animate2_reference_video``; the loss runs the reference pass and
the generation pass in one forward, see :func:`encode_animate2_training_inputs`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import __version__ as diffusers_version
from diffusers import FlowMatchEulerDiscreteScheduler, WanAnimate2Transformer3DModel, WanTransformer3DModel
from safetensors.torch import save_file

from ..conversion.animate2 import (
    ANIMATE2_RELEASE_FILE,
    BLOCK_KEY_MAP,
    TOP_LEVEL_MODULES,
    export_animate2_state_dict,
    is_animate2_state_dict,
    load_animate2_transformer_from_original,
)
from ..conversion.dit import DitExtension
from ..conversion.image_encoder import load_clip_from_original
from ..conversion.release_io import DTYPES, first_existing, progress_bar, write_model_card
from ..conversion.text_encoder import load_t5_from_original
from ..conversion.tokenizer import load_umt5_tokenizer
from ..conversion.vae import detect_vae_version, load_vae_from_original
from ..lora import map_block_target_modules
from ..models import WanAnimate2ExtTransformer3DModel
from ..models.transformer_wan_animate2 import RELEASE_CLIP_DIM
from ..utils.atomic import atomic_output_dir
from ..utils.io import ConversionError, load_state_dict, safetensors_keys, with_path
from ..pipelines import WanAnimate2Pipeline
from ..pipelines.pipeline_wan_animate2 import DEFAULT_PROMPT_REF
from ..utils.shims import PACKAGE, write_shim
from .base import Conditioning, ExtraInput, GenerateInput, ModelFamily, ReleaseOptions, TinyArch, WanVariant
from .tiny import TINY

__all__ = ["ANIMATE2", "ANIMATE2_DISTILLED", "Animate2Family", "convert_animate2_release",
           "encode_animate2_training_inputs", "find_animate2_dit", "make_tiny_animate2_dit"]

#: Where the release keeps the Wan2.1 components (DiffSynth's example); the root works too.
RELEASE_COMPONENT_DIR = "videomodel/Wan-AI"
T5_FILE, CLIP_FILE, VAE_FILE = ("models_t5_umt5-xxl-enc-bf16.pth",
                                "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "Wan2.1_VAE.pth")
TOKENIZER_DIRS = ("umt5-xxl", "google/umt5-xxl")
DISTILLED_FILE = "wan_animate_2/wan_animate_2_bf16_distillation.safetensors"

# Sampling defaults of DiffSynth-Studio's examples (Wan2.2-Animate-2-14B.py / -Distilled.py): 720x1280 portrait,
# 81-frame clips at 24 fps, sigma shift 5 (the pipeline default); 40 steps at CFG 3 / 10 steps, CFG 1 and
# animate2_log_scale -1.3 for the distilled DiT.
ANIMATE2 = WanVariant(
    "wan2.2-animate-2-14b", "animate2", "Wan-AI/Wan2.2-Animate-2-14B", dim=5120, num_layers=40, image_encoder=True,
    pipeline="WanAnimate2Pipeline", flow_shift=5.0, num_inference_steps=40, guidance_scale=3.0,
    height=1280, width=720, num_frames=81, fps=24,
    notes="wan_animate_2/wan_animate_2_bf16.safetensors; reference image + driving video, reference-video K/V "
          "cache; the CFG branch skips block 9",
    file_hints=(("animate_2",),),
)
ANIMATE2_DISTILLED = WanVariant(
    "wan2.2-animate-2-14b-distilled", "animate2", "Wan-AI/Wan2.2-Animate-2-14B", dim=5120, num_layers=40,
    image_encoder=True, pipeline="WanAnimate2Pipeline", flow_shift=5.0, num_inference_steps=10,
    guidance_scale=1.0, height=1280, width=720, num_frames=81, fps=24,
    notes="wan_animate_2/wan_animate_2_bf16_distillation.safetensors; log_scale -1.3 (DiffSynth's "
          "animate2_log_scale)",
    aliases=("wan2.2-animate-2-14b-distillation",), file_hints=(("animate_2", "distill"),),
)


def find_animate2_dit(src: str | os.PathLike, transformer: str | os.PathLike | None = None,
                      variant: str | None = None) -> Path | None:
    """The Animate-2 DiT file of a release folder (``wan_animate_2/wan_animate_2_bf16.safetensors``, else another
    Animate-2 file there; only the distilled file when ``variant`` names it), a ``wan_animate_2/`` folder, a file, or
    ``transformer``; ``None`` if there is none."""
    distilled = variant is not None and variant.lower() in (ANIMATE2_DISTILLED.name, *ANIMATE2_DISTILLED.aliases)
    preferred = DISTILLED_FILE if distilled else ANIMATE2_RELEASE_FILE
    src = Path(src)
    if transformer is not None:
        candidates = [Path(transformer)]
    elif src.is_file():
        candidates = [src]
    else:
        folder = src / "wan_animate_2" if (src / "wan_animate_2").is_dir() else src
        others = [] if distilled else sorted(p for p in folder.glob("*.safetensors") if p.name != Path(preferred).name)
        candidates = [folder / Path(preferred).name] + others
    release_names = (Path(ANIMATE2_RELEASE_FILE).name, Path(DISTILLED_FILE).name)
    for cand in candidates:
        if not (cand.is_file() and cand.suffix == ".safetensors"):
            continue
        keys = safetensors_keys(cand)
        if keys is None and cand.name in release_names:  # a truncated release file: the loader names it
            return cand
        if keys is not None and is_animate2_state_dict(keys):
            return cand
    return None


def _variant_for(dit: Path, variant: str | None) -> WanVariant:
    if variant and variant.lower() in (ANIMATE2_DISTILLED.name, *ANIMATE2_DISTILLED.aliases):
        return ANIMATE2_DISTILLED
    return ANIMATE2_DISTILLED if "distill" in dit.name.lower() else ANIMATE2


def _component_paths(src: Path, options: ReleaseOptions) -> dict[str, Path | None]:
    root = src if src.is_dir() else src.parent
    if root.name == "wan_animate_2":
        root = root.parent
    dirs = [root / RELEASE_COMPONENT_DIR, root]
    paths = {
        "text_encoder": Path(options.text_encoder) if options.text_encoder else first_existing(
            *(d / T5_FILE for d in dirs)),
        "tokenizer": Path(options.tokenizer) if options.tokenizer else first_existing(
            *(d / t for d in dirs for t in TOKENIZER_DIRS)),
        "vae": Path(options.vae) if options.vae else first_existing(*(d / VAE_FILE for d in dirs)),
        "image_encoder": first_existing(*(d / CLIP_FILE for d in dirs)),
    }
    missing = [] if options.transformer_only else [k for k, v in paths.items() if v is None]
    if missing:
        raise ConversionError(
            f"{src}: missing component(s) for Wan2.2-Animate-2: {', '.join(missing)}. Keep {T5_FILE}, {CLIP_FILE}, "
            f"umt5-xxl/ in {RELEASE_COMPONENT_DIR}/ (as released) or next to wan_animate_2/, and {VAE_FILE} (from "
            "Wan-AI/Wan2.1-T2V-14B) beside them, or pass --text-encoder / --tokenizer / --vae PATH (or "
            "--transformer-only)."
        )
    return paths


def _load_components(model, paths: dict[str, Path], torch_dtype: torch.dtype, image_encoder_heads: int | None,
                     bar) -> dict[str, Any]:
    """umT5, tokenizer, Wan2.1 VAE and CLIP, each checked against the DiT."""
    out: dict[str, Any] = {}
    bar.set_postfix_str("text encoder")
    out["text_encoder"] = with_path(paths["text_encoder"],
                                    lambda: load_t5_from_original(paths["text_encoder"], torch_dtype=torch_dtype))
    if out["text_encoder"].config.d_model != model.config.text_dim:
        raise ConversionError(f"{paths['text_encoder']}: text encoder width {out['text_encoder'].config.d_model} does "
                              f"not match the DiT's text_embedding.0 width {model.config.text_dim}")
    out["tokenizer"] = with_path(paths["tokenizer"], lambda: load_umt5_tokenizer(paths["tokenizer"]))
    bar.update()
    bar.set_postfix_str("vae")
    vae_sd = with_path(paths["vae"], lambda: load_state_dict(paths["vae"]))
    if with_path(paths["vae"], lambda: detect_vae_version(vae_sd)) != "wan2.1":
        raise ConversionError(f"{paths['vae']}: Wan2.2-Animate-2 uses the Wan2.1 VAE ({VAE_FILE})")
    out["vae"] = with_path(paths["vae"], lambda: load_vae_from_original(vae_sd, torch_dtype=torch.float32))
    if out["vae"].config.z_dim != model.config.out_dim:
        raise ConversionError(f"{paths['vae']}: VAE latent channels {out['vae'].config.z_dim} do not match the DiT's "
                              f"out channels {model.config.out_dim} (head.head.weight)")
    bar.update()
    bar.set_postfix_str("image encoder")
    clip = with_path(paths["image_encoder"], lambda: load_clip_from_original(
        paths["image_encoder"], num_heads=image_encoder_heads, torch_dtype=torch_dtype))
    if clip.config.hidden_size != model.config.clip_dim:
        raise ConversionError(f"{paths['image_encoder']}: CLIP width {clip.config.hidden_size} does not match the "
                              f"DiT's img_emb.proj.0 width {model.config.clip_dim}")
    out["image_encoder"] = clip  # no image_processor: stock's pipeline preprocesses CLIP input itself and its
    # "image_processor" component is its video processor (created from config)
    bar.update()
    return out


def _as_stock_if_possible(model: WanAnimate2ExtTransformer3DModel) -> torch.nn.Module:
    """Stock ``WanAnimate2Transformer3DModel`` holding the same weights when it can (release CLIP width)."""
    if model.config.clip_dim != RELEASE_CLIP_DIM:
        return model
    config = {k: v for k, v in model.config.items() if not k.startswith("_") and k != "clip_dim"}
    with init_empty_weights():
        stock = WanAnimate2Transformer3DModel(**config)
    stock.load_state_dict(model.state_dict(), strict=True, assign=True)
    return stock.eval()


#: The model card's example call (``str.format`` fields: the variant's sampling defaults).
CARD_CALL = (
    'image=load_image("refimage.jpg"), driving_video=load_video("refvideo.mp4"),\n'
    '             prompt="a woman dancing", height={height}, width={width}, num_frames={num_frames},\n'
    "             num_inference_steps={num_inference_steps}, guidance_scale={guidance_scale}, long_video=True"
)

#: ``model_index.json`` entries of the converted folder (stock's modular Animate-2 pipelines read the components
#: from it: ``WanAnimate2Blocks().init_pipeline(folder)``).
COMPONENT_CLASSES = {
    "transformer": ("diffusers", "WanAnimate2Transformer3DModel"), "vae": ("diffusers", "AutoencoderKLWan"),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"), "text_encoder": ("transformers", "UMT5EncoderModel"),
    "tokenizer": ("transformers", "T5TokenizerFast"), "image_encoder": ("transformers", "CLIPVisionModel"),
}


#: ``log_scale`` of each variant's pipeline (``model_index.json``; DiffSynth's ``animate2_log_scale``).
LOG_SCALES = {ANIMATE2.name: 0.0, ANIMATE2_DISTILLED.name: -1.3}


def _write_model_index(folder: Path, var: WanVariant, transformer: torch.nn.Module) -> None:
    """Our classic pipeline (with a root shim for a fresh interpreter) and the components; stock's modular pipeline
    reads only the component entries."""
    entries = dict(COMPONENT_CLASSES)
    if type(transformer) is not WanAnimate2Transformer3DModel:  # our subclass (a CLIP width other than 1280)
        entries["transformer"] = (PACKAGE, type(transformer).__name__)
    index = {"_class_name": [PACKAGE, WanAnimate2Pipeline.__name__], "_diffusers_version": diffusers_version,
             **{k: list(v) for k, v in entries.items()}, "log_scale": LOG_SCALES[var.name],
             "num_inference_steps": var.num_inference_steps, "guidance_scale": var.guidance_scale}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_shim(folder)


_CARD_NOTE = (
    "\nStock Diffusers' modular pipeline loads this folder too:\n"
    "`from diffusers.modular_pipelines import WanAnimate2Blocks` (`WanAnimate2DistilledBlocks` for the distilled DiT),\n"
    "`pipe = WanAnimate2Blocks().init_pipeline(\"<this repo>\"); pipe.load_components(torch_dtype=torch.bfloat16)`.\n"
)


def _read_config(dit: Path) -> dict[str, Any]:
    cfg_path = dit.parent / "config.json"
    if not cfg_path.is_file():
        return {}
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{cfg_path}: invalid JSON ({e})") from e


def convert_animate2_release(src: str | os.PathLike, dst: str | os.PathLike, options: ReleaseOptions | None = None,
                             variant: str | None = None, **kwargs: Any) -> Path:
    """Convert a Wan2.2-Animate-2-14B release (or its distilled DiT, ``variant="wan2.2-animate-2-14b-distilled"``)
    into ``dst``: ``transformer/`` and, unless ``transformer_only``, ``text_encoder/``, ``tokenizer/``, ``vae/``,
    ``image_encoder/``, ``scheduler/``, ``model_index.json``, a model card and ``wan_variant.json``.  With ``transformer_only`` the
    transformer folder is ``dst`` itself.  A ``config.json`` beside the DiT file (optional) supplies ``num_heads`` /
    ``text_len`` / ``eps`` / the ``refer_*`` offsets; widths come from the shapes.

    Example:
        >>> convert_animate2_release("Wan2.2-Animate-2-14B", "Wan2.2-Animate-2-14B-diffusers")  # doctest: +SKIP
    """
    options = options or ReleaseOptions(**kwargs)
    if options.dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {options.dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype, src = DTYPES[options.dtype], Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    dit = find_animate2_dit(src, options.transformer, variant)
    if dit is None:
        expected = DISTILLED_FILE if _variant_for(Path(), variant) is ANIMATE2_DISTILLED else ANIMATE2_RELEASE_FILE
        raise ConversionError(f"{options.transformer or src}: no Wan2.2-Animate-2 DiT found (expected "
                              f"{expected} with blocks.N.block.* keys, or pass --transformer FILE)")
    var = _variant_for(dit, variant)
    paths = _component_paths(src, options)
    cfg = _read_config(dit)
    with atomic_output_dir(dst, overwrite=options.overwrite) as tmp:
        with progress_bar(1 if options.transformer_only else 4, options.progress) as bar:
            bar.set_postfix_str("transformer")
            model = with_path(dit, lambda: load_animate2_transformer_from_original(load_state_dict(dit), cfg,
                                                                                   torch_dtype=torch_dtype))
            bar.update()
            target = tmp if options.transformer_only else tmp / "transformer"
            transformer = _as_stock_if_possible(model)
            if not options.transformer_only:
                for name, component in _load_components(model, paths, torch_dtype, options.image_encoder_heads,
                                                        bar).items():
                    component.save_pretrained(tmp / name)
                FlowMatchEulerDiscreteScheduler(shift=var.flow_shift).save_pretrained(tmp / "scheduler")
                _write_model_index(tmp, var, transformer)
                write_model_card(tmp, var, var.pipeline, str(src), call=CARD_CALL, extra=_CARD_NOTE)
                (tmp / "wan_variant.json").write_text(json.dumps(var.record(), indent=2) + "\n")
            transformer.save_pretrained(target, max_shard_size=options.max_shard_size)
    return Path(dst)


def make_tiny_animate2_dit(seed: int = 0, num_layers: int = TINY["num_layers"], text_len: int = 512
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A tiny Animate-2 DiT in the release layout (``blocks.N.block.*``) and its ``config.json`` (the release has
    none; the tiny head dim is not 128, so ``num_heads`` must be stated)."""
    config = dict(patch_size=[1, 2, 2], text_len=text_len, in_dim=36, dim=TINY["dim"], ffn_dim=TINY["ffn_dim"],
                  freq_dim=TINY["freq_dim"], text_dim=TINY["text_dim"], out_dim=16, num_heads=TINY["num_heads"],
                  num_layers=num_layers, clip_dim=TINY["clip_dim"])
    model = WanAnimate2ExtTransformer3DModel(**config)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        base = 1.0 if "norm" in k and k.endswith("weight") else 0.0
        sd[k] = torch.randn(v.shape, generator=g) * (0.02 if v.ndim > 1 else 0.01) + base
    original = dict(config, model_type="animate2", eps=1e-6)
    original.pop("clip_dim")
    return export_animate2_state_dict(sd), original


def encode_animate2_training_inputs(builder, sample: dict[str, Any], inputs, num_frames: int, height: int,
                                    width: int) -> None:
    """Training conditioning of Animate-2 (DiffSynth's training units): the reference image's latent is prepended to
    the clean latents (its slot is denoised and in the loss, as in DiffSynth), ``y`` / CLIP from the reference image,
    and the driving video's latents + ``condition_y``, the reference prompt's context and the CLIP features of its
    first frame as the one-call transformer kwargs (reference pass + generation pass in the training forward)."""
    pipe = builder.pipe
    image = builder.image(sample, "animate2_reference_image").to(builder.device)
    video = builder.video(sample, "animate2_reference_video").to(builder.device)
    image_latents = builder.encode_latents(image[:, :, None])
    inputs.latents = torch.cat([image_latents.to(inputs.latents), inputs.latents], dim=2)
    cond = pipe.clip_condition(image_latents[0], video[0], None)
    inputs.y = cond["y"][None]
    inputs.image_embeds = pipe.encode_clip(image, builder.device)
    prompt_ref = sample.get("animate2_prompt_ref") or DEFAULT_PROMPT_REF
    inputs.transformer_kwargs.update(
        reference_hidden_states=torch.cat([cond["condition_latents"], cond["condition_y"]])[None],
        reference_encoder_hidden_states=builder.encode_prompt(str(prompt_ref)),
        reference_image_embeds=pipe.encode_clip(video[:, :, 0], builder.device),
    )


ANIMATE2_CONDITIONING = Conditioning(
    "Wan2.2-Animate-2", WanAnimate2Pipeline, required=("animate2_reference_image", "animate2_reference_video"),
    optional=("animate2_prompt_ref",), encode=encode_animate2_training_inputs,
)


class Animate2Family(ModelFamily):
    name = "animate2"
    title = "Wan2.2-Animate-2 (character animation with a cached reference video)"
    variants = (ANIMATE2, ANIMATE2_DISTILLED)
    dit = DitExtension(
        name="animate2", arches=("animate2",),
        layouts="Animate-2 blocks.N.block.* (converted by the animate2 family, not the Wan table converter)",
        foreign_keys=((".block.self_attn.", "Wan2.2-Animate-2 (blocks.N.block.*): convert its release folder with "
                       "`diffusers-wan convert` (the animate2 family) or diffusers_wan_ext.conversion.animate2"),),
        model_class=lambda info: WanAnimate2ExtTransformer3DModel,
    )
    model_classes = (WanAnimate2ExtTransformer3DModel,)
    pipeline_classes = (WanAnimate2Pipeline,)
    card_calls = {"WanAnimate2Pipeline": CARD_CALL}
    generate_inputs = (
        GenerateInput("--driving-video", "driving_video", "Wan2.2-Animate-2: the driving video (its motion; generated "
                      "whole, in clips of --num-frames); --image = the character"),
        GenerateInput("--prompt-ref", "prompt_ref", "Wan2.2-Animate-2: a description of the driving video (the "
                      "reference pass's prompt)", kind="text"),
        GenerateInput("--log-scale", "log_scale", "Wan2.2-Animate-2: attention bias on generated latent frame 1 "
                      "(default: the folder's, -1.3 for the distilled DiT)", kind="float"),
    )
    generate_pipeline = {"WanAnimate2Pipeline": WanAnimate2Pipeline}
    tiny_arches = {"animate2": TinyArch("animate2", 36, 16, clip=True)}
    dataset_inputs = {
        "animate2_reference_image": ExtraInput("image"),
        "animate2_reference_video": ExtraInput("video"),
        "animate2_prompt_ref": ExtraInput("str"),
    }
    #: its LoRAs name Animate-2 modules (``blocks.N.self_attn.to_q``, ``ffn.0``): the LoRA exporter's Wan DiT tables
    #: have no original / Kohya / DiffSynth name for them (DiffSynth's ``blocks.N.block.*`` layout is read by the
    #: pipeline's loader, not written), so ``--export_format`` is refused at start-up
    lora_export_formats = ()

    def __init__(self) -> None:
        #: the ``--variant`` of the release being claimed (``convert_release`` receives no variant)
        self.claimed_variant: str | None = None

    def claims_release(self, src: Path, transformer: Path | None, variant: str | None) -> bool:
        names = (ANIMATE2.name, ANIMATE2_DISTILLED.name, *ANIMATE2_DISTILLED.aliases)
        claimed = (variant or "").lower() in names or (src.exists() and find_animate2_dit(src, transformer) is not None)
        self.claimed_variant = variant if claimed else None
        return claimed

    def convert_release(self, src: Path, dst: Path, options: ReleaseOptions) -> Path:
        return convert_animate2_release(src, dst, options, variant=self.claimed_variant)

    def prepare_generate(self, pipe, model: str, given: dict[str, Any], kw: dict[str, Any]) -> None:
        """The whole driving video, in clips of ``--num-frames`` (DiffSynth's ``generate_long_video``)."""
        if "log_scale" in given:
            given["log_scale"] = float(given["log_scale"])
        kw.update(given, long_video=True)

    def claims_config(self, config: Any) -> bool:
        return "refer_offset_t" in config

    def training_conditioning(self, config: Any, expand_timesteps: bool) -> Conditioning | None:
        return ANIMATE2_CONDITIONING if self.claims_config(config) else None

    def lora_target_modules(self, names: list[str]) -> list[str] | None:
        """DiffSynth's names on the release's block modules (``self_attn.q`` -> ``self_attn.to_q``; ``q`` -> the
        self- and cross-attention ``to_q``), as DiffSynth's PEFT suffixes match them on its Animate-2 DiT."""
        return map_block_target_modules(names, BLOCK_KEY_MAP)

    def training_module_path(self, path: str) -> str | None:
        """The release's module path (``blocks.3.block.self_attn.q``; top-level modules keep their names) as ours
        (``blocks.3.self_attn.to_q``)."""
        m = re.match(r"^blocks\.(\d+)\.block\.(.+)$", path)
        if m is None:
            return path if path in TOP_LEVEL_MODULES else None
        local = dict(BLOCK_KEY_MAP).get(m.group(2))
        return None if local is None else f"blocks.{m.group(1)}.{local}"

    def tiny_dit_model(self, arch: str, experts: int, kwargs: dict[str, Any]):
        """A placeholder Wan I2V DiT for the shared tiny-release writer; :meth:`tiny_release_files` replaces its
        files with the Animate-2 release layout."""
        return WanTransformer3DModel(**kwargs), {"model_type": "i2v"}

    def tiny_release_files(self, folder: Path, dit_folder: Path, arch: str, dit_state_dict: dict, seed: int) -> None:
        (dit_folder / "diffusion_pytorch_model.safetensors").unlink(missing_ok=True)
        (dit_folder / "config.json").unlink(missing_ok=True)
        sd, config = make_tiny_animate2_dit(seed, text_len=512)
        out = folder / ANIMATE2_RELEASE_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
        (out.parent / "config.json").write_text(json.dumps(config, indent=2))
