"""What a model family declares: :class:`ModelFamily` (one subclass per family module) and its data rows.

A family is a small delta on the shared Wan core.  Its declaration module (``families/<name>.py``) states, in one
place, everything the rest of the package needs to know about it:

* how its DiT weights are recognised, how their config is read and their key tables
  (:class:`~diffusers_wan_ext.conversion.dit.DitExtension`, registered with the DiT converter);
* its release rows with the sampling defaults of the original code (:class:`WanVariant`);
* its model and pipeline classes (registered with Diffusers on ``import diffusers_wan_ext``);
* the release components it needs beyond the Wan core (audio encoder, motion controller, relighting LoRA), and how
  a release that is not in the Wan DiT layout converts (LongCat-Video, Video-As-Prompt);
* its model-card snippet, its tiny-release factory for the demo and tests, its context-parallel plan for stock
  classes that lack one, and its training inputs (:class:`Conditioning`, :class:`TrainingScope`,
  :class:`TrainingComponent`, :class:`ExtraInput` dataset columns).

The registry (:mod:`diffusers_wan_ext.families`) iterates the declarations; no code outside a family's module names
the family.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Mapping

import torch

from ..conversion.dit import DitExtension, DitInfo, rename_dit_key

__all__ = [
    "CommandArgument", "Conditioning", "ConvertInput", "FamilyCommand", "FamilyInput", "GenerateInput", "ModelFamily",
    "ReleaseOptions", "TinyArch", "WanVariant",
]


@dataclass(frozen=True)
class WanVariant:
    """One release: how it is recognised and what its converted folder contains."""

    name: str
    arch: str  # what the DiT keys say (an arch of its family's DitExtension), or the family's own (e.g. "longcat")
    release: str  # Hub id of the original release
    dim: int | None = None  # release width (None: any width, e.g. tiny test models)
    num_layers: int | None = None
    experts: int = 1  # 2 = high_noise_model/ + low_noise_model/
    vae: str = "wan2.1"
    image_encoder: bool = False
    audio_encoder: bool = False  # an audio encoder + processor (read by the family's load_components)
    pipeline: str = "WanPipeline"
    boundary_ratio: float | None = None
    expand_timesteps: bool = False
    # sampling defaults of the original code (generate.py / configs)
    flow_shift: float = 5.0
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    guidance_scale_2: float | None = None  # low-noise expert (Wan2.2 A14B)
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: int = 16
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    #: fragments that must all occur in a single DiT file's (lower-cased) name for this row to be chosen when the
    #: weights alone cannot name the release (e.g. krea's file, Fun-InP = I2V layout)
    file_hints: tuple[tuple[str, ...], ...] = field(default_factory=tuple)

    def record(self) -> dict[str, Any]:
        """The row as written to a converted folder's ``wan_variant.json``."""
        rec = asdict(self)
        rec.pop("aliases", None)
        rec.pop("file_hints", None)
        return rec


@dataclass(frozen=True)
class Conditioning:
    """How training conditions one kind of model (see :mod:`diffusers_wan_ext.training.inputs`).

    Attributes:
        name: for messages.
        pipeline: the pipeline class whose code builds the conditioning (built with the training components).
        required / optional: extra inputs (``--extra_inputs``) it cannot do without / accepts.
        encode: ``(builder, sample, inputs, num_frames, height, width) -> None`` fills the conditioning fields of
            ``inputs`` (``None``: text only).
        output_sign: the transformer predicts ``output_sign`` x the flow-matching velocity (LongCat-Video: -1).
    """

    name: str
    pipeline: type
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    encode: Callable[..., None] | None = None
    output_sign: float = 1.0


