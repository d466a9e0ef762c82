"""Command-line arguments of the Wan trainer (``examples/training/train.py``).

The names follow DiffSynth-Studio's ``examples/wanvideo/model_training/train.py`` wherever it has the option, so its
scripts translate one to one (see ``docs/training.md`` for the table); component names may be given in either
layout (``dit`` = ``transformer``, ``dit2`` = ``transformer_2``; a family may declare spellings of its own,
:attr:`~diffusers_wan_ext.families.ModelFamily.training_component_aliases`: MOVA's ``video_dit``).  Options
DiffSynth-Studio does not have (exact resume, LoRA export formats, bad-row handling, learning-rate schedules) use
Diffusers' training-script names.

Example:
    >>> args = parse_args(["--dataset_base_path", "data", "--dataset_metadata_path", "data/metadata.csv",
    ...                    "--model_path", "Wan2.1-T2V-1.3B-diffusers", "--lora_base_model", "dit"])
    >>> args.lora_base_model, args.lora_target_modules[:2], args.task
    ('transformer', ['to_q', 'to_k'], 'sft')
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

from diffusers.optimization import SchedulerType

from ..families import FAMILIES, ModelFamily, training_declarations
from ..lora import LORA_FORMATS, map_lora_target_modules
from .components import model_family
from .dataset import EXTRA_INPUTS
from .distill import DISTILL_COLUMNS
from .model_ids import resolve_model_ids
from .quantized_base import QUANT_METHODS, parse_quant_options, quant_package_missing
from .release_cache import check_cache_dir

__all__ = ["COMPONENT_ALIASES", "DTYPE_NAMES", "TASKS", "ComponentNames", "build_parser", "parse_args",
           "resolve_component"]

#: What the families add: transformer scopes (DiffSynth-Studio's ``vace`` / ``vace2``), trainable components.
SCOPES, EXTRA_COMPONENTS, _ = training_declarations()
#: scope model names (``vace2``) -> (the scope, the transformer component it belongs to)
SCOPE_ALIASES = {alias: (scope, component) for scope in SCOPES for alias, component in scope.aliases.items()}

#: DiffSynth-Studio component names -> ours (pipeline attribute names), for every model; a family's own spellings
#: (MOVA's ``video_dit``) and its own components (``family_only``: MOVA's ``audio_dit``) come from its declaration
#: (:class:`ComponentNames`).  ``dit2`` / ``transformer_2`` are refused by the loader for a model of one expert.
COMPONENT_ALIASES: dict[str, str] = {
    "dit": "transformer",
    "dit2": "transformer_2",
    "transformer": "transformer",
    "transformer_2": "transformer_2",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "image_encoder": "image_encoder",
    **{c.name: c.name for c in EXTRA_COMPONENTS if not c.family_only},
    **{alias: c.name for c in EXTRA_COMPONENTS if not c.family_only for alias in c.aliases},
}
TRAINABLE = ("transformer", "transformer_2", *(c.name for c in EXTRA_COMPONENTS))
#: ``--lora_base_model``: the transformers and the families' components declared for LoRA (MOVA's audio DiT, bridge)
LORA_CAPABLE = ("transformer", "transformer_2", *(c.name for c in EXTRA_COMPONENTS if c.lora))
FP8_CAPABLE = ("transformer", "transformer_2", "vae", "text_encoder", "image_encoder")
#: ``--task``: supervised fine-tuning or direct distillation, each in one stage or DiffSynth-Studio's split training
#: (``:data_process`` caches the inputs, ``:train`` trains from the cache).
TASKS = ("sft", "sft:data_process", "sft:train", "direct_distill", "direct_distill:data_process", "direct_distill:train")
DTYPE_NAMES = ("bf16", "fp16", "fp32")

DEFAULT_TARGETS = "q,k,v,o,ffn.0,ffn.2"
#: the ``--lr_scheduler`` names (Diffusers' ``get_scheduler``)
LR_SCHEDULERS = tuple(s.value for s in SchedulerType)


def family_component_names(family: ModelFamily) -> dict[str, str]:
    """The component names only ``family``'s models take -> ours: its spellings
    (:attr:`~diffusers_wan_ext.families.ModelFamily.training_component_aliases`, MOVA's ``video_dit``) and its
    ``family_only`` components with their aliases (MOVA's ``audio_transformer`` / ``audio_dit``)."""
    own = [c for c in family.training_components if c.family_only]
    return {**family.training_component_aliases, **{c.name: c.name for c in own},
            **{alias: c.name for c in own for alias in c.aliases}}


class ComponentNames:
    """The component names one run accepts -> ours: :data:`COMPONENT_ALIASES` (every model) and the names only the
    trained model's family takes (:func:`family_component_names`), that family told from the model folder (before
    any weights load) only once a name outside the shared table is given."""

    def __init__(self, model_path: str | Path | None = None, transformer_path: str | Path | None = None) -> None:
        self.model_path = model_path
        self.transformer_path = transformer_path
        self.declared: dict[str, str] | None = None

    def family_aliases(self) -> dict[str, str]:
        """The names only the trained model's family takes (``{}`` for a family without any, or no model folder)."""
        if self.declared is None:
            family = None if self.model_path is None else model_family(self.model_path, self.transformer_path)
            self.declared = family_component_names(family) if family is not None else {}
        return self.declared

    def get(self, name: str) -> str | None:
        """Our name of component ``name``, ``None`` when this run's model has no component of that name."""
        name = name.strip()
        return COMPONENT_ALIASES[name] if name in COMPONENT_ALIASES else self.family_aliases().get(name)

    def accepted(self, allowed: Sequence[str]) -> list[str]:
        """The names this run accepts for the components in ``allowed``."""
        return sorted(k for k, v in {**COMPONENT_ALIASES, **self.family_aliases()}.items() if v in allowed)


def other_family_spelling(name: str) -> str:
    """`` ('video_dit2' is MOVA's name of transformer_2)`` or `` ('bridge' is a component of MOVA models only)``
    when ``name`` is a name only some family takes, else ``""`` (for the error of a model whose family does not)."""
    for family in FAMILIES:
        ours = family_component_names(family).get(name)
        if ours is not None:
            title = family.short_title
            return f" ({name!r} is {title}'s name of {ours})" if ours != name else \
                f" ({name!r} is a component of {title} models only)"
    return ""


def resolve_component(name: str, allowed: Sequence[str], option: str, names: ComponentNames | None = None) -> str:
    """Our component name for ``name`` (either layout, or a spelling of the trained model's family given ``names``);
    an error names the option and the accepted values."""
    names = names or ComponentNames()
    ours = names.get(name)
    if ours is None or ours not in allowed:
        hint = other_family_spelling(name.strip()) if ours is None else ""
        raise SystemExit(f"{option}: unknown or unsupported component {name!r}{hint}; accepted: "
                         f"{', '.join(names.accepted(allowed))}")
    return ours


def _components(value: str | None, allowed: Sequence[str], option: str, names: ComponentNames) -> list[str]:
    if not value:
        return []
    out = []
    for part in value.split(","):
        if part.strip():
            c = resolve_component(part, allowed, option, names)
            if c not in out:
                out.append(c)
    return out


def split_module_paths(names: list[str], components: ComponentNames | None = None,
                       ) -> tuple[list[str], list[str], list[str]]:
    """DiffSynth-Studio's module-level ``--trainable_models dit.blocks.0.block.self_attn.q,...``: the entries that
    are a transformer (``dit`` / ``dit2`` / ``transformer`` ...) followed by a module path are split into the
    transformer's name and the path (only these modules train).  Returns the other entries, the transformers'
    names and the paths."""
    others, heads, paths = [], [], []
    for name in names:
        head, _, path = name.partition(".")
        if path and (components or ComponentNames()).get(head) in ("transformer", "transformer_2"):
            heads.append(head)
            paths.append(path)
        else:
            others.append(name)
    return others, heads, paths


def _declared_help(items) -> str:
    return "".join(f", {item.help}" for item in items if item.help)


class OneLineErrorParser(argparse.ArgumentParser):
    """Errors are one line, ``error: PROG: MESSAGE (see 'PROG --help')``, exit status 2 (as the launcher's parser)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The trainer's parser; ``prog`` names the command in usage and errors (``diffusers-wan train``)."""
    p = OneLineErrorParser(  # errors are one line: error: PROG: MESSAGE
        prog=prog,
        description="Train Wan LoRAs or full transformers (PEFT + accelerate); launch with `accelerate launch`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("dataset (DiffSynth-Studio layout)")
    g.add_argument("--dataset_base_path", required=True,
                   help="folder the metadata's file columns are relative to (with --task sft:train: the cache folder)")
    g.add_argument("--dataset_metadata_path", default=None,
                   help="metadata .csv / .json / .jsonl with columns video,prompt (+ extra input columns)")
    g.add_argument("--dataset_repeat", type=int, default=1, help="repeat the dataset this many times per epoch")
    g.add_argument("--dataset_num_workers", "--num_workers", dest="dataset_num_workers", type=int, default=0,
                   help="DataLoader worker processes")
    g.add_argument("--data_file_keys", default=None,
                   help="comma-separated file columns (default: video + the file-valued extra inputs)")
    g.add_argument("--height", type=int, default=None, help="fixed frame height (with --width); none: dynamic")
    g.add_argument("--width", type=int, default=None, help="fixed frame width (with --height); none: dynamic")
    g.add_argument("--max_pixels", type=int, default=1024 * 1024, help="pixel budget of the dynamic resolution")
    g.add_argument("--num_frames", type=int, default=81, help="frames per clip (4n+1), from the start of the video")
    g.add_argument("--min_num_frames", type=int, default=None,
                   help="accept clips this short (cut to 4n+1 frames); default --num_frames (DiffSynth: 1)")
    g.add_argument("--frame_rate", type=float, default=None,
                   help="resample the clips to this frame rate (and cut the audio column to num_frames / frame_rate "
                        "seconds); default: the family's declared rate (MOVA: 24); only for such families")
    g.add_argument("--skip_bad_rows", action="store_true",
                   help="skip and count bad rows (missing file/column, unreadable, too few frames) instead of failing")
    g.add_argument("--prompt_column", default="prompt")
    g.add_argument("--video_column", default="video")

    g = p.add_argument_group("model")
    g.add_argument("--model_path", "--pretrained_model_name_or_path", dest="model_path", default=None,
                   help="a converted Diffusers folder (model_index.json) or an original Wan release folder "
                        "(required unless --model_id_with_origin_paths)")
    g.add_argument("--model_id_with_origin_paths", default=None,
                   help="DiffSynth-Studio's MODEL_ID:FILE_PATTERN,... resolved to local files, never downloaded "
                        "($DIFFSYNTH_MODEL_BASE_PATH/MODEL_ID, ./models/MODEL_ID or the Hugging Face hub cache): "
                        "the release folder becomes --model_path, a DiT of another model id --transformer_path")
    g.add_argument("--transformer_path", default=None,
                   help="replace the trained transformer: a Diffusers transformer folder or original DiT file/folder")
    g.add_argument("--extra_inputs", default=None,
                   help=f"comma-separated conditioning inputs: {', '.join(EXTRA_INPUTS)}; with --task direct_distill "
                        f"also the metadata columns {', '.join(DISTILL_COLUMNS)}")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="dtype of the frozen weights and compute")
    g.add_argument("--vae_dtype", choices=DTYPE_NAMES, default=None, help="VAE dtype (default --dtype)")
    g.add_argument("--trainable_dtype", choices=DTYPE_NAMES, default="fp32",
                   help="dtype of trained parameters (LoRA / fine-tuned weights); DiffSynth-Studio trains in bf16")
    g.add_argument("--fp8_models", default=None,
                   help="frozen components stored in float8_e4m3fn (computed in --dtype): transformer (dit), vae, "
                        "text_encoder, image_encoder")
    g.add_argument("--quant_options", default=None,
                   help="quantize the trained transformer's frozen block Linears for LoRA training (DiffSynth-Studio "
                        "syntax): dit:METHOD[/excluded,modules] with METHOD one of " + ", ".join(QUANT_METHODS)
                        + " (needs bitsandbytes / torchao installed); a .gguf or fp8 --transformer_path is kept "
                          "quantized without it")
    g.add_argument("--max_sequence_length", type=int, default=512, help="umT5 context length")
    g.add_argument("--image_encoder_heads", type=int, default=None,
                   help="CLIP heads when loading an original release whose CLIP width is not a release width")
    g.add_argument("--tokenizer_path", default=None,
                   help="load the umT5 tokenizer from this folder instead of --model_path's")
    g.add_argument("--audio_processor_path", default=None,
                   help="load the Wav2Vec2 audio processor (S2V) from this folder instead of --model_path's")
    g.add_argument("--conversion_cache_dir", default=None,
                   help="keep the converted folder of a release its family converts itself (MOVA, Animate-2, "
                        "Wan-Dancer, LongCat-Video, Video-As-Prompt) in DIR/<release>-<digest>/ and reuse it while "
                        "the release files (path, size, mtime), --dtype, --tokenizer_path, --image_encoder_heads and "
                        "the package version are the same (one rank converts, the others wait); default: converted "
                        "into a temporary folder under TMPDIR on every run and removed once loaded")

    g = p.add_argument_group("training")
    g.add_argument("--task", choices=TASKS, default="sft",
                   help="sft: flow-matching training; direct_distill: train the student's few-step sampling "
                        "(num_inference_steps column, with seed / rand_device / cfg_scale in --extra_inputs) to "
                        "reproduce the clips (a teacher's samples); TASK:data_process: cache VAE latents / text "
                        "embeddings into --output_path; TASK:train: train from such a cache (--dataset_base_path = "
                        "cache folder)")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=None, help="clip gradients (DiffSynth-Studio: none)")
    g.add_argument("--lr_scheduler", default="constant",
                   help="Diffusers scheduler name: constant, constant_with_warmup, linear, cosine, ...")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--num_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--seed", type=int, default=0, help="data order, LoRA init, timesteps and noise")
    g.add_argument("--trainable_models", default=None,
                   help="full fine-tuning of these components: transformer (dit), transformer_2 (dit2), or "
                        "modules of one (DiffSynth-Studio's dit.blocks.0.self_attn.q,...: only those modules)"
                        + _declared_help(EXTRA_COMPONENTS) + _declared_help(SCOPES))
    g.add_argument("--find_unused_parameters", action="store_true", help="DDP find_unused_parameters")
    g.add_argument("--use_gradient_checkpointing", action="store_true")
    g.add_argument("--use_gradient_checkpointing_offload", action="store_true",
                   help="gradient checkpointing with the saved activations offloaded to CPU memory")
    g.add_argument("--enable_model_cpu_offload", action="store_true",
                   help="layer offload training: the trained model's weights stay in CPU memory and each layer "
                        "comes to the GPU while it runs (one process, no DeepSpeed)")
    g.add_argument("--enable_optimizer_cpu_offload", action="store_true",
                   help="with --enable_model_cpu_offload: the trainable parameters, their gradients and the "
                        "optimizer states live in CPU memory and the optimizer steps there")
    g.add_argument("--min_timestep_boundary", type=float, default=None,
                   help="lower bound of the sampled timestep index, fraction of 1000 (0 = most noise); "
                        "default 0, or the expert's share of a two-expert model")
    g.add_argument("--max_timestep_boundary", type=float, default=None,
                   help="upper bound (exclusive) of the sampled timestep index; default 1, or the expert's share")
    g.add_argument("--timestep_shift", type=float, default=5.0, help="shift of the training timestep grid")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_base_model", default=None,
                   help="component that gets the LoRA: transformer (dit), transformer_2 (dit2)" + _declared_help(SCOPES)
                        + _declared_help(c for c in EXTRA_COMPONENTS if c.lora)
                        + " (with a scope, dit/dit2 mean the transformer's main blocks)")
    g.add_argument("--lora_target_modules", default=DEFAULT_TARGETS,
                   help="comma-separated module names in our layout (to_q,...,ffn.net.2); DiffSynth names "
                        "q,k,v,o,ffn.0,ffn.2 are mapped")
    g.add_argument("--lora_rank", type=int, default=32)
    g.add_argument("--lora_alpha", type=float, default=None, help="default: the rank (scale 1, as DiffSynth-Studio)")
    g.add_argument("--lora_checkpoint", default=None,
                   help="initialize the LoRA from this file (any supported LoRA format) and continue training")
    g.add_argument("--preset_lora_path", default=None,
                   help="fuse this LoRA (any supported format, scale 1) into the base weights before training "
                        "(differential LoRA: the trained LoRA / weights are learned on top of it)")
    g.add_argument("--preset_lora_model", default=None,
                   help="component the preset LoRA is fused into: transformer (dit), transformer_2 (dit2); "
                        "default: the trained one")
    g.add_argument("--export_format", "--export-format", dest="export_format", default=None,
                   help="also write the final LoRA in these formats: original (ComfyUI, diffusion_model.), kohya, "
                        "diffsynth; longcat (LongCat-Video models: the original LongCat layout) (comma-separated; "
                        "diffusers is always written)")

    g = p.add_argument_group("output and checkpoints")
    g.add_argument("--output_path", default="./models")
    g.add_argument("--save_steps", type=int, default=None,
                   help="write a checkpoint every N optimizer steps (default: at the end of every epoch)")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-N folder (exact resume: weights, optimizer, scheduler, RNG, data position), "
                        "'latest' (newest in --output_path), or a weights file (weights only, as DiffSynth-Studio)")
    g.add_argument("--save_dtype", choices=DTYPE_NAMES, default="bf16", help="dtype of a fully fine-tuned folder")
    g.add_argument("--remove_prefix_in_ckpt", default=None,
                   help="strip this key prefix in the checkpoints' weights file (checkpoint-N/"
                        "trainable_weights.safetensors), e.g. transformer. (DiffSynth-Studio's pipe.dit. means the "
                        "same); resuming puts it back")
    g.add_argument("--report_to", default="auto",
                   help="tensorboard, none, or auto (TensorBoard when installed)")
    g.add_argument("--enable_tensorboard_log", action="store_true", help="DiffSynth-Studio name for --report_to tensorboard")
    g.add_argument("--logging_dir", default=None, help="default: <output_path>/logs")
    return p


