"""Wan2.2-Dancer-14B: a dance video of a reference image, driven by music -- keyframes, then 30-fps segments.

Convert the release once (``global_model.safetensors`` + ``local_model.safetensors`` become ``transformer`` and
``transformer_2`` of one folder; the umT5 tokenizer is Wan-AI/Wan2.1-T2V-1.3B's ``google/umt5-xxl``):

    diffusers-wan convert /ckpt/Wan-Dancer-14B /ckpt/Wan-Dancer-14B-diffusers --tokenizer /ckpt/umt5-xxl

Then (the music features need librosa: pip install librosa):

    python examples/wan_dancer.py /ckpt/Wan-Dancer-14B-diffusers dancer.jpg music.wav --output dance.mp4

The global model makes keyframes at 7.5 fps for the music's length (``--duration`` caps it), the local model renders
30-fps segments through them; the music is muxed into the 30-fps mp4 (ffmpeg of imageio-ffmpeg).

Without a model folder (or with --tiny) it builds a tiny random-weight release, converts it, writes a reference image
and a short wav if none are given, and runs on the CPU, so the script itself can be checked anywhere (without
librosa the tiny run uses stand-in music features, and says so):

    python examples/wan_dancer.py --tiny --output dance_tiny.mp4
"""

import argparse
import importlib.util
import os
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import export_to_video, load_image
from PIL import Image

from diffusers_wan_ext import WanDancerPipeline

# DiffSynth-Studio's Wan-Dancer examples: the prompt names the dance style and the frame rate of each stage
PROMPT = "一个人正在跳舞，舞蹈种类是韩舞。帧率是7.5000"
LOCAL_PROMPT = "一个人正在跳舞，舞蹈种类是韩舞,图像清晰程度高,人物动作平均幅度中等,人物动作最大幅度中等。, 帧率是30fps。"
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


def mux_audio(video_path: str, audio_path: str, output: str) -> str:
    """Put ``audio_path`` under ``video_path`` (the video stream is copied; the output ends with the shorter one)."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", video_path, "-i", audio_path, "-map", "0:v",
           "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-shortest", output]
    subprocess.run(cmd, check=True)
    return output


def _write_wav(path: Path, seconds: float, rate: int = 22050) -> str:
    """A beat-like tone (16-bit mono wav)."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0) + 0.1 * np.sin(2 * np.pi * 660 * t)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.round(x * 32767).astype("<i2").tobytes())
    return str(path)


def _tiny_inputs(args) -> torch.Tensor | None:
    """A tiny converted Wan-Dancer folder (both stages), a reference image and a 0.6 s wav when not given; stand-in
    music features ``[frames, 35]`` when librosa is not installed (else ``None``: the real features)."""
    from diffusers_wan_ext.demo import TINY, make_tiny_release
    from diffusers_wan_ext.release_converter import convert_release

    work = Path(tempfile.mkdtemp(prefix="wan-dancer-tiny-"))
    release = make_tiny_release(work / "Wan-Dancer-14B-tiny", arch="dancer")
    args.model = str(convert_release(release, work / "Wan-Dancer-14B-tiny-diffusers", dtype="fp32", progress=False,
                                     image_encoder_heads=TINY["clip_heads"]))
    # 32 x 64: 8 tokens per latent frame, a multiple of the 8 music tokens per frame; 9-frame 30-fps segments
    args.height, args.width, args.segment_frames, args.steps, args.local_steps, args.dtype = 32, 64, 9, 1, 1, "fp32"
    if args.image is None:
        args.image = str(work / "dancer.png")
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(args.image)
    if args.music is None:
        args.music = _write_wav(work / "music.wav", 0.6)
    if importlib.util.find_spec("librosa") is not None:
        return None
    with wave.open(args.music, "rb") as w:
        frames = int(w.getnframes() / w.getframerate() * 30) + 1
    print("librosa is not installed: the tiny run uses stand-in music features (pip install librosa for real ones)")
    return torch.linspace(-1, 1, frames * 35).reshape(frames, 35)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Wan2.2-Dancer: music + reference image -> dance video.")
    parser.add_argument("model", nargs="?", help="converted Wan-Dancer folder (model_index.json: WanDancerPipeline)")
    parser.add_argument("image", nargs="?", help="reference image of the dancer (path or URL)")
    parser.add_argument("music", nargs="?", help="music file (wav, mp3, ...)")
    parser.add_argument("--prompt", default=PROMPT, help="prompt of the keyframe stage")
    parser.add_argument("--local-prompt", default=LOCAL_PROMPT, help="prompt of the 30-fps stage")
    parser.add_argument("--negative-prompt", default=NEGATIVE_PROMPT)
    parser.add_argument("--output", default="dance.mp4")
    parser.add_argument("--height", type=int, default=1280)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--duration", type=float, help="seconds to dance (default: the whole music)")
    parser.add_argument("--segment-frames", type=int, default=149, help="frames per 30-fps segment (4k + 1)")
    parser.add_argument("--steps", type=int, default=48, help="keyframe-stage steps")
    parser.add_argument("--local-steps", type=int, default=24, help="30-fps-stage steps")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight model on the CPU (smoke test)")
    args = parser.parse_args(argv)
    tiny = args.tiny or args.model is None
    features = _tiny_inputs(args) if tiny else None
    if not tiny and (args.image is None or args.music is None):
        parser.error("give the reference image and the music file after the model folder")

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pipe = WanDancerPipeline.from_pretrained(args.model, dtype=dtype)
    if torch.cuda.is_available() and not tiny:
        pipe.enable_model_cpu_offload()
    video = pipe(
        image=load_image(args.image),
        music=args.music if features is None else None,
        music_features=features,
        prompt=args.prompt,
        local_prompt=args.local_prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        duration=args.duration,
        segment_frames=args.segment_frames,
        num_inference_steps=args.steps,
        local_num_inference_steps=args.local_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).frames[0]
    fps = 30 if pipe.transformer_2 is not None else 7.5 / 4  # one frame per keyframe without the local model
    with tempfile.TemporaryDirectory() as tmp:
        silent = export_to_video(video, os.path.join(tmp, "video.mp4"), fps=fps)
        print(mux_audio(silent, args.music, args.output))


if __name__ == "__main__":
    main()