@dataclass(frozen=True)
class ExtraInput:
    """How a training ``--extra_inputs`` name is read from a dataset row (:mod:`diffusers_wan_ext.training.dataset`).

    Attributes:
        kind: ``"frame"`` (a frame of the clip itself), ``"image"`` (first frame of a file column), ``"video"``
            (a file column with as many frames as the clip), ``"video_native"`` (the same, frames at the file's own
            size), ``"video_prefix"`` (a file column with 4n+1 frames, at most the clip's), ``"audio"`` (an audio
            file, mono samples at ``sample_rate``), ``"file"`` (the path of a file, read by the conditioning),
            ``"float"``, ``"str"`` or ``"floats"`` (a JSON list in the column).
        frame: for ``"frame"``: which frame of the clip (0 first, -1 last).
        sample_rate: for ``"audio"``: the rate the family's models take the samples at (Wav2Vec2: 16 kHz).
    """

    kind: str
    frame: int | None = None
    sample_rate: int = 16000

    @property
    def is_file(self) -> bool:
        return self.kind in ("image", "video", "video_native", "video_prefix", "audio", "file")

    @property
    def from_column(self) -> bool:
        return self.kind != "frame"


@dataclass(frozen=True)
class TrainingScope:
    """A part of a family's transformer that training treats as a model of its own (DiffSynth-Studio's
    ``--trainable_models vace`` / ``--lora_base_model vace2``: only the VACE blocks).

    Attributes:
        name: the scope (``args.trainable_scope`` / ``args.lora_scope``).
        aliases: the model names that select it -> the transformer component they belong to.
        blocks: the transformer's module list of the scope's blocks (``vace_blocks``): a LoRA with this scope goes
            on these blocks only, any other LoRA on the main ``blocks`` only; fp8 storage covers them too.
        parameter_prefix: full fine-tuning with this scope trains the parameters whose names start with this (or one
            of these).
        help: the aliases as the ``--trainable_models`` / ``--lora_base_model`` help lists them.
        lora_export_formats: the ``--export_format`` layouts a LoRA with this scope can be written in (``None``: the
            family's :attr:`ModelFamily.lora_export_formats`; ``()``: the Diffusers layout only, its blocks having no
            name in the Wan DiT layouts).
    """

    name: str
    aliases: Mapping[str, str]
    blocks: str
    parameter_prefix: str | tuple[str, ...]
    help: str = ""
    lora_export_formats: tuple[str, ...] | None = None


def float_input(value: Any) -> torch.Tensor:
    """A dataset value as a ``[1]`` float tensor (the default :attr:`TrainingComponent.make_input`)."""
    return torch.tensor([float(value)])


@dataclass(frozen=True)
class TrainingComponent:
    """A pipeline component besides the transformer that training runs (and can fully fine-tune) with it, driven by
    one ``--extra_inputs`` column (speed control: ``motion_controller`` with ``motion_bucket_id``).

    Its trainable weights are saved under ``<name>.`` in checkpoints and, fine-tuned, as the Diffusers model folder
    ``<output_path>/<name>/``.

    Attributes:
        name: the pipeline component (also its ``--trainable_models`` name).
        input_name: the ``--extra_inputs`` column; the component is used when it is given or the component trained.
        apply: ``(component, transformer, value) -> context manager`` in which the transformer runs the forward.
        help: how ``--trainable_models`` help lists it.
        missing: the error when ``input_name`` is asked for and the model folder has no such component.
        make_input: the dataset value -> the tensor ``apply`` receives (stored in the training cache as
            ``input_name``).
        encode: ``(component, builder, sample, inputs) -> None``: encodes more training inputs with the component
            (MOVA's audio VAE: the audio latents into ``inputs.joint_latents``), or ``None``.
        joint_forward: ``(module, hidden_states, timestep, encoder_hidden_states, joint_latents, **kwargs) ->
            (prediction, {name: prediction})``: the forward of a model that denoises other latents together with
            the video (MOVA: audio; ``module`` holds the transformer and the components), or ``None``.
        aliases: other names of the component in ``--trainable_models`` / ``--lora_base_model`` (DiffSynth-Studio's
            pipeline attribute names, MOVA's ``audio_dit``).
        lora: whether ``--lora_base_model`` may name it (a PEFT-capable Diffusers model; its LoRA is saved under
            ``<name>.`` and loads with the pipeline's ``load_lora_weights``).
        family_only: whether only the declaring family's models take its names (and aliases); otherwise every
            model's ``--trainable_models`` accepts them and a model without the component is refused by ``missing``.
    """

    name: str
    input_name: str
    apply: Callable[[torch.nn.Module, torch.nn.Module, torch.Tensor], ContextManager]
    help: str = ""
    missing: str = ""
    make_input: Callable[[Any], torch.Tensor] = float_input
    encode: Callable[..., None] | None = None
    joint_forward: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    aliases: tuple[str, ...] = ()
    lora: bool = False
    family_only: bool = False


