"""``diffusers-wan``: convert original Wan releases, export DiTs back, run the demo, generate videos.

Examples::

    diffusers-wan demo --output outputs/demo.mp4
    diffusers-wan convert /ckpt/Wan2.1-T2V-1.3B /ckpt/Wan2.1-T2V-1.3B-diffusers --dtype bf16
    diffusers-wan convert - /ckpt/Wan2.2-TI2V-5B-diffusers --model-id Wan-AI/Wan2.2-TI2V-5B
    diffusers-wan export-dit /ckpt/Wan2.1-T2V-1.3B-diffusers/transformer wan_t2v_1.3b.safetensors
    diffusers-wan generate --model /ckpt/Wan2.1-T2V-1.3B-diffusers --prompt "a cat surfing" --output cat.mp4
    diffusers-wan lora convert comfyui_lora.safetensors pytorch_lora_weights.safetensors --to diffusers
    diffusers-wan lora info my_lora.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _add_convert(sub):
    p = sub.add_parser("convert", help="original Wan release (folder or files) -> Diffusers pipeline folder")
    p.add_argument("src", help="release folder or DiT file ('-' with --model-id)")
    p.add_argument("dst", help="output folder (written atomically)")
    p.add_argument("--variant", help="release name (see `diffusers-wan variants`); detected when omitted")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--scheduler", default="unipc", choices=["unipc", "euler", "diffsynth", "original-unipc"])
    p.add_argument("--transformer", help="DiT file / folder (overrides what SRC contains)")
    p.add_argument("--transformer-2", help="second expert (Wan2.2 A14B low-noise model)")
    p.add_argument("--text-encoder", help="models_t5_umt5-xxl-enc-bf16.pth")
    p.add_argument("--tokenizer", help="google/umt5-xxl tokenizer folder")
    p.add_argument("--vae", help="Wan2.1_VAE.pth or Wan2.2_VAE.pth")
    p.add_argument("--image-encoder", help="models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    p.add_argument("--image-encoder-heads", type=int, help="CLIP heads (only for non-release widths)")
    p.add_argument("--audio-encoder", help="Wan2.2-S2V wav2vec2-large-xlsr-53-english folder (model + processor)")
    p.add_argument("--motion-controller", metavar="FILE",
                   help="speed-control model.safetensors (DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1) to add as a "
                        "component of a Wan2.1 T2V folder (-> WanSpeedControlPipeline)")
    p.add_argument("--relighting-lora", metavar="FILE",
                   help="Wan2.2-Animate relighting_lora.ckpt (found next to the DiT when omitted) -> relighting_lora/")
    p.add_argument("--transformer-only", action="store_true", help="write only the transformer model folder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--model-id", help="fetch the original release first (ModelScope if installed, else the Hub)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the converted folder with a model card")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")


def _fetch_release(model_id: str, cache_dir: str | None = None) -> str:
    try:
        from modelscope import snapshot_download as ms_download  # type: ignore

        return ms_download(model_id, cache_dir=cache_dir)
    except ImportError:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, cache_dir=cache_dir)


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload a converted folder (it already carries a model card) to the Hub and return the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload Wan model converted with diffusers_wan_ext")
    return str(url)


def cmd_convert(args) -> int:
    from .release_converter import convert_release

    src = args.src
    if args.model_id:
        src = _fetch_release(args.model_id)
    elif src == "-":
        raise SystemExit("convert: SRC '-' needs --model-id")
    out = convert_release(
        src, args.dst, variant=args.variant, dtype=args.dtype, scheduler=args.scheduler,
        transformer=args.transformer, transformer_2=args.transformer_2, text_encoder=args.text_encoder,
        tokenizer=args.tokenizer, vae=args.vae, image_encoder=args.image_encoder,
        image_encoder_heads=args.image_encoder_heads, audio_encoder=args.audio_encoder,
        motion_controller=args.motion_controller, relighting_lora=args.relighting_lora,
        transformer_only=args.transformer_only, overwrite=args.overwrite,
    )
    print(f"converted -> {out}")
    if args.push_to_hub:
        print(f"uploaded -> {push_folder(out, args.push_to_hub, private=args.private)}")
    return 0


def cmd_relighting_lora(args) -> int:
    from .conversion.animate import convert_relighting_lora, save_relighting_lora
    from .conversion.release_io import DTYPES

    lora = convert_relighting_lora(args.src)
    path = save_relighting_lora(lora, args.dst, dtype=DTYPES[args.dtype] if args.dtype else None)
    print(f"converted {len(lora) // 2} LoRA pairs -> {path} (pipe.load_lora_weights({str(args.dst)!r}))")
    return 0


def cmd_add_motion_controller(args) -> int:
    from .families.speed_control import add_motion_controller

    out = add_motion_controller(args.folder, args.motion_controller, dtype=args.dtype)
    print(f"added motion_controller -> {out} (now a WanSpeedControlPipeline)")
    return 0


def cmd_export_dit(args) -> int:
    from safetensors.torch import save_file

    from .conversion.dit import export_dit_state_dict
    from .conversion.release_io import DTYPES
    from .utils.io import load_state_dict

    src = Path(args.src)
    if src.is_dir():
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

        index = src / (SAFETENSORS_WEIGHTS_NAME + ".index.json")
        sd = load_state_dict(index if index.exists() else src / SAFETENSORS_WEIGHTS_NAME)
    else:
        sd = load_state_dict(src)
    out = export_dit_state_dict(sd)
    if args.prefix:
        out = {args.prefix + k: v for k, v in out.items()}
    if args.dtype:
        dt = DTYPES[args.dtype]
        out = {k: v.to(dt) if v.is_floating_point() else v for k, v in out.items()}
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(args.dst) + ".partial")
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp))
    os.replace(tmp, args.dst)
    print(f"exported {len(out)} tensors -> {args.dst}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    path = run_demo(args.output, workdir=args.workdir, steps=args.steps, seed=args.seed)
    print(path)
    return 0


def _add_family_inputs(args, pipe, kw: dict) -> None:
    """The families' own ``generate`` options, checked against the loaded pipeline (e.g. Wan2.2-Animate's videos)."""
    from .families import FAMILIES

    for family in FAMILIES:
        given = {i.argument: getattr(args, i.argument) for i in family.generate_inputs
                 if getattr(args, i.argument, None) is not None}
        ours = any(isinstance(pipe, cls) for cls in family.pipeline_classes)
        if given and not ours:
            flags = "/".join(i.flag for i in family.generate_inputs if i.argument in given)
            raise SystemExit(f"generate: {flags} is for {family.title} folders; {args.model} is a "
                             f"{type(pipe).__name__}")
        if ours:
            family.prepare_generate(pipe, args.model, given, kw)


def cmd_generate(args) -> int:
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import load_image

    from .demo import write_video

    from .conversion.release_io import DTYPES
    from .families import FAMILIES

    dtype = DTYPES[args.dtype]
    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    upgrade = next((f.generate_pipeline[type(pipe).__name__] for f in FAMILIES
                    if type(pipe).__name__ in f.generate_pipeline), None)
    if upgrade is not None and not isinstance(pipe, upgrade):
        pipe = upgrade(**pipe.components)  # the family's pipeline for file inputs and input checks
    defaults = {}
    rec = Path(args.model) / "wan_variant.json"
    if rec.exists():
        defaults = json.loads(rec.read_text())
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.offload and device == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    kw = dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt,
        height=args.height or defaults.get("height", 480), width=args.width or defaults.get("width", 832),
        num_frames=args.num_frames or defaults.get("num_frames", 81),
        num_inference_steps=args.steps or defaults.get("num_inference_steps", 50),
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else defaults.get("guidance_scale", 5.0),
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    )
    from .utils.validation import validate_video_size

    validate_video_size(
        kw["height"], kw["width"], kw["num_frames"],
        spatial_factor=getattr(pipe, "vae_scale_factor_spatial", 8), temporal_factor=getattr(pipe, "vae_scale_factor_temporal", 4),
        patch=pipe.transformer.config.patch_size[1] if getattr(pipe, "transformer", None) is not None else 2,
    )
    if args.image:
        kw["image"] = load_image(args.image)
    if args.last_image:
        kw["last_image"] = load_image(args.last_image)
    _add_family_inputs(args, pipe, kw)
    frames = pipe(**kw).frames[0]
    out = write_video(frames, args.output, fps=args.fps or defaults.get("fps", 16))
    print(out.resolve())
    return 0


def cmd_lora(args) -> int:
    from .lora import convert_lora_state_dict, export_lora, load_lora_file, lora_info, save_lora_file

    if args.lora_command == "info":
        info = lora_info(load_lora_file(args.file), source=args.from_format)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(f"format: {info['format']} ({info['tensors']} tensors)")
        for comp, c in info["components"].items():
            alphas = ", ".join(f"{a:g}" for a in c["alphas"]) or "none (scale 1)"
            print(f"{comp}: {c['modules']} modules, rank {', '.join(map(str, c['ranks'])) or '-'}, alpha {alphas}, "
                  f"{c['bias']} bias deltas, {c['diff']} full-weight diffs, dtype {', '.join(c['dtypes'])}")
            print("  targets: " + ", ".join(c["targets"]))
        return 0
    sd = load_lora_file(args.src)
    if args.lora_command == "export":
        paths = export_lora(convert_lora_state_dict(sd, "diffusers", source=args.from_format), args.dst,
                            formats=args.formats)
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0
    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise SystemExit(f"lora convert: {dst} exists; pass --overwrite to replace it")
    out = convert_lora_state_dict(sd, args.to, source=args.from_format, transformer_name=args.component)
    if args.dtype:
        from .conversion.release_io import DTYPES

        dt = DTYPES[args.dtype]
        out = {k: v.to(dt) if v.is_floating_point() else v for k, v in out.items()}
    save_lora_file(out, dst)
    print(f"converted {len(sd)} -> {len(out)} tensors ({args.to}) -> {dst}")
    return 0


def _add_lora(sub):
    from .lora.formats import LORA_FORMATS

    p = sub.add_parser("lora", help="convert / inspect / export Wan LoRAs (Diffusers, original/ComfyUI, Kohya, "
                                     "DiffSynth)")
    lsub = p.add_subparsers(dest="lora_command", required=True)
    c = lsub.add_parser("convert", help="one LoRA file -> another format")
    c.add_argument("src", help="LoRA file (.safetensors / .pt / .bin) or a folder with "
                               "pytorch_lora_weights.safetensors")
    c.add_argument("dst", help="output file (.safetensors), written atomically")
    c.add_argument("--to", required=True, choices=LORA_FORMATS)
    c.add_argument("--from", dest="from_format", choices=LORA_FORMATS, help="source format (detected when omitted)")
    c.add_argument("--component", default="transformer", choices=["transformer", "transformer_2", "motion_controller"],
                   help="the pipeline component a single-model file (original/kohya/diffsynth) stands for; "
                        "transformer_2 = Wan2.2 A14B low-noise expert")
    c.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast the tensors (default: keep)")
    c.add_argument("--overwrite", action="store_true")
    i = lsub.add_parser("info", help="detected format, components, ranks, alphas and target modules of a LoRA")
    i.add_argument("file")
    i.add_argument("--from", dest="from_format", choices=LORA_FORMATS)
    i.add_argument("--json", action="store_true")
    e = lsub.add_parser("export", help="one LoRA -> a folder with every format (one file per component)")
    e.add_argument("src")
    e.add_argument("dst", help="output folder")
    e.add_argument("--from", dest="from_format", choices=LORA_FORMATS)
    e.add_argument("--formats", nargs="+", default=list(LORA_FORMATS), choices=LORA_FORMATS)


def cmd_variants(args) -> int:
    from .families import FAMILIES

    for family in FAMILIES:
        for v in family.variants:
            print(f"{v.name:24s} {v.arch:10s} {v.pipeline:24s} {v.release}")
    return 0


def _add_family_generate_options(p) -> None:
    from .families import FAMILIES

    for family in FAMILIES:
        for i in family.generate_inputs:
            if i.kind == "optional-path":  # a flag alone means the model folder's own file
                p.add_argument(i.flag, dest=i.argument, nargs="?", const="auto", help=i.help)
            else:
                p.add_argument(i.flag, dest=i.argument, type=int if i.kind == "int" else None, help=i.help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-wan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    p = sub.add_parser("add-motion-controller",
                       help="add the speed-control module to a converted Wan2.1-T2V-1.3B folder")
    p.add_argument("folder", help="converted Diffusers folder (Wan2.1 T2V)")
    p.add_argument("motion_controller", help="speed-control model.safetensors")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: the transformer's storage dtype")
    p = sub.add_parser("relighting-lora",
                       help="Wan2.2-Animate relighting_lora.ckpt -> Diffusers LoRA folder (load_lora_weights)")
    p.add_argument("src", help="relighting_lora.ckpt (PEFT state dict on the original module names)")
    p.add_argument("dst", help="output folder (pytorch_lora_weights.safetensors)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: as stored")
    p = sub.add_parser("export-dit", help="Diffusers transformer -> original Wan key layout (ComfyUI / LoRA interop)")
    p.add_argument("src", help="transformer folder or safetensors file in the Diffusers layout")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--prefix", default="", help="key prefix, e.g. 'model.diffusion_model.' for ComfyUI")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    p = sub.add_parser("demo", help="tiny release -> converter -> DiffusionPipeline -> mp4 (no downloads)")
    p.add_argument("--output", default="outputs/demo.mp4")
    p.add_argument("--workdir", help="keep the tiny release and converted folder here")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("generate", help="render a video with a converted model folder or Hub repo")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--image", help="first frame (I2V / FLF2V / TI2V)")
    p.add_argument("--last-image", help="last frame (FLF2V)")
    _add_family_generate_options(p)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-frames", type=int, help="4n + 1 (Wan2.2-Animate: frames per segment)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--fps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device")
    p.add_argument("--offload", action="store_true", help="model CPU offload (CUDA)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--output", default="outputs/video.mp4")
    sub.add_parser("variants", help="list the releases the converter knows")
    _add_lora(sub)
    return parser


COMMANDS = {"convert": cmd_convert, "add-motion-controller": cmd_add_motion_controller, "export-dit": cmd_export_dit, "demo": cmd_demo, "generate": cmd_generate,
            "variants": cmd_variants, "relighting-lora": cmd_relighting_lora, "lora": cmd_lora}


def main(argv: list[str] | None = None) -> int:
    from .utils.io import ConversionError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
