"""The trainer as users run it (``accelerate launch`` + the repo's accelerate configs): DeepSpeed ZeRO-2 with CPU
offload and ZeRO-3 for 1.3B full fine-tuning and a 14B LoRA, and the layer-offload modes of LoRA training
(issue 22 points 4 and 6): seconds per step and peak GPU memory.

Built on the machine (random weights, nothing downloaded):
  * a Diffusers Wan T2V folder: the release-size 1.3B transformer (bf16), the Wan2.1 VAE, a umT5 text encoder with
    the release width (4096) but one layer and a 256-token vocabulary (the text encoder is not what is measured),
    a tiny offline tokenizer; a release-size 14B transformer folder for ``--transformer_path``;
  * a dataset of one 81-frame 832x480 GIF clip (the GPU machine has no ffmpeg for mp4);
  * the cache of ``--task sft:data_process`` (VAE latents + prompt embeddings), then every run is
    ``--task sft:train`` at 480x832x81 (32 760 tokens), gradient checkpointing, ``--max_train_steps`` steps.
Each run: ``accelerate launch --config_file <config> --num_processes N train_step_probe.py <trainer args>``;
seconds per step = median time between consecutive ``Accelerator.backward`` calls after the first (which holds
the first optimizer step's allocations; all gaps are in ``step_seconds``), peak = the process's
``torch.cuda.max_memory_allocated`` (rank 0).

Runs (``--runs``, comma-separated names):
  full13-zero2off   1.3B full fine-tuning, deepspeed_zero2_offload.yaml (DeepSpeedCPUAdam, JIT-built)
  full13-zero3      1.3B full fine-tuning, deepspeed_zero3.yaml
  lora14-zero3      14B LoRA r32, deepspeed_zero3.yaml
  lora14-zero2off   14B LoRA r32, deepspeed_zero2_offload.yaml
  lora13            1.3B LoRA r32, single_gpu.yaml (plain)
  lora13-modeloff   + --enable_model_cpu_offload
  lora13-optoff     + --enable_model_cpu_offload --enable_optimizer_cpu_offload
  full13-ddp        1.3B full fine-tuning, multi_gpu.yaml on all GPUs (several GPUs only)

Usage (GPU machine): python bench_train_launch.py --runs full13-zero2off,full13-zero3,lora14-zero3
CPU smoke test:      python bench_train_launch.py --tiny --runs lora13   (tiny models, 9 frames 32x32, no DeepSpeed)
Writes bench_train_launch.json under $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "training" / "accelerate_configs"
sys.path.insert(0, str(REPO / "src"))

RUNS = {
    "full13-zero2off": ("deepspeed_zero2_offload.yaml", "1.3b", ["--trainable_models", "dit"]),
    "full13-zero3": ("deepspeed_zero3.yaml", "1.3b", ["--trainable_models", "dit"]),
    "lora14-zero3": ("deepspeed_zero3.yaml", "14b", ["--lora_base_model", "dit", "--lora_rank", "32"]),
    "lora14-zero2off": ("deepspeed_zero2_offload.yaml", "14b", ["--lora_base_model", "dit", "--lora_rank", "32"]),
    "lora13": ("single_gpu.yaml", "1.3b", ["--lora_base_model", "dit", "--lora_rank", "32"]),
    "lora13-modeloff": ("single_gpu.yaml", "1.3b", ["--lora_base_model", "dit", "--lora_rank", "32",
                                                     "--enable_model_cpu_offload"]),
    "lora13-optoff": ("single_gpu.yaml", "1.3b", ["--lora_base_model", "dit", "--lora_rank", "32",
                                                   "--enable_model_cpu_offload", "--enable_optimizer_cpu_offload"]),
    "full13-ddp": ("multi_gpu.yaml", "1.3b", ["--trainable_models", "dit"]),
}
TEXT_ENCODER = dict(vocab_size=256, d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=4,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                    tie_word_embeddings=False)


def dit_config(name: str) -> dict:
    from _common import DIT_CONFIGS

    if name == "tiny":
        return dict(DIT_CONFIGS["1.3b"], num_attention_heads=2, attention_head_dim=24, ffn_dim=96, num_layers=2)
    return DIT_CONFIGS[name]


def write_gif(path: Path, frames: int, height: int, width: int) -> None:
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    images = []
    for i in range(frames):
        img = np.stack([(xx * 255 // width + 3 * i) % 256, yy * 255 // height, np.full_like(xx, 40 + i)], axis=-1)
        images.append(Image.fromarray(img.astype(np.uint8)))
    images[0].save(path, save_all=True, append_images=images[1:], duration=62, loop=0)


def build_folders(work: Path, models: set[str], tiny: bool, device: str) -> dict[str, Path]:
    """The pipeline folder (with the 1.3B or tiny transformer) and a transformer folder per other model."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from diffusers_wan_ext.conversion.tokenizer import make_tiny_umt5_tokenizer

    torch.manual_seed(0)
    base = "tiny" if tiny else "1.3b"
    te_config = dict(TEXT_ENCODER, d_model=32 if tiny else 4096)
    with torch.device(device):
        transformer = WanTransformer3DModel(**dict(dit_config(base), text_dim=te_config["d_model"]))
        text_encoder = UMT5EncoderModel(UMT5Config(**te_config))
        vae = (AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True]) if tiny else AutoencoderKLWan())
    pipe = WanPipeline(tokenizer=make_tiny_umt5_tokenizer(tempfile.mkdtemp(), vocab_size=256),
                       text_encoder=text_encoder.to(torch.bfloat16), transformer=transformer.to(torch.bfloat16),
                       vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    folders = {base: work / "pipeline"}
    pipe.save_pretrained(folders[base])
    del pipe, transformer, text_encoder, vae
    for name in sorted(models - {base}):
        t0 = time.perf_counter()
        with torch.device(device):
            big = WanTransformer3DModel(**dit_config(name)).to(torch.bfloat16)
        folders[name] = work / f"transformer_{name}"
        big.save_pretrained(folders[name])
        del big
        print(f"wrote the {name} transformer folder in {time.perf_counter() - t0:.0f} s", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    return folders


def launch(config: str, script_args: list[str], probe_out: Path, processes: int, timeout: int) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", str(processes), "--num_machines", "1", str(Path(__file__).parent / "train_step_probe.py"),
           *script_args]
    env = dict(os.environ, TRAIN_PROBE_OUT=str(probe_out), HF_HUB_OFFLINE="1", NCCL_NVLS_ENABLE="0",
               TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out after {timeout} s\n{(exc.stdout or '')[-1500:]}{(exc.stderr or '')[-1500:]}"
    return proc.returncode, (proc.stdout + proc.stderr)[-4000:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="full13-zero2off,full13-zero3,lora14-zero3")
    parser.add_argument("--steps", type=int, default=4, help="--max_train_steps of each run (median of the gaps)")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per run")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, no DeepSpeed")
    args = parser.parse_args()
    runs = args.runs.split(",")
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"--runs: unknown {', '.join(unknown)} (choose from {', '.join(RUNS)})")
    device = "cpu" if args.tiny else "cuda"
    gpus = torch.cuda.device_count() if device == "cuda" else 1
    height, width, frames = (32, 32, 9) if args.tiny else (480, 832, 81)
    work = Path(tempfile.mkdtemp(prefix="train_launch_"))
    t0 = time.perf_counter()
    models = {"tiny"} if args.tiny else {RUNS[r][1] for r in runs}
    folders = build_folders(work, models, args.tiny, device)
    data = work / "data"
    data.mkdir()
    write_gif(data / "clip.gif", frames, height, width)
    (data / "metadata.csv").write_text("video,prompt\nclip.gif,a colorful gradient drifting to the right\n")
    size = ["--height", str(height), "--width", str(width), "--num_frames", str(frames), "--max_sequence_length",
            "16" if args.tiny else "512", "--report_to", "none"]
    if args.tiny:
        size += ["--dtype", "fp32"]
    pipeline = folders["tiny" if args.tiny else "1.3b"]
    cache = work / "cache"
    from diffusers_wan_ext.training import main as train_main

    train_main(["--task", "sft:data_process", "--dataset_base_path", str(data), "--dataset_metadata_path",
                str(data / "metadata.csv"), "--model_path", str(pipeline), *size, "--output_path", str(cache)])
    print(f"folders, dataset and cache ready in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for run in runs:
        config, model, extra = RUNS[run]
        processes = gpus if config == "multi_gpu.yaml" else 1
        if config == "multi_gpu.yaml" and gpus < 2:
            rows.append(dict(run=run, status="skipped: needs several GPUs"))
            continue
        if args.tiny:
            if "deepspeed" in config:
                rows.append(dict(run=run, status="skipped: DeepSpeed needs a GPU"))
                continue
            config = "single_gpu.yaml"
        probe = work / f"{run}.json"
        transformer = [] if model == "1.3b" or args.tiny else ["--transformer_path", str(folders[model])]
        script = ["--task", "sft:train", "--dataset_base_path", str(cache), "--model_path", str(pipeline),
                  *transformer, *size, *extra, "--use_gradient_checkpointing", "--learning_rate", "1e-5",
                  "--max_train_steps", str(args.steps), "--output_path", str(work / f"out_{run}"),
                  "--save_steps", "100000", "--dataset_repeat", "100"]
        if args.tiny:
            script = [a for a in script if a != "--use_gradient_checkpointing"]
            script = script + ["--lora_rank", "4"] if "--lora_rank" not in script else script
        t1 = time.perf_counter()
        code, tail = launch(config if not args.tiny else "single_gpu.yaml", script, probe, processes, args.timeout)
        row = dict(run=run, config=config, model=model, processes=processes, status="ok" if code == 0 else f"rc {code}",
                   wall_s=round(time.perf_counter() - t1, 1))
        if probe.is_file():
            rec = json.loads(probe.read_text())
            gaps = rec["step_seconds"]
            steady = sorted(gaps[1:] or gaps)  # the first gap holds the first optimizer step's allocations
            row.update(steps=rec["steps"], s_per_step=round(steady[len(steady) // 2], 3) if steady else None,
                       step_seconds=[round(x, 3) for x in gaps],
                peak_allocated_gib=round(rec.get("peak_allocated_gib", 0), 2),
                peak_reserved_gib=round(rec.get("peak_reserved_gib", 0), 2))
        if code != 0:
            row["log_tail"] = tail[-2500:]
        rows.append(row)
        print(json.dumps(row), flush=True)
        out = os.environ.get("OUT")
        if out:
            Path(out, "bench_train_launch.json").write_text(json.dumps({"rows": rows}, indent=1))
    for row in rows:
        print({k: v for k, v in row.items() if k != "log_tail"})


if __name__ == "__main__":
    main()
