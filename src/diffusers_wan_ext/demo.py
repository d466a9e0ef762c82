"""Tiny original-layout Wan releases with random weights, and the ``diffusers-wan demo`` job.

No weights can be downloaded in CI, so the demo builds a release folder exactly as Wan-AI ships one -- DiT
safetensors + ``config.json`` in the original key layout, ``models_t5_umt5-xxl-enc-bf16.pth``, ``Wan2.1_VAE.pth``
(or ``Wan2.2_VAE.pth``), the ``google/umt5-xxl`` tokenizer folder and, for I2V / FLF2V, the CLIP ``.pth`` -- only
tiny.  It then runs the real converter, loads the result with ``DiffusionPipeline.from_pretrained`` and renders an mp4.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from .conversion.audio_encoder import WAV2VEC_DIR
from .conversion.dit import export_dit_state_dict
from .conversion.image_encoder import export_clip_state_dict
from .conversion.text_encoder import export_t5_state_dict
from .conversion.tokenizer import make_tiny_umt5_tokenizer
from .conversion.vae import export_vae_state_dict
from .families import family_of_arch
from .families.animate import make_tiny_relighting_lora
from .families.longcat import TINY_LONGCAT, make_tiny_longcat_lora, make_tiny_longcat_release
from .families.s2v import make_tiny_wav2vec
from .families.speed_control import make_tiny_motion_controller
from .families.tiny import TINY, tiny_t5, tiny_vae21
from .release_converter import convert_release
from .utils.media import check_video_file, write_video

__all__ = [
    "WAV2VEC_DIR", "TINY", "TINY_LONGCAT", "check_video_file", "make_tiny_dataset", "make_tiny_longcat_lora",
    "make_tiny_longcat_release", "make_tiny_motion_controller", "make_tiny_release", "make_tiny_relighting_lora",
    "make_tiny_wav2vec", "prepare_training_demo", "run_demo", "write_video",
]

def _tiny_dit_state_dict(arch: str, text_len: int, generator: torch.Generator, experts: int = 1):
    """A tiny original-layout DiT of ``arch`` (its family builds the model), its original ``config.json`` and the
    family."""
    fam = family_of_arch(arch)
    a = fam.tiny_arch(arch, experts)
    kwargs = dict(
        num_attention_heads=TINY["num_heads"], attention_head_dim=TINY["dim"] // TINY["num_heads"],
        in_channels=a.in_dim, out_channels=a.out_dim, text_dim=TINY["text_dim"], freq_dim=TINY["freq_dim"],
        ffn_dim=TINY["ffn_dim"], num_layers=TINY["num_layers"], image_dim=TINY["clip_dim"] if a.clip else None,
        added_kv_proj_dim=TINY["dim"] if a.clip else None,
    )
    model, extra_config = fam.tiny_dit_model(arch, experts, kwargs)
    sd = {}
    for k, v in model.state_dict().items():
        std = 0.02 if v.ndim > 1 else 0.01
        if k.startswith("motion_encoder.") and v.ndim > 1:
            std = 1.0  # equalized-lr convs / linears scale by 1/sqrt(fan_in) at run time
        sd[k] = (torch.randn(v.shape, generator=generator) * std + (1.0 if "norm" in k and "weight" in k else 0.0))
    config = {
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": TINY["dim"], "eps": 1e-6,
        "ffn_dim": TINY["ffn_dim"], "freq_dim": TINY["freq_dim"], "in_dim": a.in_dim, "model_type": a.model_type,
        "num_heads": TINY["num_heads"], "num_layers": model.config.num_layers, "out_dim": a.out_dim,
        "text_len": text_len, **extra_config,
    }
    return export_dit_state_dict(sd), config, fam


def make_tiny_release(
    folder: str | os.PathLike,
    arch: str = "t2v",
    experts: int = 1,
    seed: int = 0,
    text_len: int = 512,
    with_image_encoder: bool | None = None,
) -> Path:
    """Write a tiny original-layout Wan release into ``folder`` and return it.

    Args:
        arch: an architecture some family declares a tiny DiT for (``FAMILIES[...].tiny_arches``: ``t2v``, ``i2v``,
            ``flf2v``, ``ti2v`` (Wan2.2 VAE), ``i2v-noclip``, ``fun-control``, ``fun-control-ref``, ``fun-camera``,
            ``vace``, ``animate``, ``s2v`` ...); the family adds its release's extra files (relighting LoRA, audio
            encoder folder ...).
        experts: 2 writes ``high_noise_model/`` + ``low_noise_model/`` (Wan2.2 A14B layout).
        text_len: the DiT's ``text_len`` (releases: 512).

    Example:
        >>> from diffusers_wan_ext.demo import make_tiny_release
        >>> path = make_tiny_release("/tmp/tiny-wan", arch="t2v")  # doctest: +SKIP
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dits = [folder] if experts == 1 else [folder / "high_noise_model", folder / "low_noise_model"]
    for d in dits:
        d.mkdir(parents=True, exist_ok=True)
        sd, cfg, fam = _tiny_dit_state_dict(arch, text_len, g, experts)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "diffusion_pytorch_model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        fam.tiny_release_files(folder, d, arch, sd, seed)

    t5 = tiny_t5()
    torch.save(export_t5_state_dict(t5.state_dict()), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    make_tiny_umt5_tokenizer(folder / "google" / "umt5-xxl", vocab_size=TINY["t5_vocab"])

    tiny = family_of_arch(arch).tiny_arch(arch, experts)
    if tiny.vae == "wan2.2":
        vae = AutoencoderKLWan(
            base_dim=TINY["vae_dim"], decoder_base_dim=TINY["vae_dim"], z_dim=48, dim_mult=[1, 2, 4, 4],
            num_res_blocks=2, temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
            out_channels=12, patch_size=2, scale_factor_spatial=16,
        )
        vae_name = "Wan2.2_VAE.pth"
    else:
        vae = tiny_vae21()
        vae_name = "Wan2.1_VAE.pth"
    torch.save(export_vae_state_dict(vae.state_dict()), folder / vae_name)

    if with_image_encoder if with_image_encoder is not None else tiny.clip:
        clip = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=TINY["clip_dim"], intermediate_size=4 * TINY["clip_dim"], num_hidden_layers=TINY["clip_layers"],
            num_attention_heads=TINY["clip_heads"], image_size=TINY["clip_image"], patch_size=14, hidden_act="gelu",
            layer_norm_eps=1e-5, projection_dim=16,
        ))
        torch.save(export_clip_state_dict(clip.state_dict()), folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    return folder


def make_tiny_dataset(
    folder: str | os.PathLike,
    num_videos: int = 2,
    num_images: int = 1,
    num_frames: int = 9,
    size: tuple[int, int] = (32, 32),
    control: bool = False,
    metadata: str = "metadata.csv",
    seed: int = 0,
) -> Path:
    """Write a tiny training dataset in DiffSynth-Studio's layout and return the metadata path.

    ``num_videos`` H.264 mp4 clips (a colored square moving over a gradient, ``num_frames`` frames of
    ``size = (height, width)``) and ``num_images`` png images, listed in ``metadata`` (``.csv``, ``.json`` or
    ``.jsonl``) with ``video,prompt`` columns; ``control=True`` adds ``control_video`` (the clip inverted) and
    ``reference_image`` (a png) columns.

    Example:
        >>> from diffusers_wan_ext.demo import make_tiny_dataset
        >>> meta = make_tiny_dataset("/tmp/tiny-data")  # doctest: +SKIP
    """
    import csv
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    rows = []
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    for i in range(num_videos + num_images):
        base = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), np.full_like(xx, 0.3, dtype=float)], -1)
        color = rng.uniform(0.2, 1.0, 3)
        frames = []
        for f in range(num_frames if i < num_videos else 1):
            img = base.copy()
            x0 = (2 * f + 3 * i) % max(w - h // 3, 1)
            img[h // 3: 2 * h // 3, x0: x0 + h // 3] = color
            frames.append(img)
        name = colors[i % len(colors)]
        row = {"prompt": f"a {name} square sliding over a gradient"}
        if i < num_videos:
            row["video"] = f"videos/clip_{i}.mp4"
            write_video(frames, folder / row["video"], fps=8)
            if control:
                row["control_video"] = f"control/clip_{i}.mp4"
                write_video([1.0 - fr for fr in frames], folder / row["control_video"], fps=8)
        else:
            row["video"] = f"images/image_{i}.png"
            (folder / "images").mkdir(exist_ok=True)
            Image.fromarray((frames[0] * 255).round().astype(np.uint8)).save(folder / row["video"])
            if control:
                row["control_video"] = f"control/image_{i}.png"
                (folder / "control").mkdir(exist_ok=True)
                Image.fromarray(((1 - frames[0]) * 255).round().astype(np.uint8)).save(folder / row["control_video"])
        if control:
            row["reference_image"] = "reference.png"
        rows.append(row)
    if control:
        Image.fromarray((rng.uniform(0, 1, (h, w, 3)) * 255).astype(np.uint8)).save(folder / "reference.png")
    path = folder / metadata
    columns = ["video", "prompt"] + (["control_video", "reference_image"] if control else [])
    if metadata.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif metadata.endswith(".json"):
        path.write_text(json.dumps(rows, indent=2))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return path


def prepare_training_demo(folder: str | os.PathLike) -> tuple[Path, Path]:
    """A tiny converted Wan2.1 T2V folder and a tiny dataset for ``scripts/train_demo.sh``; returns both paths.

    Example:
        >>> model, data = prepare_training_demo("/tmp/train-demo")  # doctest: +SKIP
    """
    folder = Path(folder)
    release = make_tiny_release(folder / "Wan2.1-T2V-tiny", arch="t2v")
    model = convert_release(release, folder / "Wan2.1-T2V-tiny-diffusers", dtype="fp32", overwrite=True,
                            progress=False)
    metadata = make_tiny_dataset(folder / "data")
    return model, metadata.parent


def run_demo(output: str | os.PathLike = "outputs/demo.mp4", workdir: str | os.PathLike | None = None,
             steps: int = 4, seed: int = 0) -> Path:
    """The main job on the built-in default: tiny release -> converter -> ``DiffusionPipeline`` -> mp4."""
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="diffusers-wan-demo-"))
    release = make_tiny_release(work / "Wan2.1-T2V-tiny", arch="t2v", seed=seed)
    print(f"built a tiny original-layout Wan2.1 T2V release at {release}")
    converted = convert_release(release, work / "Wan2.1-T2V-tiny-diffusers", dtype="fp32", overwrite=True)
    print(f"converted it to a Diffusers folder at {converted}")
    pipe = DiffusionPipeline.from_pretrained(str(converted), dtype=torch.float32)
    print(f"loaded {type(pipe).__name__} with DiffusionPipeline.from_pretrained")
    result = pipe(
        prompt="a tiny red fox running through snow", negative_prompt="blurry", height=64, width=64, num_frames=9,
        num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
        max_sequence_length=64,
    )
    out = write_video(result.frames[0], output, fps=16)
    return out.resolve()
