"""``diffusers-wan convert``: an original release (folder, files or a Hub / ModelScope id) -> a Diffusers folder."""

from __future__ import annotations

import argparse
import os

from ..release_converter import convert_release
from ..utils.atomic import claim_destination

__all__ = ["cmd_convert", "fetch_release", "push_folder"]


def fetch_release(model_id: str, cache_dir: str | None = None) -> str:
    """Download an original release (ModelScope when installed, else the Hugging Face Hub); returns its folder."""
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
    api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                      commit_message="Upload Wan model converted with diffusers_wan_ext")
    return str(url)


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert (the detected release and the files used are printed to stderr before loading)."""
    if args.src == "-" and not args.model_id:
        raise ValueError("convert: SRC '-' needs --model-id")
    with claim_destination(args.dst, overwrite=args.overwrite):  # before a download: DST is checked and claimed
        src = fetch_release(args.model_id) if args.model_id else args.src
        out = convert_release(
            src, args.dst, variant=args.variant, dtype=args.dtype, scheduler=args.scheduler,
            transformer=args.transformer, transformer_2=args.transformer_2, text_encoder=args.text_encoder,
            tokenizer=args.tokenizer, vae=args.vae, image_encoder=args.image_encoder,
            image_encoder_heads=args.image_encoder_heads, audio_encoder=args.audio_encoder,
            motion_controller=args.motion_controller, relighting_lora=args.relighting_lora,
            transformer_only=args.transformer_only, overwrite=args.overwrite, progress=True,
        )
    print(f"converted -> {out}")
    if args.push_to_hub:
        print(f"uploaded -> {push_folder(out, args.push_to_hub, private=args.private)}")
    return 0
