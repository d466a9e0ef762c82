"""The ``diffusers-wan`` argument parser: core verbs here, the families' verbs and options from the manifest."""

from __future__ import annotations

import argparse
import math
import os
import sys

from .manifest import add_generate_inputs, add_manifest_arguments, read_manifest

__all__ = [
    "CommandLineParser", "DESCRIPTION", "DTYPE_CHOICES", "FAMILY_LORA_FORMATS", "LORA_FORMATS", "build_parser",
    "finite_positive_float", "lora_spec", "non_negative_int", "positive_int", "sliding_window_spec",
]

DESCRIPTION = """\
``diffusers-wan``: convert original Wan releases, export DiTs back, run the demo, generate videos.

Examples::

    diffusers-wan demo --output outputs/demo.mp4
    diffusers-wan convert /ckpt/Wan2.1-T2V-1.3B /ckpt/Wan2.1-T2V-1.3B-diffusers --dtype bf16
    diffusers-wan convert - /ckpt/Wan2.2-TI2V-5B-diffusers --model-id Wan-AI/Wan2.2-TI2V-5B
    diffusers-wan export-dit /ckpt/Wan2.1-T2V-1.3B-diffusers/transformer wan_t2v_1.3b.safetensors
    diffusers-wan generate --model /ckpt/Wan2.1-T2V-1.3B-diffusers --prompt "a cat surfing" --output cat.mp4
    diffusers-wan lora convert comfyui_lora.safetensors pytorch_lora_weights.safetensors --to diffusers
    diffusers-wan lora info my_lora.safetensors
    diffusers-wan train --help          # the trainer's own options (docs/training.md)
"""

DTYPE_CHOICES = ["bf16", "fp16", "fp32"]
#: the LoRA layouts of :mod:`diffusers_wan_ext.lora.formats` (``LORA_FORMATS``; a test keeps the two equal)
LORA_FORMATS = ("diffusers", "original", "kohya", "diffsynth")
#: the layouts of one family's LoRAs (``ModelFamily.own_lora_formats``, LongCat-Video's; a test keeps them equal):
#: ``lora convert``, ``lora info --from`` and ``lora export --from / --formats``
FAMILY_LORA_FORMATS = ("longcat",)
#: the ``export-dit --format`` values of :data:`diffusers_wan_ext.utils.single_file.EXPORT_FORMATS` (a test keeps them
#: equal)
EXPORT_FORMATS = ("original", "comfy-fp8-scaled", "comfy-fp8", "comfy-fp8-e5m2", "gguf-q8_0", "gguf-q5_1",
                  "gguf-q5_0", "gguf-q4_1", "gguf-q4_0", "gguf-f16", "gguf-bf16", "gguf-q6_k", "gguf-q5_k_m",
                  "gguf-q5_k_s", "gguf-q5_k", "gguf-q4_k_m", "gguf-q4_k_s", "gguf-q4_k", "gguf-q3_k_l", "gguf-q3_k_m",
                  "gguf-q3_k_s", "gguf-q3_k")


