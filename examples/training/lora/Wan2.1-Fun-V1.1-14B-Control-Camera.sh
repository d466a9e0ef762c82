#!/usr/bin/env bash
# LoRA of Wan2.1-Fun-V1.1-14B-Control-Camera: DiffSynth-Studio's model_training/lora/Wan2.1-Fun-V1.1-14B-Control-Camera.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.1-Fun-V1.1-14B-Control-Camera "" --extra_inputs "input_image,camera_control_direction,camera_control_speed" --learning_rate 1e-5 "$@"