def _checkpoint_prefix(value: str, components: ComponentNames) -> str:
    """``--remove_prefix_in_ckpt``: DiffSynth-Studio's ``pipe.<model>.`` names become ours (``pipe.dit.`` ->
    ``transformer.``: the trained expert is ``transformer`` in the training module); others are kept."""
    if value.startswith("pipe."):
        name = value[len("pipe."):].rstrip(".")
        name = SCOPE_ALIASES[name][1] if name in SCOPE_ALIASES else components.get(name) or name
        value = ("transformer" if name.startswith("transformer") else name) + "."
    return value


def _resolve_model_ids(args: argparse.Namespace, fail) -> None:
    """``--model_id_with_origin_paths`` -> ``--model_path`` (+ ``--transformer_path``); one of the two is needed."""
    if args.model_id_with_origin_paths is None:
        if args.model_path is None:
            fail("--model_path is required (or DiffSynth-Studio's --model_id_with_origin_paths)")
        return
    if args.model_path is not None:
        fail("pass --model_path or --model_id_with_origin_paths, not both")
    try:
        resolved = resolve_model_ids(args.model_id_with_origin_paths)
    except ValueError as e:
        fail(str(e))
    args.model_path = str(resolved.model_path)
    if resolved.transformer_path is not None:
        if args.transformer_path is not None:
            fail(f"--transformer_path and a DiT of another model id in --model_id_with_origin_paths "
                 f"({resolved.transformer_path}): pass one")
        args.transformer_path = str(resolved.transformer_path)


