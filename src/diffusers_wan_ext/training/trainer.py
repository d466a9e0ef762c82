"""The Wan trainer: PEFT LoRA or full fine-tuning with accelerate, DiffSynth-Studio's objective, exact resume.

Run it with ``accelerate launch examples/training/train.py ARGS`` (arguments: :mod:`.args`, ``docs/training.md``).

* ``--task sft`` (default): load the pipeline, encode every clip with the frozen VAE / umT5 / CLIP, train.
* ``--task sft:data_process``: encode every clip once and write ``<output_path>/<rank>/<row>.safetensors``.
* ``--task sft:train``: train from such a cache (``--dataset_base_path`` = the cache folder); the encoders are not
  loaded.  With the same seed this gives the same losses as ``sft``.
* ``--task direct_distill`` (``:data_process`` / ``:train`` as above): DiffSynth-Studio's direct distillation
  (:mod:`.distill`): the student samples each clip's seeded noise in ``num_inference_steps`` steps and learns to
  land on the clip (a teacher's sample); the cache stores each row's sampling settings.

``--enable_model_cpu_offload`` (:mod:`.offload`) keeps the trained model's and the encoders' weights in CPU memory
between their layers' uses; a quantized base (:mod:`.quantized_base`) stays quantized under the LoRA.

Per micro-step the timestep and noise come from a generator seeded by ``(seed, micro_step, rank)`` and the data
order from ``(seed, epoch)``, so a run resumed from ``checkpoint-N`` (weights, optimizer, LR schedule, RNG states,
data position) continues with exactly the losses of the uninterrupted run.

Outputs (``--output_path``):

* LoRA: ``pytorch_lora_weights.safetensors`` (Diffusers PEFT keys with the ``transformer.`` prefix, the LoRA scale
  folded into the factors) -- ``WanPipeline.load_lora_weights(output_path)``; for a Wan2.2 low-noise expert its keys
  are ``transformer_2.`` (our pipelines load it into ``transformer_2``) and
  ``pytorch_lora_weights_transformer_2.safetensors`` holds the same under ``transformer.`` for stock
  ``load_lora_weights(output_path, weight_name=..., load_into_transformer_2=True)``; ``--export_format`` adds the
  original/ComfyUI, kohya and DiffSynth layouts (:func:`diffusers_wan_ext.lora.export_lora` names), or the trained
  family's own layout (``longcat``: ``lora_longcat.safetensors``, ``ModelFamily.own_lora_formats``).
* full fine-tuning: a Diffusers model folder ``transformer/`` (or ``transformer_2/``) in ``--save_dtype``.
* ``checkpoint-N/``: resumable training state, JSON and safetensors only (:mod:`.checkpoints`; its
  ``pytorch_lora_weights.safetensors`` loads like the final one).  It is written into a temporary folder and renamed
  into place when complete; ``--resume_from_checkpoint latest`` takes the newest complete one, and resuming refuses
  pickle files and checkpoints of a run with other arguments.
* ``logs/losses.jsonl``: one line per optimizer step (loss averaged over accumulation and ranks, learning rate).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..conversion.dit import cast_state_dict
from ..conversion.quantized_dit import load_quantized_dit
from ..hooks.vram import fp8_skip_patterns
from ..lora import convert_lora_state_dict, export_lora, load_lora_file, save_lora_file
from ..utils.atomic import atomic_output_dir
from ..utils.io import ConversionError, naming

from .args import parse_args
from .checkpoints import (
    CHECKPOINT_FORMAT,
    OPTIMIZER_FILE,
    STATE_FILE,
    TRAINABLE_WEIGHTS,
    apply_umask,
    check_checkpoint,
    find_checkpoints,
    load_optimizer_state,
    load_rng_state,
    replace_folder,
    rng_state_file,
    run_fingerprint,
    save_optimizer_state,
    save_rng_state,
)
from .components import DTYPES, WanTrainingComponents, family_of_pipeline, load_training_components, model_family
from .dataset import ResumableSampler, VideoDataset, collate_single
from .distill import DistillRows, DistillSettings, direct_distill_loss
from .flow_match import FlowMatchTrainingSchedule, expert_timestep_boundaries
from .inputs import ModelInputs, WanInputBuilder
from .offload import LayerOffloadManager
from .quantized_base import is_quantized_single_file, parse_quant_options, quantize_frozen_linears
from .targets import lora_target_modules, trainable_module_parameters
from .modules import (
    ADAPTER,
    EXTRA_COMPONENTS,
    SCOPES,
    WanTrainingModule,
    add_lora,
    enable_gradient_checkpointing,
    fuse_lora_weights,
    load_lora_into,
    lora_metadata,
    store_frozen_weights_in_fp8,
    training_loss,
)

__all__ = ["CACHE_FORMAT", "CachedDataset", "TrainingProgress", "main", "run_training"]

logger = logging.getLogger("diffusers_wan_ext.training")

CACHE_FORMAT = "diffusers_wan_ext.training-cache.v1"


# ------------------------------------------------------------------------------------------------------ utilities


class TrainingProgress:
    """Where training stands; saved in every checkpoint's ``training_state.json``."""

    def __init__(self) -> None:
        self.step = 0  # optimizer steps
        self.micro_step = 0  # micro-batches (this rank)
        self.epoch = 0
        self.position = 0  # micro-batches of this epoch already consumed (this rank)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "micro_step": self.micro_step, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """Seed of the timestep / noise generator of one micro-step (independent of resumes and worker timing)."""
    return (seed * 1_000_003 + micro_step) * 1_009 + rank & 0x7FFF_FFFF_FFFF_FFFF


