"""Wan2.2-S2V-14B: a reference image speaks or sings an audio track, clip after clip, as long as the audio lasts.

Convert the release once (the ``wav2vec2-large-xlsr-53-english/`` audio encoder is converted along with it):

    diffusers-wan convert /ckpt/Wan2.2-S2V-14B /ckpt/Wan2.2-S2V-14B-diffusers

Then:

    python examples/speech_to_video.py /ckpt/Wan2.2-S2V-14B-diffusers person.png speech.wav "a person is singing" \
        --output s2v.mp4
    python examples/speech_to_video.py ... --pose-video pose.mp4       # pose-driven
    python examples/speech_to_video.py ... --motion-video previous.mp4 # continue an earlier video

The audio is muxed into the output (ffmpeg of imageio-ffmpeg).  ``--num-clips`` caps the length; by default every
clip the audio spans is generated (80 frames = 5 s per clip at 16 fps).
"""

import argparse
import os
import subprocess
import tempfile

import torch
from diffusers.utils import export_to_video, load_image

from diffusers_wan_ext import WanSpeechToVideoPipeline

# the release's negative prompt (wan/configs/wan_s2v_14B.py)
NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def mux_audio(video_path: str, audio_path: str, output: str) -> str:
    """Put ``audio_path`` under ``video_path`` (the video stream is copied; the output ends with the shorter one)."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", video_path, "-i", audio_path, "-map", "0:v",
           "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-shortest", output]
    subprocess.run(cmd, check=True)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description="Wan2.2-S2V: speech / song to video from a reference image.")
    parser.add_argument("model", help="converted Wan2.2-S2V folder (model_index.json: WanSpeechToVideoPipeline)")
    parser.add_argument("image", help="reference image (path or URL)")
    parser.add_argument("audio", help="audio file (wav, mp3, ...; resampled to 16 kHz)")
    parser.add_argument("prompt")
    parser.add_argument("--negative-prompt", default=NEGATIVE_PROMPT)
    parser.add_argument("--pose-video", help="pose video (mp4) that drives the body")
    parser.add_argument("--motion-video", help="earlier video to continue (its last 73 frames)")
    parser.add_argument("--output", default="s2v.mp4")
    parser.add_argument("--height", type=int, default=448)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames-per-clip", type=int, default=80, help="multiple of 4")
    parser.add_argument("--num-clips", type=int, help="at most this many clips (default: as long as the audio)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args(argv)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pipe = WanSpeechToVideoPipeline.from_pretrained(args.model, torch_dtype=dtype)
    if pipe.audio_encoder is not None:
        pipe.audio_encoder.to(torch.float32)  # the original runs wav2vec2 in float32
    if torch.cuda.is_available():
        pipe.enable_model_cpu_offload()
    video = pipe(
        image=load_image(args.image),
        audio=args.audio,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        pose_video=args.pose_video,
        motion_video=args.motion_video,
        height=args.height,
        width=args.width,
        num_frames_per_clip=args.frames_per_clip,
        num_clips=args.num_clips,
        fps=args.fps,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).frames[0]
    with tempfile.TemporaryDirectory() as tmp:
        silent = export_to_video(video, os.path.join(tmp, "video.mp4"), fps=args.fps)
        print(mux_audio(silent, args.audio, args.output))


if __name__ == "__main__":
    main()
