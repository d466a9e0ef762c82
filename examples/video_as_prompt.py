"""Video-As-Prompt (ByteDance/Video-As-Prompt-Wan2.1-14B): animate an image with the semantics of a reference video.

Convert the release once (it is a Diffusers-format folder; only the transformer changes), then generate:

    diffusers-wan convert /ckpt/Video-As-Prompt-Wan2.1-14B /ckpt/Video-As-Prompt-Wan2.1-14B-ext
    python examples/video_as_prompt.py /ckpt/Video-As-Prompt-Wan2.1-14B-ext woman.jpg man_labubu.mp4 \
        "A young woman ... seamlessly transforms into a Labubu toy character ..." \
        --vap-prompt "A man ... seamlessly transforms into a Labubu toy character ..." --output vap.mp4
"""

import argparse

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video, load_image, load_video

import diffusers_wan_ext  # noqa: F401  (registers WanVideoAsPromptPipeline with Diffusers)

NEGATIVE = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Video-As-Prompt: image + reference video -> video.")
    parser.add_argument("model", help="converted folder (model_index.json: WanVideoAsPromptPipeline)")
    parser.add_argument("image", help="first frame of the video to generate (path or URL)")
    parser.add_argument("vap_video", help="reference video with the wanted semantics (path or URL)")
    parser.add_argument("prompt", help="caption of the video to generate")
    parser.add_argument("--vap-prompt", default="", help="caption of the reference video")
    parser.add_argument("--negative-prompt", default=NEGATIVE, help="also the reference's negative prompt")
    parser.add_argument("--output", default="video_as_prompt.mp4")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=49, help="4n + 1 (release examples: 49)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fps", type=int, default=16)
    args = parser.parse_args(argv)

    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.bfloat16)
    if torch.cuda.is_available():
        pipe.enable_model_cpu_offload()
    video = pipe(
        image=load_image(args.image),
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        vap_video=load_video(args.vap_video),  # resampled evenly to num_frames, resized to width x height
        vap_prompt=args.vap_prompt,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).frames[0]
    print(export_to_video(video, args.output, fps=args.fps))


if __name__ == "__main__":
    main()