class CachedDataset(torch.utils.data.Dataset):
    """The entries written by ``--task sft:data_process`` (``<cache>/<rank>/<row>.safetensors``), sorted by row."""

    def __init__(self, folder: str | os.PathLike, repeat: int = 1) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.rglob("*.safetensors"))
        entries = []
        for f in files:
            with safe_open(str(f), "pt") as h:
                meta = h.metadata() or {}
            if meta.get("format") != CACHE_FORMAT:
                continue
            entries.append((int(meta["row"]), f))
        if not entries:
            raise FileNotFoundError(f"{self.folder}: no training cache entries (*.safetensors written by "
                                    f"--task sft:data_process); pass the data_process --output_path")
        self.files = [f for _, f in sorted(entries)]
        self.repeat = int(repeat)

    def __len__(self) -> int:
        return len(self.files) * self.repeat

    def __getitem__(self, index: int) -> dict[str, Any]:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.files[index % len(self.files)]
        with safe_open(str(path), "pt") as h:
            meta = h.metadata()
        sample = {"cached": load_file(str(path)), "prompt": meta.get("prompt", ""), "row": int(meta["row"]),
                  "skipped": []}
        if "distill" in meta:
            sample["distill"] = meta["distill"]
        return sample

    def check_distill(self) -> None:
        """``--task direct_distill:train``: every entry must hold its row's sampling settings."""
        from safetensors import safe_open

        for path in self.files:
            with safe_open(str(path), "pt") as h:
                if "distill" not in (h.metadata() or {}):
                    raise ValueError(f"{path}: a cache entry without direct-distillation settings; write the cache "
                                     f"with --task direct_distill:data_process")


def _distill_rows(args, dataset) -> DistillRows | None:
    """The rows' direct-distillation settings (read before any model loads), or ``None`` for the other tasks; a cache
    for ``direct_distill:train`` must hold them."""
    if not args.task.startswith("direct_distill"):
        return None
    if isinstance(dataset, CachedDataset):
        dataset.check_distill()
        return None
    return DistillRows(args.dataset_metadata_path, args.distill_inputs or [], skip_bad_rows=args.skip_bad_rows)


def _report_to(args) -> str | None:
    if args.report_to == "none":
        return None
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():
        return "tensorboard"
    if args.report_to == "tensorboard":
        raise SystemExit("--report_to tensorboard: TensorBoard is not installed (pip install tensorboard)")
    return None


def _make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    logging_dir = Path(args.logging_dir or Path(args.output_path) / "logs")
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=_report_to(args),
        project_config=ProjectConfiguration(project_dir=str(args.output_path), logging_dir=str(logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)],
    )


def _dataset(args, components: WanTrainingComponents | None, repeat: int):
    """The clips (``--task *:train``: the cache); the trained model's family may declare its own columns and a
    frame rate the clips are resampled to (MOVA)."""
    if args.task.endswith(":train"):
        return CachedDataset(args.dataset_base_path, repeat=repeat)
    family = (family_of_pipeline(components.pipeline_class) if components is not None
              else model_family(args.model_path, args.transformer_path))
    return VideoDataset(
        args.dataset_base_path, args.dataset_metadata_path, num_frames=args.num_frames, height=args.height,
        width=args.width, max_pixels=args.max_pixels,
        size_multiple=components.spatial_multiple if components is not None else 16,
        min_num_frames=args.min_num_frames, extra_inputs=args.extra_inputs, data_file_keys=args.data_file_keys,
        repeat=repeat, skip_bad_rows=args.skip_bad_rows, prompt_column=args.prompt_column,
        video_column=args.video_column, column_specs=family.dataset_inputs if family is not None else None,
        frame_rate=args.frame_rate or (family.training_frame_rate if family is not None else None),  # --frame_rate
    )


def _loader(dataset, sampler, num_workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_single, persistent_workers=False)