@dataclass(frozen=True)
class TinyArch:
    """The original ``config.json`` fields of a tiny DiT of one architecture (demo and tests)."""

    model_type: str
    in_dim: int
    out_dim: int
    clip: bool = False
    vae: str = "wan2.1"


@dataclass(frozen=True)
class FamilyInput:
    """A command-line option a family adds: ``flag``, the keyword ``argument`` it fills, ``help``."""

    flag: str
    argument: str
    help: str


@dataclass(frozen=True)
class GenerateInput(FamilyInput):
    """A ``diffusers-wan generate`` option a family adds (``--pose-video`` ...): flag, call argument, help."""

    #: "path" (a file, passed as given), "optional-path" (a flag alone gives "auto"), "int", "float" or "text"
    kind: str = "path"


@dataclass(frozen=True)
class ConvertInput(FamilyInput):
    """A ``diffusers-wan convert`` option a family adds (``--audio-encoder`` ...): flag, the ``convert_release``
    keyword it fills, help, and ``kind``: ``"file"`` (one weights file, checked before loading), ``"folder"`` or
    ``"path"`` (either)."""

    kind: str = "file"


@dataclass(frozen=True)
class CommandArgument:
    """One argument of a family's ``diffusers-wan`` verb: ``parser.add_argument(*flags, **options)``.

    ``options`` holds only JSON values (``help``, ``choices``, ``metavar``, ``nargs``, ``default``, ``type`` as
    ``"int"`` / ``"float"``), so the command-line manifest can list it without importing the family.
    """

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FamilyCommand:
    """A ``diffusers-wan`` verb a family adds (e.g. ``add-motion-controller``): its arguments and what it runs.

    ``run(args) -> int`` receives the parsed :class:`argparse.Namespace` and returns the exit status.
    """

    name: str
    help: str
    arguments: tuple[CommandArgument, ...]
    run: Callable[[Any], int]


@dataclass
class ReleaseOptions:
    """The converter options a family's own release converter receives (:meth:`ModelFamily.convert_release`)."""

    dtype: str = "bf16"
    transformer: str | os.PathLike | None = None
    text_encoder: str | os.PathLike | None = None
    tokenizer: str | os.PathLike | None = None
    vae: str | os.PathLike | None = None
    transformer_only: bool = False
    overwrite: bool = False
    progress: bool = True
    max_shard_size: str = "5GB"
    image_encoder_heads: int | None = None  # CLIP heads of a non-release width (tiny models)
    variant: str | None = None  # --variant: the release row, where a family's release has several (MOVA)