def _split_distill_columns(args: argparse.Namespace, fail) -> None:
    """DiffSynth-Studio passes the direct-distillation columns as extra inputs; they go to ``args.distill_inputs``
    (``None`` when absent)."""
    columns = [n for n in args.extra_inputs if n in DISTILL_COLUMNS]
    args.extra_inputs = [n for n in args.extra_inputs if n not in DISTILL_COLUMNS]
    args.distill_inputs = columns or None
    distill = args.task.startswith("direct_distill")
    if columns and not distill:
        fail(f"--extra_inputs {','.join(columns)}: columns of --task direct_distill (the student's sampling), not of "
             f"--task {args.task}")
    if distill and not args.task.endswith(":train") and "num_inference_steps" not in columns:
        fail(f"--task {args.task} needs the student's step count from the metadata: add num_inference_steps to "
             f"--extra_inputs (DiffSynth-Studio: seed,rand_device,num_inference_steps,cfg_scale)")


def _check_quant_options(args: argparse.Namespace, fail, components: ComponentNames) -> None:
    """``--quant_options``: one entry, for the LoRA-trained expert, with its package installed, no fp8 storage."""
    if args.quant_options is None:
        return
    try:
        options = parse_quant_options(args.quant_options)
    except ValueError as e:
        fail(str(e))
    if len(options) != 1:
        fail(f"--quant_options {args.quant_options!r}: give one entry, for the trained model (dit or dit2)")
    option = options[0]
    model = SCOPE_ALIASES[option.model][1] if option.model in SCOPE_ALIASES else option.model
    if args.lora_base_model is None or components.get(model) != args.lora_base_model:
        fail(f"--quant_options {option.model}:{option.method}: quantized frozen weights are for LoRA training of "
             f"the trained model ({args.expert}, --lora_base_model)")
    if args.expert in args.fp8_models:
        fail(f"--quant_options and --fp8_models {args.expert}: choose one storage for the frozen weights")
    missing = quant_package_missing(option.method)
    if missing:
        fail(f"--quant_options {option.model}:{option.method}: {missing} is not installed (pip install {missing})")


