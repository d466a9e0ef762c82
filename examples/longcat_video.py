"""LongCat-Video (meituan-longcat/LongCat-Video): text-to-video, then continue the video, with a converted folder.

Convert the release once (its dit/ is converted; vae/, text_encoder/, tokenizer/, scheduler/ are kept; the LoRAs in
lora/ are written in the Diffusers format):

    diffusers-wan convert /ckpt/LongCat-Video /ckpt/LongCat-Video-diffusers --dtype bf16

then:

    python examples/longcat_video.py /ckpt/LongCat-Video-diffusers "a white boy feeds ice cream to a labrador" \
        --output longcat.mp4 --continue-prompt "the dog licks the boy's hand" --segments 2
    python examples/longcat_video.py /ckpt/LongCat-Video-diffusers "..." --video input.mp4   # continue a video
    python examples/longcat_video.py /ckpt/LongCat-Video-diffusers "..." --distill             # 16 steps, no CFG

Without a model folder (or with --tiny) it builds a tiny random-weight release, converts it and runs on the CPU, so
the script itself can be checked anywhere.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video, load_video

import diffusers_wan_ext  # noqa: F401  (registers LongCatVideoPipeline with Diffusers)


def _tiny_folder() -> str:
    from diffusers_wan_ext.release_converter import convert_release
    from diffusers_wan_ext.demo import make_tiny_longcat_release

    work = Path(tempfile.mkdtemp(prefix="longcat-tiny-"))
    release = make_tiny_longcat_release(work / "LongCat-Video-tiny")
    return str(convert_release(release, work / "LongCat-Video-tiny-diffusers", dtype="fp32", progress=False))


def main(argv=None):
    parser = argparse.ArgumentParser(description="LongCat-Video: text-to-video and video continuation.")
    parser.add_argument("model", nargs="?", help="converted LongCat-Video folder (model_index.json: LongCatVideoPipeline)")
    parser.add_argument("prompt", nargs="?", default="a red fox runs through fresh snow, cinematic")
    parser.add_argument("--negative-prompt", default="Bright tones, overexposed, static, blurred details, subtitles, "
                        "worst quality, low quality, JPEG compression residue, ugly, deformed")
    parser.add_argument("--video", help="continue this video (mp4 / gif / frame folder) instead of starting from text")
    parser.add_argument("--continue-prompt", help="prompt of the continuation segments (default: the prompt)")
    parser.add_argument("--segments", type=int, default=1, help="segments to generate (each continues the last)")
    parser.add_argument("--num-cond-frames", type=int, default=13, help="frames each continuation conditions on (4n+1)")
    parser.add_argument("--output", default="longcat_video.mp4")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=93, help="frames per segment (4n + 1), incl. conditioning")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--distill", action="store_true",
                        help="load lora/cfg_step_lora.safetensors: 16 steps, guidance 1, the distilled schedule")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight model on the CPU (smoke test)")
    args = parser.parse_args(argv)

    tiny = args.tiny or args.model is None
    if tiny:
        model, dtype = _tiny_folder(), torch.float32
        args.height, args.width, args.num_frames, args.steps = 32, 32, 9, 2
        args.num_cond_frames = min(args.num_cond_frames, 5)
    else:
        model, dtype = args.model, torch.bfloat16
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    if torch.cuda.is_available() and not tiny:
        pipe.enable_model_cpu_offload()
        pipe.set_attention_backend("auto")  # fastest installed exact attention kernel
    sampling = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    if args.distill:
        pipe.load_lora_weights(str(Path(model) / "lora"), weight_name="cfg_step_lora.safetensors", adapter_name="distill")
        sampling = dict(num_inference_steps=16 if not tiny else 2, guidance_scale=1.0, use_distill=True)
    common = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                  num_frames=args.num_frames, output_type="np", **sampling)

    generator = torch.Generator().manual_seed(args.seed)
    if args.video:  # frames as float arrays [H, W, 3] in [0, 1], like the pipeline's "np" output
        size = (args.width, args.height)
        frames = [np.asarray(f.convert("RGB").resize(size), dtype=np.float32) / 255 for f in load_video(args.video)]
    else:  # text-to-video first segment
        frames = list(pipe(args.prompt, generator=generator, **common).frames[0])
    k = args.num_cond_frames
    for _ in range(args.segments if args.video else args.segments - 1):
        out = pipe(args.continue_prompt or args.prompt, video=np.stack(frames[-k:]), generator=generator,
                   **common).frames[0]
        frames += list(out[k:])  # the output starts with the (VAE-reconstructed) conditioning frames
    print(export_to_video(frames, args.output, fps=args.fps))


if __name__ == "__main__":
    main()
