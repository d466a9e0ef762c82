"""``diffusers-wan generate`` (a video from a converted folder), ``demo`` (the tiny end-to-end run) and ``variants``.

``generate`` checks everything it can before loading a model (:mod:`.generate_checks`): the arguments, the folder's
JSON files and pipeline class, the input images and videos, the LoRA files and that the output folder is writable.
It then loads the pipeline (Diffusers' progress bar), loads the LoRAs, denoises (progress bar), says when it decodes
and writes, and writes the video atomically, checked after writing (:func:`~diffusers_wan_ext.utils.media.write_video`).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from diffusers import DiffusionPipeline

from ..conversion.release_io import DTYPES
from ..demo import run_demo
from ..families import FAMILIES
from ..hooks.sliding_window import apply_sliding_window, sliding_window_unsupported_reason
from ..lora import WanLoraInteropMixin, check_lora_state_dict, split_lora_components
from ..utils.media import add_audio_track, write_video
from ..utils.validation import check_output_file
from .generate_checks import (
    FRAME_PARAMETERS,
    GeneratePlan,
    LoraRequest,
    call_inputs,
    check_generate,
    class_entry,
    own_class,
    read_json,
)

__all__ = ["cmd_demo", "cmd_generate", "cmd_variants", "load_loras", "variants_table"]


def note(message: str) -> None:
    """A progress line on stderr (stdout carries only the result path)."""
    print(message, file=sys.stderr, flush=True)


def pick_device(name: str | None) -> str:
    """``--device`` checked (``cuda`` needs a GPU); default: CUDA when there is one."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device: {name!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name} asked for, but torch sees no CUDA GPU")
    return name


def load_loras(pipe, loras: list[LoraRequest]) -> None:
    """Load each LoRA as an adapter and weight them (``set_adapters``).

    Our pipelines (:class:`~diffusers_wan_ext.lora.WanLoraInteropMixin`) take every format and component at once;
    a stock pipeline gets the Diffusers keys one component at a time, checked first (stock would drop keys that fit
    no layer with a warning).
    """
    for lora in loras:
        if isinstance(pipe, WanLoraInteropMixin):
            pipe.load_lora_weights(dict(lora.state_dict), adapter_name=lora.adapter_name)
            continue
        for comp, part in split_lora_components(lora.state_dict).items():
            model = getattr(pipe, comp, None)
            if comp not in ("transformer", "transformer_2") or model is None:
                raise ValueError(f"--lora {lora.file}: {type(pipe).__name__} has no {comp} to load its keys into")
            sd = {"transformer." + k[len(comp) + 1:]: v for k, v in part.items()}
            sd = check_lora_state_dict(model, sd, prefix="transformer", name=comp)
            pipe.load_lora_weights(sd, adapter_name=lora.adapter_name, load_into_transformer_2=comp == "transformer_2")
    if loras:
        pipe.set_adapters([lora.adapter_name for lora in loras], [lora.scale for lora in loras])
        note("loaded LoRA " + ", ".join(f"{lora.file} (x{lora.scale:g})" for lora in loras))


def announce_decode(pipe) -> None:
    """Print a line when the pipeline starts decoding with its VAE (the last long phase before writing)."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return
    decode = vae.decode

    def decode_with_note(*args, **kwargs):
        if not getattr(decode_with_note, "announced", False):
            decode_with_note.announced = True
            note("decoding the latents with the VAE ...")
        return decode(*args, **kwargs)

    vae.decode = decode_with_note


def load_pipeline(args: argparse.Namespace, plan: GeneratePlan, device: str):
    """``DiffusionPipeline.from_pretrained``, upgraded to the family's class, placed on ``device``, LoRAs in."""
    note(f"loading {args.model} ({plan.folder_class}, {args.dtype}) ...")
    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype],
                                             trust_remote_code=args.trust_remote_code)
    if plan.pipeline_class is not None and not isinstance(pipe, plan.pipeline_class):
        pipe = plan.pipeline_class(**pipe.components)  # the family's pipeline for file inputs and input checks
    if args.offload and device == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    load_loras(pipe, plan.loras)
    return pipe