def add_convert(sub, family_inputs: list) -> None:
    p = sub.add_parser("convert", help="original Wan release (folder or files) -> Diffusers pipeline folder")
    p.add_argument("src", help="release folder or DiT file ('-' with --model-id)")
    p.add_argument("dst", help="output folder (written atomically)")
    p.add_argument("--variant", help="release name (see `diffusers-wan variants`); detected when omitted")
    p.add_argument("--dtype", default="bf16", choices=DTYPE_CHOICES)
    p.add_argument("--scheduler", default="unipc", choices=["unipc", "euler", "diffsynth", "original-unipc"])
    p.add_argument("--transformer", help="DiT file / folder (overrides what SRC contains); ComfyUI / Kijai single "
                                         "files (fp16, fp8, scaled fp8) and .gguf too")
    p.add_argument("--transformer-2", help="second expert (Wan2.2 A14B low-noise model)")
    p.add_argument("--text-encoder", help="models_t5_umt5-xxl-enc-bf16.pth (or ComfyUI's umt5_xxl_*.safetensors)")
    p.add_argument("--tokenizer", help="google/umt5-xxl tokenizer folder")
    p.add_argument("--vae", help="Wan2.1_VAE.pth or Wan2.2_VAE.pth (or ComfyUI's wan_2.1_vae / wan2.2_vae "
                                 ".safetensors)")
    p.add_argument("--image-encoder", help="models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    p.add_argument("--image-encoder-heads", type=positive_int, help="CLIP heads (only for non-release widths)")
    for i in family_inputs:  # the families' extra release components
        p.add_argument(i["flag"], dest=i["argument"], metavar="FOLDER" if i["kind"] == "folder" else "FILE",
                       help=i["help"])
    p.add_argument("--transformer-only", action="store_true", help="write only the transformer model folder")
    p.add_argument("--keep-quantized", action="store_true",
                   help="a GGUF / fp8 single-file DiT stays quantized in DST (GGUF: from_single_file + "
                        "GGUFQuantizationConfig; fp8: layerwise casting); see docs/single_file_checkpoints.md")
    p.add_argument("--fp8-storage", choices=["layerwise", "torchao"],
                   help="with --keep-quantized, an fp8 DiT's storage: layerwise (default: fp8 without scales, "
                        "enable_layerwise_casting) or torchao (float8 weights with the file's scales; needs torchao)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST (deleted only once the new folder is in place)")
    p.add_argument("--model-id", help="fetch the original release first (ModelScope if installed, else the Hub)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the converted folder with a model card")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")


def add_export_dit(sub) -> None:
    p = sub.add_parser("export-dit", help="Diffusers transformer -> original Wan key layout (ComfyUI / LoRA interop)")
    p.add_argument("src", help="transformer folder or safetensors file in the Diffusers layout")
    p.add_argument("dst", help="output .safetensors (written atomically)")
    p.add_argument("--prefix", default="", help="key prefix, e.g. 'model.diffusion_model.' for ComfyUI")
    p.add_argument("--dtype", choices=DTYPE_CHOICES)
    p.add_argument("--format", default="original", choices=EXPORT_FORMATS,
                   help="original safetensors (default), ComfyUI fp8 (scaled: scale_weight + scaled_fp8 marker) or "
                        "GGUF (city96 ComfyUI-GGUF layout; DST *.gguf); see docs/single_file_checkpoints.md")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")


class CommandLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``error: PROG: MESSAGE (see 'PROG --help')``, exit status 2
    (the verbs' own errors look the same: :func:`diffusers_wan_ext.cli.run_command`).

    ``pass_through="name"`` makes a verb's parser keep every argument after the verb unparsed in ``name`` (a list),
    for a verb with its own parser (``train``: its ``--help`` is the trainer's)."""

    def __init__(self, *args, pass_through: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pass_through = pass_through

    def parse_known_args(self, args=None, namespace=None):
        if self.pass_through is None:
            return super().parse_known_args(args, namespace)
        namespace = argparse.Namespace() if namespace is None else namespace
        setattr(namespace, self.pass_through, list(sys.argv[1:] if args is None else args))
        return namespace, []

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see '{self.prog} --help')\n")


def integer(text: str) -> int:
    """``text`` as an ``int``, or the argparse error ``'x' is not an integer``."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    """``type=`` for counts and sizes: an integer >= 1 (``0``, negatives and ``nan`` are errors, never defaults)."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer (>= 1)")
    return value


def non_negative_int(text: str) -> int:
    """``type=`` for seeds: an integer in ``[0, 2**64)`` (what ``torch.Generator.manual_seed`` accepts)."""
    value = integer(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value} must be an integer from 0 to 2**64 - 1")
    return value


def finite_positive_float(text: str) -> float:
    """``type=`` for scales: a finite number > 0 (``nan``, ``inf``, ``0`` and negatives are errors)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


def sliding_window_spec(text: str) -> tuple[int, int]:
    """``--sliding-window SIZE,STRIDE`` (latent frames) -> ``(SIZE, STRIDE)``: integers ``>= 1``, ``STRIDE <= SIZE``."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIZE,STRIDE (latent frames, e.g. 8,4)")
    values = []
    for what, part in zip(("SIZE", "STRIDE"), parts):
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {what} {part.strip()!r} is not an integer") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: {what} must be a positive integer (>= 1)")
        values.append(value)
    if values[1] > values[0]:
        raise argparse.ArgumentTypeError(f"{text!r}: STRIDE must not exceed SIZE (frames between windows would be "
                                         "skipped)")
    return values[0], values[1]


def lora_spec(text: str) -> tuple[str, float]:
    """``--lora FILE[:SCALE]`` -> ``(FILE, SCALE)`` (scale 1.0 when omitted; finite, may be negative or 0).

    A ``:`` followed by something that is not a number is part of the file name only when that file exists.
    """
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            if not os.path.exists(text):
                raise argparse.ArgumentTypeError(
                    f"{text!r}: expected FILE or FILE:SCALE, and {tail!r} is not a number") from None
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FILE or FILE:SCALE")
    if not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"{text!r}: the scale must be a finite number")
    return path, scale


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="tiny release -> converter -> DiffusionPipeline -> mp4 (no downloads)")
    p.add_argument("--output", default="outputs/demo.mp4")
    p.add_argument("--workdir", help="keep the tiny release and converted folder here")
    p.add_argument("--steps", type=positive_int, default=4)
    p.add_argument("--seed", type=non_negative_int, default=0)


