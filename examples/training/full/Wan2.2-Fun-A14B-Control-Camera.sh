#!/usr/bin/env bash
# Full fine-tuning of Wan2.2-Fun-A14B-Control-Camera: DiffSynth-Studio's model_training/full/Wan2.2-Fun-A14B-Control-Camera.sh (deepspeed zero2 offload).
source "$(dirname "$0")/../common.sh"
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload Wan2.2-Fun-A14B-Control-Camera _high_noise --extra_inputs "input_image,camera_control_direction,camera_control_speed" --num_frames 49 --trainable_models dit "${HIGH_NOISE[@]}" "$@"
full deepspeed_zero2_offload Wan2.2-Fun-A14B-Control-Camera _low_noise --extra_inputs "input_image,camera_control_direction,camera_control_speed" --num_frames 49 --trainable_models dit2 "${LOW_NOISE[@]}" "$@"
