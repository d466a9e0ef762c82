#!/usr/bin/env bash
# LoRA of Wan2.2-Fun-A14B-Control-Camera: DiffSynth-Studio's model_training/lora/Wan2.2-Fun-A14B-Control-Camera.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.2-Fun-A14B-Control-Camera _high_noise --extra_inputs "input_image,camera_control_direction,camera_control_speed" --num_frames 49 --learning_rate 1e-5 --lora_base_model dit "${HIGH_NOISE[@]}" "$@"
lora Wan2.2-Fun-A14B-Control-Camera _low_noise --extra_inputs "input_image,camera_control_direction,camera_control_speed" --num_frames 49 --learning_rate 1e-5 --lora_base_model dit2 "${LOW_NOISE[@]}" "$@"
