"""The Wan2.2-Animate family: character animation / replacement (stock ``WanAnimateTransformer3DModel``).

The release's DiT file holds an I2V DiT with CLIP plus the Animate adapter (pose patch embedding, motion encoder,
face encoder, face blocks), converted by rules in :mod:`diffusers_wan_ext.conversion.animate`; its
``relighting_lora.ckpt`` becomes ``relighting_lora/`` (a Diffusers LoRA) in the converted folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import WanAnimateTransformer3DModel
from diffusers.models.transformers.transformer_wan_animate import WanAttnProcessor as WanAnimateAttnProcessor
from diffusers.models.transformers.transformer_wan_animate import WanTransformerBlock as WanAnimateBlock

from ..conversion.animate import (
    DIFFUSERS_LORA_FILE,
    animate_config_from_state_dict,
    convert_animate_state_dict,
    convert_relighting_lora,
    export_animate_state_dict,
    find_relighting_lora,
    is_animate_key,
    save_relighting_lora,
)
from ..conversion.dit import DitExtension, DitInfo, DitShape
from ..conversion.release_io import DTYPES
from ..lora.loader import check_lora_state_dict
from ..models import WanAnimateExtTransformer3DModel
from ..pipelines import WanAnimateExtPipeline
from ..utils.io import ConversionError, naming
from .base import (
    CommandArgument,
    Conditioning,
    ConvertInput,
    ExtraInput,
    FamilyCommand,
    GenerateInput,
    ModelFamily,
    TinyArch,
    TrainingScope,
    WanVariant,
)

__all__ = ["ANIMATE_TRAINING_SCOPE", "AnimateFamily", "RELIGHTING_LORA_MODULES", "encode_animate_condition",
           "make_tiny_relighting_lora"]

#: Modules of every DiT block that the relighting LoRA adapts (upstream ``get_loraconfig``: all Linears of
#: ``blocks.*`` except face / modulation), in the original names.
RELIGHTING_LORA_MODULES = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
    "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2",
)
#: Tiny adapter widths (stock config names) and 5 DiT blocks, so that one face block exists (the original applies
#: one after every 5th block).
TINY_ANIMATE = dict(
    num_layers=5, motion_encoder_size=16, motion_encoder_channel_sizes={"4": 32, "8": 16, "16": 8},
    motion_style_dim=32, motion_dim=8, motion_encoder_dim=32, face_encoder_hidden_dim=16, face_encoder_num_heads=4,
)


def _has_adapter(sd) -> bool:
    return any(is_animate_key(k) for k in sd)


def _head_dim(sd) -> int | None:
    face_norm = sd.get("face_adapter.fuser_blocks.0.q_norm.weight")  # face blocks: per-head RMSNorm
    return int(face_norm.shape[0]) if face_norm is not None and face_norm.shape[0] else None


def _config(shape: DitShape) -> dict[str, Any]:
    if not _has_adapter(shape.sd):
        return {}
    return animate_config_from_state_dict(shape.sd, shape.cfg, dim=shape.dim, in_dim=shape.in_dim,
                                          num_layers=shape.num_layers, num_heads=shape.num_heads)


def _detect(shape: DitShape, ext: dict[str, Any]) -> str | None:
    if not _has_adapter(shape.sd):
        return None
    if not shape.has_img:
        raise ConversionError("Wan2.2-Animate adapter (pose_patch_embedding, motion_encoder, face_*) on a DiT "
                              "without the CLIP image branch (img_emb.*): the Animate DiT is an I2V DiT with CLIP")
    return "animate"


def _model_class(info: DitInfo) -> type:
    return WanAnimateExtTransformer3DModel if info.needs_text_len_processor else WanAnimateTransformer3DModel


def make_tiny_relighting_lora(path: str | Path, dit_state_dict: dict, rank: int = 4, seed: int = 0) -> Path:
    """Write a tiny ``relighting_lora.ckpt`` as the Animate release ships it: ``torch.save({"state_dict": sd})`` of
    a PEFT state dict (``blocks.N.<module>.lora_A/B.weight``, original module names) for ``dit_state_dict``."""
    g = torch.Generator().manual_seed(seed)
    blocks = sorted({int(k.split(".")[1]) for k in dit_state_dict if k.startswith("blocks.")})
    sd = {}
    for i in blocks:
        for mod in RELIGHTING_LORA_MODULES:
            out_f, in_f = dit_state_dict[f"blocks.{i}.{mod}.weight"].shape
            sd[f"blocks.{i}.{mod}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
            sd[f"blocks.{i}.{mod}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
    path = Path(path)
    torch.save({"state_dict": sd}, path)
    return path


def run_relighting_lora(args: Any) -> int:
    """``diffusers-wan relighting-lora SRC DST [--dtype]``: the release's relighting LoRA as a Diffusers LoRA folder."""
    target = Path(args.dst) / DIFFUSERS_LORA_FILE
    if target.exists() and not args.overwrite:  # checked before reading SRC
        raise ValueError(f"relighting-lora: {target} exists; pass --overwrite to replace it")
    with naming(args.src):
        lora = convert_relighting_lora(args.src)
    path = save_relighting_lora(lora, args.dst, dtype=DTYPES[args.dtype] if args.dtype else None,
                                overwrite=args.overwrite)
    print(f"converted {len(lora) // 2} LoRA pairs -> {path} (pipe.load_lora_weights({str(args.dst)!r}))")
    return 0