def _move_encoders(components: WanTrainingComponents, device: torch.device, fp8: list[str],
                   offload: bool = False) -> list[LayerOffloadManager]:
    """Frozen encoders to ``device``; those in ``fp8`` with their weights stored in float8 (Diffusers' layerwise
    casting, with the skip patterns the VRAM manager uses: norms, embeddings, ``_keep_in_fp32_modules``).
    ``offload`` (``--enable_model_cpu_offload``): their weights stay in CPU memory and come to ``device`` layer by
    layer; returns those hooks."""
    from diffusers.hooks import apply_layerwise_casting

    managers = []
    for name in ("vae", "text_encoder", "image_encoder"):
        module = getattr(components, name)
        if module is None:
            continue
        module.requires_grad_(False).eval()
        if name in fp8:
            apply_layerwise_casting(module, storage_dtype=torch.float8_e4m3fn, compute_dtype=module.dtype,
                                    skip_modules_pattern=fp8_skip_patterns(module))
        if offload:
            managers.append(LayerOffloadManager(module, device))
        else:
            module.to(device)
    return managers


def _timestep_schedule(args, components: WanTrainingComponents, accelerator) -> FlowMatchTrainingSchedule:
    lo, hi = args.min_timestep_boundary, args.max_timestep_boundary
    if components.has_two_experts and lo is None and hi is None:
        lo, hi = expert_timestep_boundaries(components.boundary_ratio, components.expert, args.timestep_shift)
        accelerator.print(f"training {components.expert} of a two-expert model (boundary_ratio "
                          f"{components.boundary_ratio}): timestep boundaries [{lo}, {hi})")
    return FlowMatchTrainingSchedule(args.timestep_shift, 1000, 0.0 if lo is None else lo, 1.0 if hi is None else hi)


