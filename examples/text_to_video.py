"""Text-to-video with a converted Wan folder (Wan2.1 T2V 1.3B / 14B, Wan2.2 T2V-A14B, TI2V-5B, krea).

    python examples/text_to_video.py /ckpt/Wan2.1-T2V-1.3B-diffusers "a cat surfing a wave" out.mp4
"""

import sys

import torch
from diffusers import DiffusionPipeline

import diffusers_wan_ext  # noqa: F401  (registers our classes; not needed for stock-only folders)
from diffusers_wan_ext.demo import write_video

model, prompt, output = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "out.mp4"
pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.bfloat16)
pipe.enable_model_cpu_offload() if torch.cuda.is_available() else None
video = pipe(prompt=prompt, height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0).frames[0]
print(write_video(video, output, fps=16))
