#!/usr/bin/env bash
# Full fine-tuning of Wan2.1-Fun-V1.1-1.3B-Control-Camera: DiffSynth-Studio's model_training/full/Wan2.1-Fun-V1.1-1.3B-Control-Camera.sh (multi gpu).
source "$(dirname "$0")/../common.sh"
full multi_gpu Wan2.1-Fun-V1.1-1.3B-Control-Camera "" --extra_inputs "input_image,camera_control_direction,camera_control_speed" "$@"