def _load_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LoRA file (or folder) in any layout :mod:`diffusers_wan_ext.lora` reads, as Diffusers keys meaning
    ``W + B @ A`` (alpha folded in)."""
    return convert_lora_state_dict(load_lora_file(path), "diffusers")


def _component_keys(lora: dict[str, torch.Tensor], component: str, path) -> dict[str, torch.Tensor]:
    """The keys of a LoRA file for the pipeline component ``component`` (``audio_transformer.``), prefix removed."""
    picked = {k[len(component) + 1:]: v for k, v in lora.items() if k.startswith(f"{component}.")}
    if not picked:
        found = sorted({k.split(".", 1)[0] for k in lora})
        raise ValueError(f"{path}: no LoRA weights for {component} (it has {found})")
    return picked


def _preset_lora(path: str | os.PathLike, component: str) -> dict[str, torch.Tensor]:
    """``--preset_lora_path``: the deltas for ``component`` without its prefix (a single-model file's
    ``transformer.`` keys stand for whichever expert is named)."""
    sd = _load_lora_file(path)
    prefix = f"{component}." if any(k.startswith(f"{component}.") for k in sd) else "transformer."
    picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not picked:
        found = sorted({k.split(".", 1)[0] for k in sd})
        raise ValueError(f"--preset_lora_path {path}: no LoRA weights for {component} (it has {found})")
    return picked


# ---------------------------------------------------------------------------------------------------- the trainer


class WanTrainer:
    """Holds the state of one run; :meth:`train` runs it (see :func:`run_training`)."""

    def __init__(self, args) -> None:
        from accelerate.utils import set_seed

        self.args = args
        self.accelerator = _make_accelerator(args)
        self.dtype = DTYPES[args.dtype]
        self.trainable_dtype = DTYPES[args.trainable_dtype]
        set_seed(args.seed)
        self.is_lora = args.lora_base_model is not None
        #: the training module's submodule that gets the LoRA: ``transformer`` (the trained expert) or a family's
        #: component (MOVA's ``audio_transformer`` / ``bridge``); ``None`` for full fine-tuning
        self.lora_module = (None if not self.is_lora else "transformer" if args.lora_base_model.startswith(
            "transformer") else args.lora_base_model)
        acc = self.accelerator
        # the dataset (metadata, columns, files) and a checkpoint to resume from are checked before any model loads
        checked = _dataset(args, None, repeat=1)
        self.distill = _distill_rows(args, checked)
        self.resume_from, self.resume_record = self._find_resume()
        self.components = load_training_components(
            args.model_path, expert=args.expert, dtype=self.dtype, vae_dtype=DTYPES[args.vae_dtype],
            load_encoders=not args.task.endswith(":train"), transformer_path=self._quantized_base(),
            image_encoder_heads=args.image_encoder_heads, tokenizer_path=args.tokenizer_path,
            audio_processor_path=args.audio_processor_path, progress=acc.is_main_process,
            conversion_cache_dir=args.conversion_cache_dir,
        )
        self.dataset = _dataset(args, self.components, args.dataset_repeat)
        self.builder = None
        self.encoder_offload: list[LayerOffloadManager] = []
        if not args.task.endswith(":train"):
            self.encoder_offload = _move_encoders(self.components, acc.device, args.fp8_models,
                                                  offload=args.enable_model_cpu_offload)
            self.builder = WanInputBuilder(self.components, args.extra_inputs, acc.device, args.max_sequence_length)
        self.schedule = _timestep_schedule(args, self.components, acc)
        self.module, self.params = self._trainable_module()
        self.offload: LayerOffloadManager | None = None
        self.progress = TrainingProgress()

    # ---------------------------------------------------------------------------------------------- setup
    def _quantized_base(self):
        """``--transformer_path``; for LoRA training a quantized single file (GGUF, fp8) loaded kept quantized."""
        args = self.args
        if not (self.is_lora and is_quantized_single_file(args.transformer_path)):
            return args.transformer_path
        what = f"--transformer_path {args.transformer_path} (a quantized base)"
        if args.expert in args.fp8_models or args.quant_options:
            raise ValueError(f"{what}: its weights are quantized already; leave --fp8_models {args.expert} / "
                             f"--quant_options out")
        if args.preset_lora_path:
            raise ValueError(f"{what}: a preset LoRA cannot be fused into quantized weights; fuse it into the "
                             f"unquantized DiT first, or train on that")
        with naming(args.transformer_path):
            transformer = load_quantized_dit(args.transformer_path, torch_dtype=self.dtype)
        self.accelerator.print(f"LoRA training on the quantized base {args.transformer_path} (kept quantized)")
        return transformer

    def _trainable_module(self) -> tuple[WanTrainingModule, list[torch.nn.Parameter]]:
        args, c = self.args, self.components
        transformer = c.transformer
        transformer.requires_grad_(False)
        if args.preset_lora_path:  # differential LoRA: the preset becomes part of the base weights
            n = fuse_lora_weights(transformer, _preset_lora(args.preset_lora_path, c.expert),
                                  f"--preset_lora_path {args.preset_lora_path}")
            self.accelerator.print(f"fused the preset LoRA {args.preset_lora_path} into {n} modules of {c.expert}")
        if args.quant_options:  # DiffSynth-Studio's --quant_options: bitsandbytes / torchao frozen weights
            option = parse_quant_options(args.quant_options)[0]
            n = quantize_frozen_linears(transformer, option, self.dtype, self.accelerator.device)
            self.accelerator.print(f"quantized {n} frozen linear layers of {c.expert} ({option.method})")
        params: list[torch.nn.Parameter] = []
        if self.lora_module == "transformer":
            torch.manual_seed(args.seed)  # LoRA A init
            params += add_lora(transformer, args.lora_rank, args.lora_alpha, lora_target_modules(transformer, args),
                               dtype=self.trainable_dtype, scope=args.lora_scope)
            if args.lora_checkpoint:
                with naming(args.lora_checkpoint):
                    lora = _load_lora_file(args.lora_checkpoint)
                load_lora_into(transformer, lora, f"--lora_checkpoint {args.lora_checkpoint}")
        elif c.expert in args.trainable_models:
            scope = next((s for s in SCOPES if s.name == args.trainable_scope), None)
            modules = getattr(args, "trainable_modules", None)
            chosen = set(trainable_module_parameters(transformer, modules)) if modules else None
            for name, p in transformer.named_parameters():
                if (scope is None or name.startswith(scope.parameter_prefix)) and (chosen is None or name in chosen):
                    p.data = p.data.to(self.trainable_dtype)
                    p.requires_grad_(True)
                    params.append(p)
            if not params:
                raise ValueError(f"--trainable_models {scope.name}: this transformer has no {scope.blocks}")
        extras = {}
        for spec in EXTRA_COMPONENTS:  # the families' components (speed control's motion_controller)
            module = c.extra_components.get(spec.name)
            trainable, lora = spec.name in args.trainable_models, spec.name == self.lora_module
            if module is not None and (spec.input_name in args.extra_inputs or trainable or lora):
                module.to(self.trainable_dtype if trainable else self.dtype).requires_grad_(trainable)
                if trainable:
                    params += list(module.parameters())
                if lora:
                    params += self._component_lora(module)
                extras[spec.name] = module
            elif trainable or lora:
                option = "--trainable_models" if trainable else "--lora_base_model"
                raise ValueError(f"{option} {spec.name}: the model folder has no {spec.name}")
        if "transformer" in args.fp8_models or "transformer_2" in args.fp8_models:
            n = store_frozen_weights_in_fp8(transformer, self.dtype)
            self.accelerator.print(f"stored {n} frozen linear weights of {c.expert} in float8_e4m3fn")
        if args.use_gradient_checkpointing or args.use_gradient_checkpointing_offload:
            enable_gradient_checkpointing(transformer, offload=args.use_gradient_checkpointing_offload)
        transformer.train()
        if not params:
            raise ValueError("no trainable parameters")
        return WanTrainingModule(transformer, extras), params

    def _component_lora(self, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        """A LoRA on a family's component (``--lora_base_model audio_dit``: MOVA's audio DiT), ``--lora_checkpoint``
        loaded into it; the transformer stays frozen."""
        args = self.args
        torch.manual_seed(args.seed)  # LoRA A init
        params = add_lora(module, args.lora_rank, args.lora_alpha, args.lora_target_modules,
                          dtype=self.trainable_dtype)
        if args.lora_checkpoint:
            with naming(args.lora_checkpoint):
                lora = _load_lora_file(args.lora_checkpoint)
            load_lora_into(module, _component_keys(lora, self.lora_module, args.lora_checkpoint),
                           f"--lora_checkpoint {args.lora_checkpoint}")
        return params

    def _optimizer(self, total_steps: int):
        from diffusers.optimization import get_scheduler

        args, acc = self.args, self.accelerator
        optimizer_cls = torch.optim.AdamW
        ds = acc.state.deepspeed_plugin
        if ds is not None and ds.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {}).get(
                "device") == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload needs DeepSpeed's CPU Adam

            optimizer_cls = DeepSpeedCPUAdam
        optimizer = optimizer_cls(self.params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, eps=args.adam_epsilon)
        scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                  num_warmup_steps=args.lr_warmup_steps * acc.num_processes,
                                  num_training_steps=max(total_steps, 1) * acc.num_processes)
        return optimizer, scheduler

    # ------------------------------------------------------------------------------------------- saving
    def _unwrapped(self) -> WanTrainingModule:
        return self.accelerator.unwrap_model(self.module)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors by module name (collective under DeepSpeed ZeRO-3)."""
        sd = self.accelerator.get_state_dict(self.module)
        names = {n for n, p in self._unwrapped().named_parameters() if p.requires_grad}
        return {k: v for k, v in sd.items() if k in names} if sd is not None else {}

    def _save_lora(self, folder: Path, state: dict[str, torch.Tensor], exports: Sequence[str] = ()) -> None:
        """The LoRA as :func:`diffusers_wan_ext.lora.export_lora` writes it (PEFT scale folded into the factors):
        ``pytorch_lora_weights.safetensors`` with ``<expert>.`` keys (for ``transformer_2`` also
        ``pytorch_lora_weights_transformer_2.safetensors`` under ``transformer.``, for stock
        ``load_lora_weights(..., load_into_transformer_2=True)``; a family component's LoRA under its name,
        ``audio_transformer.``), plus the ``exports`` layouts."""
        name = self.lora_module
        comp = self.components.expert if name == "transformer" else name
        sd = {f"{comp}.{k[len(name) + 1:].replace(f'.{ADAPTER}.', '.')}": v.detach().cpu().contiguous()
              for k, v in state.items() if k.startswith(f"{name}.") and "lora_" in k}
        if not sd:
            return
        meta = {f"{comp}.{k}": v for k, v in lora_metadata(getattr(self._unwrapped(), name)).items()}
        family = (family_of_pipeline(self.components.pipeline_class)
                  or model_family(self.args.model_path, self.args.transformer_path))  # as --export_format was checked
        own = family.own_lora_formats if family is not None else {}
        written = export_lora(sd, folder, formats=("diffusers", *(f for f in exports if f not in own)),
                              adapter_config=meta)
        for fmt in (f for f in exports if f in own):  # from the Diffusers file: the same folded factors
            tensors = family.export_own_lora(fmt, load_lora_file(written["diffusers"]))
            written[fmt] = save_lora_file(tensors, folder / own[fmt])
        for path in written.values():  # written through temporary files: the umask's mode, not 0600
            apply_umask(path)

    def _save_full(self, folder: Path, name: str, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """A Diffusers model folder from ``state`` (``<name>.``-prefixed keys) in ``dtype`` (Diffusers' fp32 modules
        stay float32, as the converter stores them)."""
        from accelerate import init_empty_weights

        model = getattr(self._unwrapped(), name)
        prefix = name + "."
        sd = {k[len(prefix):]: v.detach().to("cpu") for k, v in state.items() if k.startswith(prefix)}
        sd = {**{k: v.detach().to("cpu") for k, v in model.state_dict().items()}, **sd}  # a scope: the frozen rest
        sd = cast_state_dict(sd, dtype, getattr(model, "_keep_in_fp32_modules", None))  # as the converter stores it
        with init_empty_weights():
            fresh = type(model).from_config(model.config)
        fresh.load_state_dict(sd, strict=True, assign=True)
        with atomic_output_dir(folder, overwrite=True) as tmp:
            fresh.save_pretrained(tmp)
        apply_umask(folder)  # a temporary folder is created 0700

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>/`` (JSON + safetensors) through ``.checkpoint-<step>.partial/``, renamed into
        place when every process has written its part."""
        acc, args = self.accelerator, self.args
        root = Path(args.output_path)
        path = root / f"checkpoint-{self.progress.step}"
        tmp = root / f".{path.name}.partial"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        state = self._trainable_state()
        save_rng_state(tmp / rng_state_file(acc.process_index))
        acc.wait_for_everyone()
        if acc.is_main_process:
            from safetensors.torch import save_file

            prefix = args.remove_prefix_in_ckpt
            save_file({(k[len(prefix):] if prefix and k.startswith(prefix) else k): v.detach().cpu().contiguous()
                       for k, v in state.items()}, str(tmp / TRAINABLE_WEIGHTS))
            if self.is_lora:
                self._save_lora(tmp, state)
            deepspeed = acc.state.deepspeed_plugin is not None
            record = {
                "format": CHECKPOINT_FORMAT, "progress": self.progress.state_dict(), "world_size": acc.num_processes,
                "deepspeed": deepspeed, "fingerprint": run_fingerprint(args), "removed_prefix": prefix,
                "optimizer": None if deepspeed else save_optimizer_state(self.optimizer.state_dict(),
                                                                         tmp / OPTIMIZER_FILE),
                "scheduler": json.loads(json.dumps(self.scheduler.state_dict())),
                "scaler": None if acc.scaler is None else acc.scaler.state_dict(),
                "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list,
                                                                                type(None)))},
            }
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=2))  # last: marks the folder complete
            apply_umask(tmp)
            replace_folder(tmp, path)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return path

    def _prune_checkpoints(self) -> None:
        limit = self.args.checkpoints_total_limit
        if not limit:
            return
        for old in find_checkpoints(self.args.output_path)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def save_final(self) -> Path:
        acc, args, c = self.accelerator, self.args, self.components
        state = self._trainable_state()
        out = Path(args.output_path)
        if acc.is_main_process:
            if self.is_lora:
                self._save_lora(out, state, args.export_format)
            elif c.expert in args.trainable_models:
                self._save_full(Path(args.output_path) / c.expert, "transformer", state, DTYPES[args.save_dtype])
            for spec in EXTRA_COMPONENTS:
                if spec.name in args.trainable_models:
                    self._save_full(Path(args.output_path) / spec.name, spec.name, state, DTYPES[args.save_dtype])
        acc.wait_for_everyone()
        return out

    def _find_resume(self) -> tuple[Path | None, dict[str, Any] | None]:
        """The ``--resume_from_checkpoint`` target, checked (:func:`~.checkpoints.check_checkpoint`): a checkpoint
        folder and its state record, a weights file and ``None``, or nothing."""
        acc, args = self.accelerator, self.args
        given = args.resume_from_checkpoint
        if not given:
            return None, None
        if given == "latest":
            found = find_checkpoints(args.output_path)
            if not found:
                acc.print(f"--resume_from_checkpoint latest: no complete checkpoint in {args.output_path}; "
                          f"starting fresh")
                return None, None
            path = found[-1]
        else:
            path = Path(given)
        if path.is_file():  # DiffSynth-Studio semantics: a weights file, nothing else
            if not self.is_lora and path.suffix != ".safetensors":
                raise ValueError(f"--resume_from_checkpoint {path}: weights of a full fine-tuning resume from a "
                                 f".safetensors file (e.g. a checkpoint's {TRAINABLE_WEIGHTS})")
            return path, None
        if not path.is_dir():
            raise ValueError(f"--resume_from_checkpoint {path}: no such checkpoint folder or weights file")
        return path, check_checkpoint(path, args, acc.num_processes, acc.state.deepspeed_plugin is not None)

    def resume(self) -> None:
        """Load what :meth:`_find_resume` found (after ``accelerator.prepare``)."""
        acc, path, record = self.accelerator, self.resume_from, self.resume_record
        if path is None:
            return
        if record is None:  # a weights file
            if self.lora_module == "transformer":
                load_lora_into(self._unwrapped().transformer, _load_lora_file(path), str(path))
            elif self.is_lora:
                load_lora_into(getattr(self._unwrapped(), self.lora_module),
                               _component_keys(_load_lora_file(path), self.lora_module, path), str(path))
            else:
                self._load_trainable_file(path, self.args.remove_prefix_in_ckpt)
            acc.print(f"loaded weights from {path} (weights only; optimizer and data position start fresh)")
            return
        self._load_trainable_file(path / TRAINABLE_WEIGHTS, record.get("removed_prefix"))
        self.optimizer.load_state_dict(load_optimizer_state(path / OPTIMIZER_FILE, record["optimizer"]))
        self.scheduler.load_state_dict(record["scheduler"])
        if acc.scaler is not None and record.get("scaler"):
            acc.scaler.load_state_dict(record["scaler"])
        load_rng_state(path / rng_state_file(acc.process_index))
        self.progress.load_state_dict(record["progress"])
        acc.step = self.progress.micro_step
        acc.print(f"resumed from {path} at step {self.progress.step} (epoch {self.progress.epoch}, "
                  f"position {self.progress.position})")

    def _load_trainable_file(self, path: Path, removed_prefix: str | None = None) -> None:
        """Trainable weights from ``path``; keys whose ``removed_prefix`` (``--remove_prefix_in_ckpt``) was stripped
        get it back."""
        from safetensors.torch import load_file

        sd = load_file(str(path))
        module = self._unwrapped()
        params = dict(module.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        submodules = {n.split(".", 1)[0] for n in params}  # transformer + the families' components
        if removed_prefix:
            sd = {k if k.split(".", 1)[0] in submodules else removed_prefix + k: v for k, v in sd.items()}
        if not any(k.split(".", 1)[0] in submodules for k in sd):
            sd = {"transformer." + k: v for k, v in sd.items()}  # a bare transformer state dict
        unexpected = sorted(set(sd) - set(params))
        missing = sorted(trainable - set(sd))
        if unexpected or missing:
            raise ValueError(f"{path}: does not match the trained parameters (missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]})")
        with torch.no_grad():
            for k, v in sd.items():
                params[k].copy_(v)

    # ------------------------------------------------------------------------------------------- training
    def _inputs(self, sample: dict[str, Any]) -> ModelInputs:
        device = self.accelerator.device
        if "cached" in sample:
            return ModelInputs.from_tensors(sample["cached"], sample["prompt"]).to(device)
        return self.builder(sample).to(device)

    def _loss(self, sample: dict[str, Any], inputs: ModelInputs, generator: torch.Generator, patch) -> torch.Tensor:
        """The task's loss: flow matching (``sft``) or direct distillation with the row's sampling settings."""
        if not self.args.task.startswith("direct_distill"):
            return training_loss(self.module, inputs, self.schedule, generator, self.dtype, patch)[0]
        settings = (DistillSettings.from_json(sample["distill"]) if "distill" in sample
                    else self.distill[int(sample["row"])])
        return direct_distill_loss(self.module, inputs, settings, generator, self.dtype, patch,
                                   shift=self.args.timestep_shift)

    def train(self) -> Path:
        args, acc = self.args, self.accelerator
        sampler = ResumableSampler(len(self.dataset), shuffle=True, seed=args.seed, num_replicas=acc.num_processes,
                                   rank=acc.process_index)
        per_epoch = len(sampler)
        total_micro = per_epoch * args.num_epochs
        total_steps = total_micro // args.gradient_accumulation_steps
        if args.max_train_steps:
            total_steps = min(total_steps, args.max_train_steps)
        if total_steps < 1:
            raise ValueError(f"{len(self.dataset)} clip(s) x {args.num_epochs} epoch(s) make no optimizer step with "
                             f"--gradient_accumulation_steps {args.gradient_accumulation_steps}")
        optimizer, scheduler = self._optimizer(total_steps)
        if acc.state.deepspeed_plugin is not None:
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        if args.enable_model_cpu_offload:  # layer offload: the module stays unwrapped, its hooks place the weights
            if acc.num_processes > 1 or acc.state.deepspeed_plugin is not None:
                raise ValueError("--enable_model_cpu_offload trains in one process without DeepSpeed (as "
                                 "DiffSynth-Studio's offload training); use ZeRO offload for several processes")
            self.offload = LayerOffloadManager(self.module, acc.device, args.enable_optimizer_cpu_offload)
            optimizer, scheduler = acc.prepare(optimizer, scheduler)
        else:
            self.module, optimizer, scheduler = acc.prepare(self.module, optimizer, scheduler)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.resume()
        if acc.is_main_process:
            Path(args.output_path).mkdir(parents=True, exist_ok=True)
            (Path(args.output_path) / "training_args.json").write_text(
                json.dumps(vars(args), indent=2, default=str))
            if acc.log_with:
                acc.init_trackers("wan-training", config={k: v for k, v in vars(args).items()
                                                          if isinstance(v, (int, float, str, bool))})
        log_path = Path(args.logging_dir or Path(args.output_path) / "logs") / "losses.jsonl"
        log_path.parent.mkdir(parents=True, exist_ok=True)

        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=self.progress.step, disable=not acc.is_main_process, desc="steps")
        patch = tuple(self.components.transformer.config.patch_size)
        window: list[torch.Tensor] = []
        skipped = 0
        started = time.perf_counter()
        done = self.progress.step >= total_steps
        while not done and self.progress.epoch < args.num_epochs:
            sampler.set_position(self.progress.epoch, self.progress.position)
            for sample in _loader(self.dataset, sampler, args.dataset_num_workers):
                skipped += len(sample.get("skipped", ()))
                for s in sample.get("skipped", ()):
                    logger.warning("skipped %s: %s", s["row"], s["reason"])
                inputs = self._inputs(sample)
                generator = torch.Generator().manual_seed(step_seed(args.seed, self.progress.micro_step,
                                                                    acc.process_index))
                with acc.accumulate(self.module):
                    loss = self._loss(sample, inputs, generator, patch)
                    acc.backward(loss)
                    if self.offload is not None:
                        self.offload.after_backward()
                    if acc.sync_gradients and args.max_grad_norm:
                        acc.clip_grad_norm_(self.params, args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                self.progress.micro_step += 1
                self.progress.position += 1
                window.append(loss.detach().float())
                if acc.sync_gradients:
                    self.progress.step += 1
                    step_loss = acc.reduce(torch.stack(window).mean(), reduction="mean")
                    window.clear()
                    lr = scheduler.get_last_lr()[0]
                    if acc.is_main_process:
                        with open(log_path, "a") as f:
                            f.write(json.dumps({"step": self.progress.step, "loss": float(step_loss), "lr": lr,
                                                "epoch": self.progress.epoch}) + "\n")
                    acc.log({"loss": float(step_loss), "lr": lr}, step=self.progress.step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(step_loss):.4f}", lr=f"{lr:.2e}")
                    if args.save_steps and self.progress.step % args.save_steps == 0:
                        self.save_checkpoint()
                    if self.progress.step >= total_steps:
                        done = True
                        break
            else:
                self.progress.epoch += 1
                self.progress.position = 0
                if not args.save_steps:
                    self.save_checkpoint()
        bar.close()
        out = self.save_final()
        if skipped:
            acc.print(f"skipped {skipped} bad row load(s) this run (see the warnings above)")
        skipped_static = getattr(self.dataset, "skipped", [])
        if skipped_static:
            acc.print(f"skipped {len(skipped_static)} bad metadata row(s): "
                      + "; ".join(f"{s.row}: {s.reason}" for s in skipped_static[:5]))
        acc.print(f"done: {self.progress.step} steps in {time.perf_counter() - started:.1f}s; weights in {out}")
        acc.end_training()
        return out


# --------------------------------------------------------------------------------------------------- data process


def run_data_process(args) -> Path:
    """``--task sft:data_process``: encode every row once into ``<output_path>/<rank>/<row>.safetensors``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    acc = _make_accelerator(args)
    dtype = DTYPES[args.dtype]
    distill = _distill_rows(args, _dataset(args, None, repeat=1))  # a bad row fails before any model loads
    components = load_training_components(
        args.model_path, expert=args.expert, dtype=dtype, vae_dtype=DTYPES[args.vae_dtype], load_encoders=True,
        transformer_path=args.transformer_path, image_encoder_heads=args.image_encoder_heads,
        tokenizer_path=args.tokenizer_path, audio_processor_path=args.audio_processor_path,
        progress=acc.is_main_process, conversion_cache_dir=args.conversion_cache_dir,
    )
    dataset = _dataset(args, components, repeat=1)
    offload = _move_encoders(components, acc.device, args.fp8_models, offload=args.enable_model_cpu_offload)
    if offload:
        acc.print(f"layer offload: {sum(len(m.units) for m in offload)} encoder layers stay in CPU memory")
    builder = WanInputBuilder(components, args.extra_inputs, acc.device, args.max_sequence_length)
    sampler = ResumableSampler(len(dataset), shuffle=False, num_replicas=acc.num_processes, rank=acc.process_index)
    out = Path(args.output_path) / str(acc.process_index)
    out.mkdir(parents=True, exist_ok=True)
    written = set()
    for sample in tqdm(_loader(dataset, sampler, args.dataset_num_workers), disable=not acc.is_main_process,
                       desc="caching"):
        row = int(sample["row"])
        if row in written:  # the padding of the last rank's share repeats rows
            continue
        written.add(row)
        tensors = builder(sample).to_tensors()
        meta = {"format": CACHE_FORMAT, "row": str(row), "prompt": sample["prompt"]}
        if distill is not None:
            meta["distill"] = distill[row].to_json()
        save_file(tensors, str(out / f"{row:08d}.safetensors"), metadata=meta)
    acc.wait_for_everyone()
    if acc.is_main_process:
        info = {"format": CACHE_FORMAT, "task": args.task, "model_path": str(args.model_path), "expert": args.expert,
                "pipeline_class": components.pipeline_class, "extra_inputs": args.extra_inputs,
                "num_frames": args.num_frames, "height": args.height, "width": args.width}
        (Path(args.output_path) / "cache_info.json").write_text(json.dumps(info, indent=2))
        acc.print(f"cached {len(dataset)} row(s) into {args.output_path}; train with --task {args.task.split(':')[0]}:train "
                  f"--dataset_base_path {args.output_path}")
    acc.end_training()
    return Path(args.output_path)


def run_training(args) -> Path:
    """Run the task of parsed ``args`` (:func:`~diffusers_wan_ext.training.args.parse_args`)."""
    if args.task.endswith(":data_process"):
        return run_data_process(args)
    return WanTrainer(args).train()


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Entry point of ``diffusers-wan train``, ``python -m diffusers_wan_ext.training`` and
    ``examples/training/train.py`` (``prog`` names the command in usage lines); an error the user can fix (a bad
    file, folder, argument or checkpoint) is one line ``error: ...`` and exit status 2."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_training(parse_args(argv, prog))
    except (ValueError, ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as e:  # SystemExit("message") of a check: the same one line and exit status
        if not isinstance(e.code, str):
            raise
        print(f"error: {e.code}", file=sys.stderr)
        raise SystemExit(2) from None