def _check_folders(args: argparse.Namespace, fail) -> None:
    """The component overrides name existing folders (checked before any model loads)."""
    for name in ("tokenizer_path", "audio_processor_path"):
        value = getattr(args, name)
        if value is not None and not Path(value).is_dir():
            fail(f"--{name} {value}: no such folder")
    if args.preset_lora_path is not None and not Path(args.preset_lora_path).exists():
        fail(f"--preset_lora_path {args.preset_lora_path}: no such file or folder")
    if args.conversion_cache_dir is not None:
        try:
            check_cache_dir(args.conversion_cache_dir)
        except ValueError as e:
            fail(str(e))


def _check_family_exports(args: argparse.Namespace, fail) -> None:
    """``--export_format``: only the layouts the trained model's family writes its LoRAs in (told from the folders,
    before any model loads); a scoped LoRA (``--lora_base_model vap``) only those its scope declares."""
    scope = next((s for s in SCOPES if s.name == args.lora_scope), None)
    if scope is not None and scope.lora_export_formats is not None:
        refused = [f for f in args.export_format if f not in scope.lora_export_formats]
        if refused:
            layouts = ", ".join(("diffusers", *scope.lora_export_formats))
            fail(f"--export_format {','.join(refused)}: a LoRA on the {scope.name} scope (--lora_base_model "
                 f"{scope.name}) is written in the {layouts} layout only (its blocks have no name in the other "
                 f"layouts); leave --export_format out")
    family = model_family(args.model_path, args.transformer_path)
    owners = {fmt: f for f in FAMILIES for fmt in f.own_lora_formats}
    foreign = [f for f in args.export_format if f in owners and (family is None or f not in family.own_lora_formats)]
    if foreign:
        title = "a Wan model" if family is None else family.short_title
        fail(f"--export_format {','.join(foreign)}: the layout of {owners[foreign[0]].short_title} LoRAs "
             f"only (this is {title}, whose LoRAs name other modules); leave it out")
    allowed = None if family is None else family.lora_export_formats
    refused = [f for f in args.export_format if allowed is not None and f not in allowed]
    if refused:
        layouts = ", ".join(("diffusers", *allowed))
        fail(f"--export_format {','.join(refused)}: {family.short_title} LoRAs are written in the "
             f"{layouts} layout only (the other layouts name Wan DiT modules); leave --export_format out")