RELIGHTING_LORA_COMMAND = FamilyCommand(
    "relighting-lora",
    "Wan2.2-Animate relighting_lora.ckpt -> Diffusers LoRA folder (load_lora_weights)",
    (
        CommandArgument(("src",), {"help": "relighting_lora.ckpt (PEFT state dict on the original module names)"}),
        CommandArgument(("dst",), {"help": "output folder (pytorch_lora_weights.safetensors)"}),
        CommandArgument(("--dtype",), {"choices": ["bf16", "fp16", "fp32"], "help": "default: as stored"}),
        CommandArgument(("--overwrite",), {"action": "store_true", "help": "replace an existing LoRA file"}),
    ),
    run_relighting_lora,
)


#: Luma weights of the mask video (stock ``video_processor_for_mask`` converts to grayscale).
LUMA = (0.299, 0.587, 0.114)


def _replacement_videos(builder, sample: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Replacement mode: the background video ``[1, 3, F, H, W]`` in [-1, 1] and the person mask ``[1, 1, F, H, W]``
    in [0, 1] (both columns, or neither)."""
    given = [n for n in ("animate_inpaint_video", "animate_mask_video") if n in builder.extra_inputs]
    if not given:
        return None, None
    if len(given) == 1:
        raise ValueError("Wan2.2-Animate replacement mode needs both animate_inpaint_video (background) and "
                         f"animate_mask_video (person mask); got only {given[0]}")
    background = builder.video(sample, "animate_inpaint_video").to(builder.device)
    rgb = builder.video(sample, "animate_mask_video").add(1).div(2)
    weights = torch.tensor(LUMA).view(1, 3, 1, 1, 1)
    return background, (rgb * weights).sum(1, keepdim=True).clamp(0, 1).to(builder.device)


def encode_animate_condition(builder, sample: dict, inputs, num_frames: int, height: int, width: int) -> None:
    """Wan2.2-Animate training inputs with the pipeline's own conditioning (stock ``WanAnimatePipeline``'s, first
    segment): the clean latents are the reference image's latent frame followed by the clip's (as the pipeline's
    latents, whose frame 0 is the character); ``y`` = reference-image latents + the segment condition (zeros, or in
    replacement mode the background with the person mask); pose latents of ``animate_pose_video``; the face crops
    of ``animate_face_video`` at the motion encoder's size; CLIP features of ``input_image``."""
    pipe = builder.pipe
    device = builder.device
    image = builder.image(sample, "input_image").to(device)
    background, mask = _replacement_videos(builder, sample)
    mode = "animate" if background is None else "replace"
    reference = pipe.prepare_reference_image_latents(image, 1, device=device, dtype=torch.float32)
    segment = pipe.prepare_prev_segment_cond_latents(
        None, background_video=background, mask_video=mask, batch_size=1, segment_frame_length=num_frames,
        start_frame=0, height=height, width=width, prev_segment_cond_frames=1, task=mode, device=device,
        dtype=torch.float32,
    )
    inputs.latents = torch.cat([reference[:, 4:].to(inputs.latents), inputs.latents], dim=2)
    inputs.y = torch.cat([reference, segment], dim=2)
    pose = builder.video(sample, "animate_pose_video").to(device)
    face_size = int(pipe.transformer.config.motion_encoder_size)
    inputs.transformer_kwargs = {
        "pose_hidden_states": pipe.prepare_pose_latents(pose, 1, device=device, dtype=torch.float32),
        "face_pixel_values": builder.video_at(sample, "animate_face_video", face_size, face_size).to(device),
    }
    inputs.image_embeds = pipe.encode_image(PIL.Image.fromarray(sample["input_image"].numpy()), device)