class ModelFamily:
    """A model family's declaration.  Subclass it once per family module and register one instance.

    Class attributes are the family's data; methods are the few behaviours that are not data (each has a no-op
    default, so a family overrides only what it adds).
    """

    #: registry key and short title
    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    #: release rows (sampling defaults of the original code)
    variants: ClassVar[tuple[WanVariant, ...]] = ()
    #: DiT modules, detection and config (None: its DiT is not in the Wan layout)
    dit: ClassVar[DitExtension | None] = None
    #: classes this package ships for the family (registered with Diffusers)
    model_classes: ClassVar[tuple[type, ...]] = ()
    pipeline_classes: ClassVar[tuple[type, ...]] = ()
    #: for Diffusers' cache / layer-skip hooks: blocks that behave like stock ``WanTransformerBlock``, other blocks
    #: with their ``TransformerBlockMetadata`` arguments, attention processors
    hook_blocks: ClassVar[tuple[type, ...]] = ()
    hook_block_metadata: ClassVar[dict[type, dict[str, Any]]] = {}
    hook_processors: ClassVar[tuple[type, ...]] = ()
    #: model-card example call per pipeline class name (``str.format`` fields: the variant's sampling defaults)
    card_calls: ClassVar[dict[str, str]] = {}
    #: ``diffusers-wan generate`` options and the pipeline class a loaded folder is upgraded to for them
    generate_inputs: ClassVar[tuple[GenerateInput, ...]] = ()
    generate_pipeline: ClassVar[dict[str, type]] = {}
    #: ``diffusers-wan convert`` options for this family's extra release components
    convert_inputs: ClassVar[tuple[ConvertInput, ...]] = ()
    #: ``diffusers-wan`` verbs of this family (listed in ``diffusers_wan_ext/cli/manifest.json``)
    cli_commands: ClassVar[tuple[FamilyCommand, ...]] = ()
    #: tiny original DiT configs per architecture (demo, tests)
    tiny_arches: ClassVar[dict[str, TinyArch]] = {}
    #: training conditionings of this family's models
    conditionings: ClassVar[tuple[Conditioning, ...]] = ()
    #: training: parts of its transformers trained as models of their own (``--trainable_models vace``)
    training_scopes: ClassVar[tuple[TrainingScope, ...]] = ()
    #: training: pipeline components besides the transformer that train / condition with it
    training_components: ClassVar[tuple[TrainingComponent, ...]] = ()
    #: training: the dataset columns (``--extra_inputs``) its conditionings and components read
    dataset_inputs: ClassVar[dict[str, ExtraInput]] = {}
    #: training: component spellings only this family's models take (DiffSynth-Studio's names in its pipeline for this
    #: family, e.g. MOVA's ``video_dit`` -> ``transformer``), besides the shared ``dit`` / ``dit2`` / ``transformer`` ...
    training_component_aliases: ClassVar[dict[str, str]] = {}
    #: training: clips are resampled to this frame rate when read (DiffSynth-Studio's ``fix_frame_rate``; ``None``:
    #: their frames are read as they are)
    training_frame_rate: ClassVar[float | None] = None
    #: training: the ``--export_format`` layouts its trained LoRAs can be written in (``None``: every Wan layout)
    lora_export_formats: ClassVar[tuple[str, ...] | None] = None
    #: training: its own LoRA layouts among :attr:`lora_export_formats` -> the file each is written to (next to the
    #: Diffusers LoRA, by :meth:`export_own_lora`); no other family's model takes them
    own_lora_formats: ClassVar[dict[str, str]] = {}

    @property
    def short_title(self) -> str:
        """:attr:`title` without its parenthesised detail (``"MOVA"``), for messages."""
        return self.title.split(" (")[0]

    # ------------------------------------------------------------------------------------------- releases
    def claims_release(self, src: Path, transformer: Path | None, variant: str | None) -> bool:
        """Whether ``src`` is a release this family converts itself (not a Wan-layout DiT release)."""
        return False

    def convert_release(self, src: Path, dst: Path, options: ReleaseOptions) -> Path:
        """Convert a release this family claims (see :meth:`claims_release`)."""
        raise NotImplementedError(f"{self.name} releases convert through the Wan DiT converter")

    def find_files(self, root: Path, given: dict[str, Any]) -> dict[str, Path | None]:
        """Release files this family reads beyond the Wan core, found next to the DiT or given explicitly."""
        return {}

    def load_components(self, files: dict[str, Any], info: DitInfo, variant: WanVariant,
                        torch_dtype: torch.dtype) -> dict[str, Any]:
        """Extra pipeline components (``{"audio_encoder": ..., ...}``) for a release of this family, validated."""
        return {}

    def check_extras(self, files: dict[str, Any], info: DitInfo, transformer_only: bool) -> Any:
        """Load and check extras written beside the components (relighting LoRA ...); the value goes to
        :meth:`write_extras`."""
        return None

    def verify_extras(self, extras: Any, transformer: torch.nn.Module, files: dict[str, Any]) -> None:
        """Check what :meth:`check_extras` returned against the converted transformer."""

    def pipeline_override(self, components: dict[str, Any]) -> str | None:
        """The pipeline class a release converts to when this family's extra components are present."""
        return None

    def write_extras(self, folder: Path, extras: Any, torch_dtype: torch.dtype) -> str:
        """Write what :meth:`check_extras` returned into the converted folder; returns a model-card note."""
        return ""

    def prepare_generate(self, pipe, model: str, given: dict[str, Any], kw: dict[str, Any]) -> None:
        """Turn this family's ``generate`` options (``given``) into call arguments in ``kw`` (default: as named)."""
        kw.update(given)

    # ----------------------------------------------------------------------------------------------- demo
    def tiny_arch(self, arch: str, experts: int) -> TinyArch:
        """The tiny DiT config of ``arch`` (``experts=2``: the Wan2.2 A14B layout where it differs)."""
        return self.tiny_arches[arch]

    def tiny_dit_model(self, arch: str, experts: int, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, dict]:
        """A tiny Diffusers model of ``arch`` (for a release written in the original layout) and the extra original
        ``config.json`` fields; ``kwargs`` are the shared Wan transformer arguments."""
        raise NotImplementedError(f"{self.name} has no tiny DiT of arch {arch!r}")

    def tiny_release_files(self, folder: Path, dit_folder: Path, arch: str, dit_state_dict: dict, seed: int) -> None:
        """Extra files of a tiny release (relighting LoRA, audio encoder folder ...)."""

    # ------------------------------------------------------------------------------------------ parallel
    def register_parallel_plans(self) -> None:
        """Context-parallel plans for STOCK classes this family uses that lack one (ours carry ``_cp_plan``)."""

    def register_runtime_hooks(self) -> None:
        """What the runtime hooks need to know about this family's models (e.g. TeaCache side blocks)."""

    def register_lora_components(self) -> None:
        """LoRA-capable pipeline components this family adds besides the transformers (their module names, through
        :func:`~diffusers_wan_ext.lora.formats.register_lora_component`)."""

    # ----------------------------------------------------------------------------------------- training
    def claims_config(self, config: Any) -> bool:
        """Whether a transformer ``config`` is specifically this family's (e.g. VACE: ``vace_layers``); a family that
        claims it is asked first for its :meth:`training_conditioning`, before the families matching by channels."""
        return False

    def training_conditioning(self, config: Any, expand_timesteps: bool) -> Conditioning | None:
        """The conditioning of a transformer with this ``config`` if it belongs to this family, else ``None``."""
        return None

    def export_own_lora(self, fmt: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A Diffusers LoRA of this family's transformer (``transformer.*``, scale folded in) in its own layout
        ``fmt`` (one of :attr:`own_lora_formats`)."""
        raise ValueError(f"{fmt}: not a LoRA layout of the {self.name} family")

    def lora_target_modules(self, names: list[str]) -> list[str] | None:
        """Training's ``--lora_target_modules`` (DiffSynth-Studio / original names) as PEFT targets on this family's
        transformer when its modules are not named as the Wan DiT's (Animate-2: ``self_attn.q`` ->
        ``self_attn.to_q``), else ``None`` (the Wan DiT mapping, ``map_lora_target_modules``)."""
        return None

    def training_module_path(self, path: str) -> str | None:
        """DiffSynth-Studio's path of a module of this family's DiT (``--trainable_models dit.blocks.0.self_attn.q``)
        as our module path (default: the Wan DiT tables, ``blocks.0.attn1.to_q``); ``None`` when none names it."""
        return rename_dit_key(path)

    def load_training_transformer(self, path: Path, torch_dtype: torch.dtype) -> torch.nn.Module | None:
        """Training's ``--transformer_path``: this family's transformer from its own release layout at ``path``
        (e.g. LongCat-Video's ``dit/``, which DiffSynth-Studio pairs with Wan2.1's files), else ``None``."""
        return None
