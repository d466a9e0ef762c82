#!/usr/bin/env bash
# LoRA of Wan2.2-Animate-14B: DiffSynth-Studio's model_training/lora/Wan2.2-Animate-14B.sh. Columns: video, prompt,
# animate_pose_video, animate_face_video (face crops, resized to 512x512); replacement mode adds
# animate_inpaint_video (background) and animate_mask_video. input_image (the character) is the clip's first frame.
# DiffSynth-Studio notes that one 80 GB GPU cannot train it: it runs on 8 x 80 GB (pass --fp8_models dit, or launch
# accelerate_configs/deepspeed_zero2_offload.yaml yourself).
source "$(dirname "$0")/../common.sh"
lora Wan2.2-Animate-14B "" --extra_inputs "input_image,animate_pose_video,animate_face_video" --use_gradient_checkpointing_offload "$@"
