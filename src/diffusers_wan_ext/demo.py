"""Tiny original-layout Wan releases with random weights, and the ``diffusers-wan demo`` job.

No weights can be downloaded in CI, so the demo builds a release folder exactly as Wan-AI ships one -- DiT
safetensors + ``config.json`` in the original key layout, ``models_t5_umt5-xxl-enc-bf16.pth``, ``Wan2.1_VAE.pth``
(or ``Wan2.2_VAE.pth``), the ``google/umt5-xxl`` tokenizer folder and, for I2V / FLF2V, the CLIP ``.pth`` -- only
tiny.  It then runs the real converter, loads the result with ``DiffusionPipeline.from_pretrained`` and renders an mp4.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from .conversion.audio_encoder import WAV2VEC_DIR
from .conversion.dit import export_dit_state_dict
from .conversion.image_encoder import export_clip_state_dict
from .conversion.longcat import LORA_HYPHEN, LORA_PREFIX, export_longcat_state_dict
from .conversion.text_encoder import export_t5_state_dict
from .conversion.tokenizer import make_tiny_umt5_tokenizer
from .conversion.vae import export_vae_state_dict
from .families import family_of_arch
from .families.animate import make_tiny_relighting_lora
from .families.s2v import make_tiny_wav2vec
from .families.speed_control import make_tiny_motion_controller
from .models.transformer_longcat import LongCatVideoTransformer3DModel, longcat_ffn_dim
from .release_converter import convert_release

__all__ = [
    "WAV2VEC_DIR", "TINY", "TINY_LONGCAT", "make_tiny_dataset", "make_tiny_longcat_lora", "make_tiny_longcat_release",
    "make_tiny_motion_controller", "make_tiny_release", "make_tiny_relighting_lora", "make_tiny_wav2vec",
    "prepare_training_demo", "run_demo",
]

# Widths of the tiny releases (structure is real: depths, patching, RoPE split, token counts).
TINY = dict(
    dim=48, num_heads=2, ffn_dim=96, num_layers=2, freq_dim=32, text_dim=32, clip_dim=32, clip_layers=3,
    clip_heads=2, clip_image=224, t5_vocab=256, vae_dim=8,
)


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


def _tiny_t5():
    """A tiny umT5 encoder (width ``TINY["text_dim"]``, vocabulary ``TINY["t5_vocab"]``)."""
    return UMT5EncoderModel(UMT5Config(
        vocab_size=TINY["t5_vocab"], d_model=TINY["text_dim"], d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False,
    )).eval()


def _tiny_vae21():
    """A tiny Wan2.1 VAE (real structure and latent statistics, width ``TINY["vae_dim"]``)."""
    return AutoencoderKLWan(base_dim=TINY["vae_dim"], z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                            temperal_downsample=[False, True, True]).eval()


#: Original ``dit/config.json`` fields of the tiny LongCat-Video DiT (release: hidden 4096, depth 48, 32 heads,
#: caption 4096, adaLN 512, frequency 256).
TINY_LONGCAT = dict(
    in_channels=16, out_channels=16, hidden_size=48, depth=2, num_heads=2, caption_channels=TINY["text_dim"],
    mlp_ratio=4, adaln_tembed_dim=32, frequency_embedding_size=32, patch_size=[1, 2, 2], enable_flashattn3=False,
    enable_flashattn2=True, enable_xformers=False, enable_bsa=False, cp_split_hw=None, text_tokens_zero_pad=True,
)


#: Modules of the tiny original-format LoRA (module, number of up blocks: the fused projections get one per part).
TINY_LONGCAT_LORA_TARGETS = (
    ("blocks.{i}.attn.qkv", 3), ("blocks.{i}.attn.proj", 1), ("blocks.{i}.cross_attn.kv_linear", 2),
    ("blocks.{i}.cross_attn.q_linear", 1), ("blocks.{i}.ffn.w1", 1), ("blocks.{i}.ffn.w2", 1),
    ("blocks.{i}.adaLN_modulation.1", 1), ("final_layer.linear", 1),
)


def make_tiny_longcat_lora(dit_state_dict: dict, rank: int = 4, seed: int = 0, alpha_scale: float = 0.5,
                           fused_single_up: bool = False) -> dict:
    """A LoRA in the original LongCat-Video format (``lora_utils.LoRANetwork`` state dict) for an original-layout
    DiT state dict: ``lora_down`` / ``lora_up`` (or ``lora_up.blocks.N`` for fused projections) and
    ``alpha_scale``.  ``fused_single_up`` gives fused projections one up matrix instead of one block per part."""
    g = torch.Generator().manual_seed(seed)
    depth = len({k.split(".")[1] for k in dit_state_dict if k.startswith("blocks.")})
    out = {}
    for template, parts in TINY_LONGCAT_LORA_TARGETS:
        for i in range(depth) if "{i}" in template else [None]:
            module = template.format(i=i)
            w = dit_state_dict[module + ".weight"]
            name = LORA_PREFIX + module.replace(".", LORA_HYPHEN)
            n = 1 if fused_single_up else parts
            out[f"{name}.lora_down.weight"] = torch.randn(n * rank, w.shape[1], generator=g) * 0.1
            if n == 1:
                out[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
            else:
                for b in range(n):
                    out[f"{name}.lora_up.blocks.{b}.weight"] = torch.randn(w.shape[0] // n, rank, generator=g) * 0.1
            out[f"{name}.alpha_scale"] = torch.tensor(alpha_scale)
    return out


def make_tiny_longcat_release(folder: str | os.PathLike, seed: int = 0, layout: str = "release",
                              shards: int = 1) -> Path:
    """Write a tiny meituan-longcat/LongCat-Video release (original ``dit/`` key layout) into ``folder``.

    Args:
        layout: ``"release"`` -- the Hub folders ``dit/``, ``vae/`` (Diffusers), ``text_encoder/`` (Transformers),
            ``tokenizer/``, ``scheduler/``, ``lora/cfg_step_lora.safetensors`` (original LoRA format); ``"wan"`` --
            ``dit/`` with the Wan2.1 files DiffSynth-Studio pairs it
            with (``models_t5_umt5-xxl-enc-bf16.pth``, ``Wan2.1_VAE.pth``, ``google/umt5-xxl/``).
        shards: split the DiT into this many safetensors shards plus an index, as the release does.

    Example:
        >>> path = make_tiny_longcat_release("/tmp/tiny-longcat")  # doctest: +SKIP
    """
    if layout not in ("release", "wan"):
        raise ValueError(f"layout must be 'release' or 'wan'; got {layout!r}")
    folder = Path(folder)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c = TINY_LONGCAT
    model = LongCatVideoTransformer3DModel(
        patch_size=tuple(c["patch_size"]), num_attention_heads=c["num_heads"],
        attention_head_dim=c["hidden_size"] // c["num_heads"], in_channels=c["in_channels"],
        out_channels=c["out_channels"], num_layers=c["depth"], text_dim=c["caption_channels"],
        freq_dim=c["frequency_embedding_size"], time_embed_dim=c["adaln_tembed_dim"],
        ffn_dim=longcat_ffn_dim(c["hidden_size"], c["mlp_ratio"]),
    )
    sd = {}
    for k, v in model.state_dict().items():
        std = 0.05 if v.ndim > 1 else 0.02
        sd[k] = torch.randn(v.shape, generator=g) * std + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
    sd = export_longcat_state_dict(sd)
    dit = folder / "dit"
    dit.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    if shards == 1:
        save_file({k: sd[k].contiguous() for k in keys}, str(dit / "diffusion_pytorch_model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: sd[k].contiguous() for k in part}, str(dit / name))
            weight_map.update(dict.fromkeys(part, name))
        index = {"metadata": {"total_size": sum(v.numel() * 4 for v in sd.values())}, "weight_map": weight_map}
        (dit / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dit / "config.json").write_text(json.dumps(
        {"_class_name": "LongCatVideoTransformer3DModel", "_diffusers_version": "0.32.0", **c}, indent=2))

    t5, vae = _tiny_t5(), _tiny_vae21()
    if layout == "release":
        t5.save_pretrained(folder / "text_encoder")
        vae.save_pretrained(folder / "vae")
        make_tiny_umt5_tokenizer(folder / "tokenizer", vocab_size=TINY["t5_vocab"])
        FlowMatchEulerDiscreteScheduler(shift=12.0).save_pretrained(folder / "scheduler")
        (folder / "lora").mkdir(exist_ok=True)
        save_file(make_tiny_longcat_lora(sd, seed=seed + 1), str(folder / "lora" / "cfg_step_lora.safetensors"))
    else:
        torch.save(export_t5_state_dict(t5.state_dict()), folder / "models_t5_umt5-xxl-enc-bf16.pth")
        torch.save(export_vae_state_dict(vae.state_dict()), folder / "Wan2.1_VAE.pth")
        make_tiny_umt5_tokenizer(folder / "google" / "umt5-xxl", vocab_size=TINY["t5_vocab"])
    return folder


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
        arch: ``t2v``, ``i2v``, ``flf2v``, ``ti2v`` (Wan2.2 VAE), ``i2v-noclip`` (Wan2.2 I2V-A14B style), or a
            conditioning variant: ``fun-control`` (Wan2.1 Fun-Control), ``fun-control-ref`` (Fun-V1.1-Control;
            with ``experts=2`` Wan2.2-Fun-A14B-Control), ``fun-camera`` (Fun-V1.1-Control-Camera; with
            ``experts=2`` Wan2.2-Fun-A14B-Control-Camera), ``vace`` (Wan2.1-VACE; ``experts=2``: Wan2.2-VACE-Fun),
            ``animate`` (Wan2.2-Animate-14B: DiT + Animate adapter in one file, CLIP, ``relighting_lora.ckpt``),
            ``s2v`` (Wan2.2-S2V-14B, with its ``wav2vec2-large-xlsr-53-english/`` audio encoder folder).
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

    t5 = _tiny_t5()
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
        vae = _tiny_vae21()
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


def write_video(frames, path: str | os.PathLike, fps: int = 16) -> Path:
    """Write frames (list of PIL images, or a float array [F, H, W, 3] in [0, 1]) to an H.264 mp4 via imageio-ffmpeg."""
    import imageio.v2 as imageio
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrs = []
    for f in frames:
        a = np.asarray(f)
        if a.dtype != np.uint8:
            a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
        arrs.append(a)
    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=8, macro_block_size=1,
                            ffmpeg_log_level="error") as w:
        for a in arrs:
            w.append_data(a)
    return path


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
    import tempfile

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
