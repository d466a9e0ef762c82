"""krea realtime (krea/krea-realtime-video, Self-Forcing-distilled Wan2.1-T2V-14B): streaming text-to-video.

The video is generated block by block (3 latent frames = 12 video frames per block, 4 distilled steps each) with
block-causal attention over a KV cache; each block is decoded as soon as it is ready, so the first frames are
written long before the last block exists.  Convert the checkpoint once:

    diffusers-wan convert krea-realtime-video-14b.safetensors /ckpt/krea-realtime-video-diffusers \
        --text-encoder Wan2.1-T2V-14B/models_t5_umt5-xxl-enc-bf16.pth --vae Wan2.1-T2V-14B/Wan2.1_VAE.pth \
        --tokenizer Wan2.1-T2V-14B/google/umt5-xxl
    python examples/krea_realtime_stream.py /ckpt/krea-realtime-video-diffusers "a cat surfing a wave at sunset"

Frames go to OUTPUT_frames/ as PNGs while the stream runs, and to OUTPUT (mp4) at the end.
"""

import argparse
import os

import torch
from diffusers.utils import export_to_video

from diffusers_wan_ext import WanStreamingPipeline


def main(argv=None):
    parser = argparse.ArgumentParser(description="krea realtime: streaming block-causal text-to-video.")
    parser.add_argument("model", help="converted krea folder (WanPipeline components; loads as WanStreamingPipeline)")
    parser.add_argument("prompt")
    parser.add_argument("--output", default="krea_stream.mp4")
    parser.add_argument("--blocks", type=int, default=9, help="blocks of 3 latent frames (9 blocks = 105 frames)")
    parser.add_argument("--steps", type=int, default=4, help="distilled steps per block (krea realtime: 4)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--max-context-frames", type=int, default=None, help="sliding attention window")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=16)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = WanStreamingPipeline.from_pretrained(args.model, dtype=torch.bfloat16).to(device)
    pipe.set_attention_backend(args.attention_backend)
    frames_dir = os.path.splitext(args.output)[0] + "_frames"
    os.makedirs(frames_dir, exist_ok=True)
    frames = []
    for chunk in pipe.stream(args.prompt, num_blocks=args.blocks, height=args.height, width=args.width,
                             num_inference_steps=args.steps, max_context_frames=args.max_context_frames,
                             output_type="pil", generator=torch.Generator().manual_seed(args.seed)):
        for i, frame in enumerate(chunk.frames[0]):
            frame.save(os.path.join(frames_dir, f"{chunk.frame_index + i:05d}.png"))
        frames.extend(chunk.frames[0])
        print(f"block {chunk.block_index}: frames {chunk.frame_index}..{chunk.frame_index + len(chunk.frames[0]) - 1} "
              f"ready after {chunk.elapsed:.2f}s")
    print(export_to_video(frames, args.output, fps=args.fps))


if __name__ == "__main__":
    main()
