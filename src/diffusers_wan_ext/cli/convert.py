"""``diffusers-wan convert``: an original release (folder, files or a Hub / ModelScope id) -> a Diffusers folder."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..conversion.quantized_dit import QUANTIZED_FOLDER_NOTE, check_fp8_storage, is_single_file
from ..families import FAMILIES
from ..release_converter import convert_release
from ..utils.atomic import claim_destination
from ..utils.io import ConversionError, check_weights_file, one_line
from ..utils.single_file import holds_quantized_weights

__all__ = ["cmd_convert", "fetch_release", "push_folder"]


def fetch_release(model_id: str, cache_dir: str | None = None) -> str:
    """Download an original release (ModelScope when installed, else the Hugging Face Hub); returns its folder."""
    try:
        try:
            from modelscope import snapshot_download as ms_download  # type: ignore

            return ms_download(model_id, cache_dir=cache_dir)
        except ImportError:
            from huggingface_hub import snapshot_download

            return snapshot_download(model_id, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown repo, no access: the id the user gave is the cause
        raise ConversionError(f"--model-id {model_id}: cannot download it: {one_line(e)}") from e


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload a converted folder (it already carries a model card) to the Hub and return the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                      commit_message="Upload Wan model converted with diffusers_wan_ext")
    return str(url)


#: the families' extra component options (``ModelFamily.convert_inputs``: ``--audio-encoder`` ...)
FAMILY_OPTIONS = tuple(i for f in FAMILIES for i in f.convert_inputs)
#: the component options of ``convert`` that name a file or folder
PATH_OPTIONS = ("transformer", "transformer_2", "text_encoder", "tokenizer", "vae", "image_encoder",
                *(i.argument for i in FAMILY_OPTIONS))
#: those that name a folder, and those that name one file
FOLDER_OPTIONS = ("tokenizer", *(i.argument for i in FAMILY_OPTIONS if i.kind == "folder"))
FILE_OPTIONS = ("text_encoder", "vae", "image_encoder", *(i.argument for i in FAMILY_OPTIONS if i.kind == "file"))


def check_keep_quantized_arguments(args: argparse.Namespace) -> None:
    """``--keep-quantized`` needs the DiT(s) as GGUF / fp8 single files (``--transformer`` or SRC itself)."""
    if args.model_id:
        raise ValueError("convert: --keep-quantized keeps a GGUF / fp8 single-file DiT quantized; a downloaded "
                         "release (--model-id) holds none")
    for name in ("transformer", "transformer_2"):
        path = getattr(args, name, None)
        flag = f"--{name.replace('_', '-')}"
        if path is not None and os.path.exists(path) and not is_single_file(path):
            raise ValueError(f"convert: --keep-quantized needs {flag} as a .gguf / .safetensors single file, "
                             f"got {path}")
        if path is not None and is_single_file(path) and not holds_quantized_weights(path):
            raise ValueError(f"convert: --keep-quantized: {flag} {path} holds no GGUF / fp8 weights to keep")


def check_convert_arguments(args: argparse.Namespace) -> None:
    """The user's mistakes ``convert`` can see before reading a byte: each one raises naming its argument."""
    if args.src == "-" and not args.model_id:
        raise ValueError("convert: SRC '-' needs --model-id")
    if args.model_id and args.src != "-":
        raise ValueError(f"convert: --model-id {args.model_id} downloads the release, so SRC must be '-' "
                         f"(got {args.src!r})")
    if args.private and not args.push_to_hub:
        raise ValueError("convert: --private applies to --push-to-hub REPO, which is not given")
    if getattr(args, "fp8_storage", None) and not getattr(args, "keep_quantized", False):
        raise ValueError("convert: --fp8-storage applies to --keep-quantized, which is not given")
    if getattr(args, "keep_quantized", False):
        check_keep_quantized_arguments(args)
        check_fp8_storage(getattr(args, "fp8_storage", None) or "layerwise")
    if args.image_encoder_heads is not None and args.image_encoder_heads < 1:
        raise ValueError(f"convert: --image-encoder-heads must be a positive integer, got {args.image_encoder_heads}")
    for name in PATH_OPTIONS:
        path = getattr(args, name, None)
        flag = "--" + name.replace("_", "-")
        if path is not None and not os.path.exists(path):
            raise ConversionError(f"{flag} {path}: no such file or folder")
        if path is not None and name in FOLDER_OPTIONS and not os.path.isdir(path):
            raise ConversionError(f"{flag} {path}: not a folder (pass the folder itself)")
        if path is not None and name in FILE_OPTIONS:
            check_weights_file(path)  # a regular, complete weights file (header only; a FIFO never blocks)
    if args.src != "-":
        src, dst = Path(args.src).resolve(), Path(args.dst).resolve()
        if src.is_dir() and (dst == src or src in dst.parents):
            raise ValueError(f"convert: DST {args.dst} is inside SRC {args.src}; write the converted folder "
                             "elsewhere (a later conversion of SRC would find its files)")


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert (the detected release and the files used are printed to stderr before loading)."""
    check_convert_arguments(args)
    with claim_destination(args.dst, overwrite=args.overwrite):  # before a download: DST is checked and claimed
        src = fetch_release(args.model_id) if args.model_id else args.src
        out = convert_release(
            src, args.dst, variant=args.variant, dtype=args.dtype, scheduler=args.scheduler,
            transformer=args.transformer, transformer_2=args.transformer_2, text_encoder=args.text_encoder,
            tokenizer=args.tokenizer, vae=args.vae, image_encoder=args.image_encoder,
            image_encoder_heads=args.image_encoder_heads,
            **{i.argument: getattr(args, i.argument) for i in FAMILY_OPTIONS}, transformer_only=args.transformer_only, overwrite=args.overwrite, progress=True,
            keep_quantized=getattr(args, "keep_quantized", False),
            fp8_storage=getattr(args, "fp8_storage", None) or "layerwise",
        )
    print(f"converted -> {out}")
    for note in sorted(Path(out).glob(f"**/{QUANTIZED_FOLDER_NOTE}")):
        print(f"kept quantized: {note.parent} (load: {json.loads(note.read_text())['load']})")
    if args.push_to_hub:
        print(f"uploaded -> {push_folder(out, args.push_to_hub, private=args.private)}")
    return 0