def add_generate(sub, family_inputs: list) -> None:
    p = sub.add_parser("generate", help="render a video with a converted model folder or Hub repo",
                       description="Render a video with a converted folder (or Hub repo). Every argument, the folder "
                                   "and the input files are checked before any model loads; unset sizes, frames, "
                                   "steps, guidance and fps come from the folder's wan_variant.json.")
    p.add_argument("--model", required=True, help="converted Diffusers folder (model_index.json) or Hub repo id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--image", help="first frame (I2V / FLF2V / Fun-InP / Animate / S2V ...: models that take one)")
    p.add_argument("--last-image", help="last frame (FLF2V; Fun-InP end image)")
    add_generate_inputs(p, family_inputs)
    p.add_argument("--lora", action="append", type=lora_spec, default=[], metavar="FILE[:SCALE]",
                   help="load a LoRA (any format: Diffusers, original/ComfyUI, Kohya, DiffSynth) with this weight "
                        "(default 1.0); repeat for several")
    p.add_argument("--height", type=positive_int)
    p.add_argument("--width", type=positive_int)
    p.add_argument("--num-frames", type=positive_int, help="4n + 1 (Wan2.2-Animate: frames per segment)")
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--guidance-scale", type=finite_positive_float)
    p.add_argument("--fps", type=positive_int)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--sliding-window", type=sliding_window_spec, metavar="SIZE,STRIDE",
                   help="temporal sliding windows of SIZE latent frames, STRIDE apart (DiffSynth-Studio's "
                        "sliding_window_size / _stride): each DiT forward runs per window, the windows are blended")
    p.add_argument("--dtype", default="bf16", choices=DTYPE_CHOICES)
    p.add_argument("--device")
    p.add_argument("--offload", action="store_true", help="model CPU offload (CUDA)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--output", default="outputs/video.mp4", help="mp4 path (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")


def add_variants(sub) -> None:
    p = sub.add_parser("variants", help="list the releases the converter knows (table, or --json)")
    p.add_argument("--json", action="store_true", help="one JSON list of the release rows (machine-readable)")


def add_lora(sub, components: list[str]) -> None:
    p = sub.add_parser("lora", help="convert / inspect / export Wan LoRAs (Diffusers, original/ComfyUI, Kohya, "
                                     "DiffSynth)")
    lsub = p.add_subparsers(dest="lora_command", required=True)
    c = lsub.add_parser("convert", help="one LoRA file -> another format")
    c.add_argument("src", help="LoRA file (.safetensors / .pt / .bin) or a folder with "
                               "pytorch_lora_weights.safetensors")
    c.add_argument("dst", help="output file (.safetensors), written atomically")
    c.add_argument("--to", required=True, choices=LORA_FORMATS + FAMILY_LORA_FORMATS,
                   help="longcat: LongCat-Video's original layout (of a LongCat-Video transformer's LoRA)")
    c.add_argument("--from", dest="from_format", choices=LORA_FORMATS + FAMILY_LORA_FORMATS,
                   help="source format (detected when omitted)")
    c.add_argument("--component", default="transformer", choices=components,
                   help="the pipeline component a single-model file (original/kohya/diffsynth) stands for; "
                        "transformer_2 = Wan2.2 A14B low-noise expert")
    c.add_argument("--dtype", choices=DTYPE_CHOICES, help="cast the tensors (default: keep)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    i = lsub.add_parser("info", help="detected format, components, ranks, alphas and target modules of a LoRA")
    i.add_argument("file")
    i.add_argument("--from", dest="from_format", choices=LORA_FORMATS + FAMILY_LORA_FORMATS,
                   help="source format (detected when omitted; longcat: LongCat-Video's original layout)")
    i.add_argument("--json", action="store_true")
    e = lsub.add_parser("export", help="one LoRA -> a folder with every format (one file per component)")
    e.add_argument("src")
    e.add_argument("dst", help="output folder")
    e.add_argument("--from", dest="from_format", choices=LORA_FORMATS + FAMILY_LORA_FORMATS,
                   help="source format (detected when omitted)")
    e.add_argument("--formats", nargs="+", default=None, choices=LORA_FORMATS + FAMILY_LORA_FORMATS,
                   help="default: diffusers original kohya diffsynth; for a LongCat-Video LoRA (longcat layout) "
                        "diffusers longcat. longcat: LongCat-Video's original layout (lora_longcat.safetensors) of a "
                        "LongCat-Video transformer's LoRA")
    e.add_argument("--overwrite", action="store_true", help="replace files of the same names in DST")


def add_train(sub) -> None:
    sub.add_parser("train", add_help=False, pass_through="train_args",
                   usage="diffusers-wan train [--help] TRAINER_OPTIONS ...",
                   help="train a LoRA or fine-tune a transformer (PEFT + accelerate; `diffusers-wan train --help` "
                        "lists the trainer's options)")


def build_parser() -> argparse.ArgumentParser:
    """The whole ``diffusers-wan`` parser (imports nothing heavy: ``--help`` answers at once)."""
    manifest = read_manifest()
    parser = CommandLineParser(prog="diffusers-wan", description=DESCRIPTION,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert(sub, manifest["convert_inputs"])
    for command in manifest["commands"]:
        add_manifest_arguments(sub.add_parser(command["name"], help=command["help"]), command["arguments"])
    add_export_dit(sub)
    add_demo(sub)
    add_generate(sub, manifest["generate_inputs"])
    add_variants(sub)
    add_lora(sub, manifest["lora_components"])
    add_train(sub)
    return parser