ANIMATE_CONDITIONING = Conditioning(
    "Wan2.2-Animate", WanAnimateExtPipeline, required=("input_image", "animate_pose_video", "animate_face_video"),
    optional=("animate_inpaint_video", "animate_mask_video"), encode=encode_animate_condition,
)
#: DiffSynth-Studio's ``animate_adapter`` model is the Animate adapter of our (stock) transformer: pose patch
#: embedding, motion encoder, face encoder and face blocks (``face_adapter``).
ANIMATE_TRAINING_SCOPE = TrainingScope(
    name="animate_adapter", aliases={"animate_adapter": "transformer"}, blocks="face_adapter",
    parameter_prefix=("pose_patch_embedding.", "motion_encoder.", "face_encoder.", "face_adapter."),
    help="animate_adapter (only the Animate adapter: pose embedding, motion / face encoders, face blocks)",
    lora_export_formats=(),  # face_adapter blocks have no name in the original / Kohya / DiffSynth layouts
)


class AnimateFamily(ModelFamily):
    name = "animate"
    title = "Wan2.2-Animate (character animation and replacement)"
    variants = (
        WanVariant(
            "wan2.2-animate-14b", "animate", "Wan-AI/Wan2.2-Animate-14B", dim=5120, num_layers=40, image_encoder=True,
            pipeline="WanAnimatePipeline", flow_shift=5.0, num_inference_steps=20, guidance_scale=1.0, height=720,
            width=1280, num_frames=77, fps=30,
            notes="num_frames = frames per segment (clip_len); relighting_lora.ckpt -> relighting_lora/ (Diffusers "
                  "LoRA)",
        ),
    )
    dit = DitExtension(
        name="animate", arches=("animate",), layouts="Animate 36/16 + CLIP + pose_patch_embedding / motion_encoder / "
        "face_*", adapter_keys=is_animate_key, convert_adapter=convert_animate_state_dict,
        export_adapter=export_animate_state_dict, head_dim=_head_dim, config=_config, detect=_detect,
        model_class=_model_class, priority=10,
        unit_dim_keys=((r"^face_encoder\.padding_tokens$", 4), (r"^motion_encoder\.enc\.net_app\.convs\..+\.bias$", 4)),
    )
    model_classes = (WanAnimateExtTransformer3DModel,)
    pipeline_classes = (WanAnimateExtPipeline,)
    # transformer_wan_animate defines its own block and processor classes (stock registers only transformer_wan's);
    # the block takes hidden_states first and returns them alone (the face adapter runs between blocks)
    hook_blocks = (WanAnimateBlock,)
    hook_processors = (WanAnimateAttnProcessor,)
    card_calls = {
        "WanAnimatePipeline": (
            'image=load_image("character.png"), pose_video=load_video("src_pose.mp4"),\n'
            '             face_video=load_video("src_face.mp4"), prompt="a person dancing", mode="animate",\n'
            "             height={height}, width={width}, segment_frame_length={num_frames}, "
            "num_inference_steps={num_inference_steps},\n             guidance_scale={guidance_scale}"
        ),
    }
    generate_inputs = (
        GenerateInput("--pose-video", "pose_video", "Wan2.2-Animate: driving pose video (src_pose.mp4); --image = the "
                      "character"),
        GenerateInput("--face-video", "face_video", "Wan2.2-Animate: driving face crops (src_face.mp4)"),
        GenerateInput("--background-video", "background_video", "Wan2.2-Animate replacement: background (src_bg.mp4)"),
        GenerateInput("--mask-video", "mask_video", "Wan2.2-Animate replacement: person mask (src_mask.mp4)"),
        GenerateInput("--relighting-lora", "relighting_lora", "Wan2.2-Animate: load the relighting LoRA (default: "
                      "MODEL/relighting_lora)", kind="optional-path"),
    )
    generate_pipeline = {"WanAnimatePipeline": WanAnimateExtPipeline, "WanAnimateExtPipeline": WanAnimateExtPipeline}
    cli_commands = (RELIGHTING_LORA_COMMAND,)
    convert_inputs = (
        ConvertInput("--relighting-lora", "relighting_lora", "Wan2.2-Animate relighting_lora.ckpt (found next to the "
                     "DiT when omitted) -> relighting_lora/", kind="path"),
    )
    tiny_arches = {"animate": TinyArch("animate", 36, 16, clip=True)}
    conditionings = (ANIMATE_CONDITIONING,)
    training_scopes = (ANIMATE_TRAINING_SCOPE,)
    #: DiffSynth-Studio's Animate dataset columns (``input_image``: the character, the clip's first frame); the face
    #: crops keep their own size (resized to the motion encoder's, 512, as DiffSynth-Studio loads them)
    dataset_inputs = {"animate_pose_video": ExtraInput("video"), "animate_face_video": ExtraInput("video_native"),
                      "animate_inpaint_video": ExtraInput("video"), "animate_mask_video": ExtraInput("video")}

    def find_files(self, root: Path, given: dict[str, Any]) -> dict[str, Path | None]:
        lora = given.get("relighting_lora")
        return {"relighting_lora": Path(lora) if lora else find_relighting_lora(root),
                "relighting_lora_given": lora is not None}

    def check_extras(self, files: dict[str, Any], info: DitInfo, transformer_only: bool) -> Any:
        """The converted relighting LoRA (``None`` without one), checked against the DiT's module names."""
        path = files.get("relighting_lora")
        if info.arch != "animate":
            if files.get("relighting_lora_given"):
                raise ConversionError(f"{path}: the relighting LoRA belongs to Wan2.2-Animate, not a {info.arch} DiT")
            return None
        if path is None or transformer_only:
            return None
        try:
            return convert_relighting_lora(path)
        except ConversionError as e:
            raise ConversionError(f"{path}: {e}") from e

    def verify_extras(self, extras: Any, transformer: torch.nn.Module, files: dict[str, Any]) -> None:
        """The LoRA must load into the converted transformer (named keys otherwise)."""
        if extras is None:
            return
        try:
            check_lora_state_dict(transformer, extras)
        except ValueError as e:
            raise ConversionError(f"{files['relighting_lora']}: {e}") from e

    def write_extras(self, folder: Path, extras: Any, torch_dtype: torch.dtype) -> str:
        if extras is None:
            return ""
        save_relighting_lora(extras, folder / "relighting_lora", dtype=torch_dtype)
        return ("\nThe release's relighting LoRA (for `mode=\"replace\"`) is in `relighting_lora/` as a Diffusers "
                "LoRA:\n`pipe.load_lora_weights(\"<this repo>\", subfolder=\"relighting_lora\")`.\n")

    def prepare_generate(self, pipe, model: str, given: dict[str, Any], kw: dict[str, Any]) -> None:
        lora = given.pop("relighting_lora", None)
        if lora:
            pipe.load_relighting_lora(model if lora == "auto" else lora)
        kw.update(given, segment_frame_length=kw.pop("num_frames"))  # frames per segment

    def claims_config(self, config: Any) -> bool:
        return bool(getattr(config, "motion_encoder_size", None))

    def training_conditioning(self, config: Any, expand_timesteps: bool) -> Conditioning | None:
        return ANIMATE_CONDITIONING if self.claims_config(config) else None

    def tiny_dit_model(self, arch: str, experts: int, kwargs: dict[str, Any]):
        kwargs = dict(kwargs, **{k: v for k, v in TINY_ANIMATE.items()})
        model = WanAnimateTransformer3DModel(**kwargs, latent_channels=16)
        # upstream WanAnimateModel config.json fields
        return model, dict(_class_name="WanAnimateModel", motion_encoder_dim=TINY_ANIMATE["motion_encoder_dim"],
                           use_img_emb=True)

    def tiny_release_files(self, folder: Path, dit_folder: Path, arch: str, dit_state_dict: dict, seed: int) -> None:
        make_tiny_relighting_lora(dit_folder / "relighting_lora.ckpt", dit_state_dict, seed=seed)
