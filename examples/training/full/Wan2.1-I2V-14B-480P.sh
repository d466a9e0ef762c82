#!/usr/bin/env bash
# Full fine-tuning of Wan2.1-I2V-14B-480P (DiffSynth-Studio's examples/wanvideo/model_training/full/Wan2.1-I2V-14B-480P.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.1-I2V-14B-480P-diffusers}

# 8 GPUs, DeepSpeed ZeRO-2 with CPU offload; for ZeRO-3 without offload use the deepspeed_zero3 config (pip install deepspeed).
launch deepspeed_zero2_offload \
  $(dataset Wan2.1-I2V-14B-480P) \
  --height 480 --width 832 --num_frames 81 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-5 --num_epochs 2 \
  --trainable_models dit \
  --extra_inputs "input_image" \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.1-I2V-14B-480P_full" "$@"