def _check_frame_rate(args: argparse.Namespace, fail) -> None:
    """``--frame_rate`` (DiffSynth-Studio's MOVA option): overrides the rate a family resamples its clips to; a model
    whose family reads clips as they are has none to override."""
    if args.frame_rate is None:
        return
    if not (math.isfinite(args.frame_rate) and args.frame_rate > 0):
        fail(f"--frame_rate must be a finite number > 0, got {args.frame_rate}")
    family = model_family(args.model_path, args.transformer_path)
    if family is None or family.training_frame_rate is None:
        fail(f"--frame_rate {args.frame_rate:g}: this model's clips are read at their own frame rate (only a family "
             f"that resamples its clips, MOVA, takes it); leave --frame_rate out")


def _check_numbers(args: argparse.Namespace, fail) -> None:
    """Rates, betas and counts: NaN, inf, zero or negative values are errors (never defaults, never a NaN loss)."""
    positive = {"learning_rate": args.learning_rate, "adam_epsilon": args.adam_epsilon,
                "lora_alpha": args.lora_alpha, "max_grad_norm": args.max_grad_norm}
    for name, v in positive.items():
        if v is not None and not (math.isfinite(v) and v > 0):
            fail(f"--{name} must be a finite number > 0, got {v}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        fail(f"--weight_decay must be a finite number >= 0, got {args.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(args, name)
        if not 0.0 <= v < 1.0:
            fail(f"--{name} must be in [0, 1), got {v}")
    if not (math.isfinite(args.timestep_shift) and args.timestep_shift > 0):
        fail(f"--timestep_shift must be a finite number > 0, got {args.timestep_shift}")
    for name in ("dataset_repeat", "max_train_steps", "max_pixels", "max_sequence_length", "checkpoints_total_limit"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            fail(f"--{name} must be >= 1, got {v}")
    for name in ("dataset_num_workers", "lr_warmup_steps"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be an integer from 0 to 2**32 - 1, got {args.seed}")
    if args.lr_scheduler not in LR_SCHEDULERS:
        fail(f"--lr_scheduler: unknown {args.lr_scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}")
    for name in ("lora_checkpoint", "transformer_path"):
        path = getattr(args, name, None)
        if path and not Path(path).exists():
            fail(f"--{name} {path}: no such file or folder")
    if args.report_to not in ("auto", "none", "tensorboard"):
        fail(f"--report_to: unknown {args.report_to!r}; choose tensorboard, none or auto")


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parse and check the arguments; component names are normalized to ours, lists are split."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    def fail(msg: str):
        parser.error(msg)

    _resolve_model_ids(args, fail)
    components = ComponentNames(args.model_path, args.transformer_path)

    # a family's scope (DiffSynth-Studio's ``vace`` / ``vace2``): part of a transformer, trained as a model of its own
    names = [n.strip() for n in (args.trainable_models or "").split(",") if n.strip()]
    names, heads, args.trainable_modules = split_module_paths(names, components)
    if heads and (names or len({components.get(h) for h in heads}) > 1):
        fail(f"--trainable_models: module paths ({heads[0]}.{args.trainable_modules[0]}, ...) train modules of one "
             f"transformer; give no other model with them (got {', '.join(sorted({*names, *heads}))})")
    names += heads[:1]
    args.trainable_modules = args.trainable_modules or None
    scopes = {SCOPE_ALIASES[n][0].name for n in names if n in SCOPE_ALIASES}
    if len(scopes) > 1:
        fail(f"--trainable_models: one scope per run, got {sorted(scopes)}")
    args.trainable_scope = next(iter(scopes), None)
    names = [SCOPE_ALIASES[n][1] if n in SCOPE_ALIASES else n for n in names]
    args.trainable_models = _components(",".join(names), TRAINABLE, "--trainable_models", components)
    args.fp8_models = _components(args.fp8_models, FP8_CAPABLE, "--fp8_models", components)
    # a scoped LoRA covers the scope's blocks only, an unscoped one ("dit") the main blocks
    scoped = SCOPE_ALIASES.get(args.lora_base_model)
    args.lora_scope = scoped[0].name if scoped else "dit"
    if scoped:
        args.lora_base_model = scoped[1]
    if args.lora_base_model is not None:
        args.lora_base_model = resolve_component(args.lora_base_model, LORA_CAPABLE, "--lora_base_model",
                                                 components)
    if not args.task.endswith(":data_process") and not args.trainable_models and args.lora_base_model is None:
        fail("nothing to train: pass --lora_base_model transformer (LoRA) or --trainable_models transformer "
             "(full fine-tuning)")
    experts = {c for c in args.trainable_models if c.startswith("transformer")}
    if args.lora_base_model and args.lora_base_model.startswith("transformer"):
        experts.add(args.lora_base_model)
    if len(experts) > 1:
        fail(f"train one expert per run (got {sorted(experts)}); train transformer and transformer_2 separately "
             f"with their timestep boundaries, as DiffSynth-Studio does")
    if args.lora_base_model and args.lora_base_model in args.trainable_models:
        fail(f"{args.lora_base_model} is both fully trained (--trainable_models) and given a LoRA; choose one")
    frozen_fp8 = [c for c in args.fp8_models if c in args.trainable_models]
    if frozen_fp8:
        fail(f"--fp8_models {frozen_fp8}: fp8 storage is for frozen weights only, not for --trainable_models")
    args.expert = next(iter(experts), "transformer")
    if args.enable_optimizer_cpu_offload and not args.enable_model_cpu_offload:
        fail("--enable_optimizer_cpu_offload works with --enable_model_cpu_offload (layer offload training); pass both")
    if args.preset_lora_path is None and args.preset_lora_model is not None:
        fail("--preset_lora_model needs --preset_lora_path (the LoRA file to fuse)")
    if args.preset_lora_path is not None:
        preset = args.preset_lora_model or args.expert
        preset = SCOPE_ALIASES[preset][1] if preset in SCOPE_ALIASES else preset
        args.preset_lora_model = resolve_component(preset, ("transformer", "transformer_2"), "--preset_lora_model",
                                                   components)
        if args.preset_lora_model != args.expert:
            fail(f"--preset_lora_model {args.preset_lora_model}: this run trains {args.expert} (only the trained "
                 f"expert is loaded); fuse the preset into the model being trained")
    _check_folders(args, fail)
    _check_frame_rate(args, fail)
    _check_quant_options(args, fail, components)
    if args.remove_prefix_in_ckpt is not None:
        args.remove_prefix_in_ckpt = _checkpoint_prefix(args.remove_prefix_in_ckpt.strip(), components) or None

    args.extra_inputs = [s.strip() for s in (args.extra_inputs or "").split(",") if s.strip()]
    _split_distill_columns(args, fail)
    unknown = [n for n in args.extra_inputs if n not in EXTRA_INPUTS]
    if unknown:
        fail(f"--extra_inputs: unknown {unknown}; known: {', '.join(EXTRA_INPUTS)}")
    if args.data_file_keys is not None:
        args.data_file_keys = [s.strip() for s in args.data_file_keys.split(",") if s.strip()]

    args.lora_target_names = [n.strip() for n in args.lora_target_modules.split(",") if n.strip()]
    try:
        args.lora_target_modules = map_lora_target_modules(args.lora_target_modules)
    except ValueError as e:
        fail(f"--lora_target_modules: {e}")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.lora_rank)
    if args.lora_rank < 1:
        fail(f"--lora_rank must be >= 1, got {args.lora_rank}")

    args.export_format = [s.strip() for s in (args.export_format or "").split(",") if s.strip() and
                          s.strip() != "diffusers"]
    if args.export_format:
        known = (*LORA_FORMATS, *sorted({fmt for f in FAMILIES for fmt in f.own_lora_formats}))
        bad = [f for f in args.export_format if f not in known]
        if bad:
            fail(f"--export_format: unknown {bad}; choose from {', '.join(known)}")
        if args.lora_base_model is None:
            fail("--export_format applies to LoRA training (--lora_base_model)")
        if not args.lora_base_model.startswith("transformer"):
            fail(f"--export_format: a LoRA on {args.lora_base_model} is written in the Diffusers layout only (the "
                 f"other layouts hold one DiT); leave --export_format out")
        _check_family_exports(args, fail)

    if (args.height is None) != (args.width is None):
        fail("pass both --height and --width (fixed size) or neither (dynamic size from --max_pixels)")
    if args.num_frames < 1 or (args.num_frames - 1) % 4:
        lo = max(1, (args.num_frames - 1) // 4 * 4 + 1)
        fail(f"--num_frames {args.num_frames} is not 4n+1 (the Wan VAE encodes 1 + 4n frames); pass {lo} or {lo + 4}")
    if not args.task.endswith(":train") and args.dataset_metadata_path is None:
        fail(f"--dataset_metadata_path is required (omit it only with --task {args.task.split(':')[0]}:train, which "
             f"reads the cache in --dataset_base_path)")
    if args.task.endswith(":train") and args.dataset_metadata_path is not None:
        stage = args.task.split(":")[0]
        fail(f"--task {args.task} reads the cache written by --task {stage}:data_process from --dataset_base_path; "
             f"leave --dataset_metadata_path out")
    for name in ("min_timestep_boundary", "max_timestep_boundary"):
        v = getattr(args, name)
        if v is not None and not 0.0 <= v <= 1.0:
            fail(f"--{name} must be in [0, 1] (fraction of the 1000 training timesteps), got {v}")
    if args.gradient_accumulation_steps < 1 or args.num_epochs < 1:
        fail("--gradient_accumulation_steps and --num_epochs must be >= 1")
    if args.save_steps is not None and args.save_steps < 1:
        fail("--save_steps must be >= 1")
    _check_numbers(args, fail)
    if args.vae_dtype is None:
        args.vae_dtype = args.dtype
    if args.enable_tensorboard_log:
        args.report_to = "tensorboard"
    return args
