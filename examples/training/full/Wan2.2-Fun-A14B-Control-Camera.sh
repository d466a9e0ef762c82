#!/usr/bin/env bash
# Full fine-tuning of Wan2.2-Fun-A14B-Control-Camera (DiffSynth-Studio's examples/wanvideo/model_training/full/Wan2.2-Fun-A14B-Control-Camera.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.2-Fun-A14B-Control-Camera-diffusers}

# 8 GPUs, DeepSpeed ZeRO-2 with CPU offload; for ZeRO-3 without offload use the deepspeed_zero3 config (pip install deepspeed).
# high-noise expert (transformer): timestep boundaries [0, 0.417) of the 1000-step grid (t >= 875); the trainer derives them from boundary_ratio when omitted
launch deepspeed_zero2_offload \
  $(dataset Wan2.2-Fun-A14B-Control-Camera) \
  --height 480 --width 832 --num_frames 49 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-5 --num_epochs 2 \
  --trainable_models dit \
  --extra_inputs "input_image,camera_control_direction,camera_control_speed" \
  --min_timestep_boundary 0 --max_timestep_boundary 0.417 \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.2-Fun-A14B-Control-Camera_high_noise_full" "$@"

# low-noise expert (transformer_2): timestep boundaries [0.417, 1) of the 1000-step grid (t < 875); the trainer derives them from boundary_ratio when omitted
launch deepspeed_zero2_offload \
  $(dataset Wan2.2-Fun-A14B-Control-Camera) \
  --height 480 --width 832 --num_frames 49 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-5 --num_epochs 2 \
  --trainable_models dit2 \
  --extra_inputs "input_image,camera_control_direction,camera_control_speed" \
  --min_timestep_boundary 0.417 --max_timestep_boundary 1 \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.2-Fun-A14B-Control-Camera_low_noise_full" "$@"
