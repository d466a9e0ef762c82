"""Image-to-video (Wan2.1 I2V, Wan2.2 I2V-A14B, TI2V-5B) and first-last-frame (FLF2V) with a converted folder.

    python examples/image_to_video.py /ckpt/Wan2.1-I2V-14B-480P-diffusers first.png "a cat" out.mp4 [last.png]
"""

import sys

import torch
from diffusers import WanImageToVideoPipeline
from diffusers.utils import load_image

from diffusers_wan_ext.demo import write_video

model, image, prompt, output = sys.argv[1:5]
last = load_image(sys.argv[5]) if len(sys.argv) > 5 else None
pipe = WanImageToVideoPipeline.from_pretrained(model, dtype=torch.bfloat16)
pipe.enable_model_cpu_offload() if torch.cuda.is_available() else None
video = pipe(image=load_image(image), last_image=last, prompt=prompt, height=480, width=832, num_frames=81).frames[0]
print(write_video(video, output, fps=16))