def check_sliding_window_option(args: argparse.Namespace, plan: GeneratePlan) -> bool:
    """``--sliding-window SIZE,STRIDE``, checked before loading: refused (one line) when the folder's pipeline or
    transformer class declares why it cannot be windowed.  Puts ``sliding_window_size`` / ``_stride`` into the call
    arguments of a pipeline that takes them; returns ``True`` when the hook must go on the loaded transformers
    instead (stock or custom pipelines, e.g. ``WanVACEPipeline``)."""
    if getattr(args, "sliding_window", None) is None:
        return False
    size, stride = args.sliding_window
    index = read_json(plan.folder / "model_index.json", "--model")
    classes = [plan.pipeline_class] if plan.pipeline_class is not None else []
    for name in ("transformer", "transformer_2"):
        if isinstance(index.get(name), list) and index[name][0] is not None:
            classes.append(own_class(class_entry(index[name])[1]))
    for cls in classes:
        reason = None if cls is None else (
            getattr(cls, "sliding_window_unsupported_reason", None) or sliding_window_unsupported_reason(cls))
        if reason:
            raise ValueError(f"--sliding-window: {cls.__name__} cannot use sliding windows: {reason}")
    if plan.pipeline_class is not None and "sliding_window_size" in call_inputs(plan.pipeline_class):
        plan.kwargs.update(sliding_window_size=size, sliding_window_stride=stride)
        return False
    return True


def cmd_generate(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    plan = check_generate(args)
    hook_windows = check_sliding_window_option(args, plan)
    pipe = load_pipeline(args, plan, device)
    if hook_windows:
        for name in ("transformer", "transformer_2"):
            if getattr(pipe, name, None) is not None:
                apply_sliding_window(getattr(pipe, name), *args.sliding_window)
    kw = dict(plan.kwargs, generator=torch.Generator(device="cpu").manual_seed(args.seed))
    for family, given in plan.family_options:
        family.prepare_generate(pipe, args.model, dict(given), kw)
    if "num_frames" in kw and plan.pipeline_class is not None:
        takes = call_inputs(type(pipe))
        param = next((p for p in FRAME_PARAMETERS if p in takes), "num_frames")
        kw[param] = kw.pop("num_frames")
    if "frame_rate" in call_inputs(type(pipe)) and "frame_rate" not in kw:
        kw["frame_rate"] = float(plan.fps)  # sound generated for the written frame rate (MOVA)
    announce_decode(pipe)
    result = pipe(**kw)
    frames = result.frames[0]
    note(f"writing {len(frames)} frames to {plan.output} ...")
    out = write_video(frames, plan.output, fps=plan.fps)
    if getattr(result, "audio", None) is not None:  # a pipeline that generates the sound track too
        add_audio_track(out, result.audio[0], result.audio_sample_rate)
    print(out.resolve())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    check_output_file(args.output, overwrite=True)  # before building and rendering anything
    print(run_demo(args.output, workdir=args.workdir, steps=args.steps, seed=args.seed))
    return 0


VARIANT_COLUMNS = (("release id", "name"), ("arch", "arch"), ("pipeline", "pipeline"), ("size", None),
                   ("frames", "num_frames"), ("steps", "num_inference_steps"), ("original release", "release"))


def variant_cells(v) -> list[str]:
    return [f"{v.height}x{v.width}" if key is None else str(getattr(v, key)) for _, key in VARIANT_COLUMNS]


def variants_table() -> list[str]:
    """``diffusers-wan variants``: one table, columns sized to their content, the rows grouped by family."""
    header = [title for title, _ in VARIANT_COLUMNS]
    rows = [header] + [variant_cells(v) for f in FAMILIES for v in f.variants]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    for family in FAMILIES:
        if family.variants:
            out += ["", f"{family.title}:", *(line(variant_cells(v)) for v in family.variants)]
    return out


def cmd_variants(args: argparse.Namespace) -> int:
    if getattr(args, "json", False):
        print(json.dumps([dict(v.record(), family=f.name) for f in FAMILIES for v in f.variants], indent=2))
        return 0
    print("\n".join(variants_table()))
    return 0
