#!/usr/bin/env bash
# Full fine-tuning of Wan2.1-Fun-V1.1-1.3B-Control (DiffSynth-Studio's examples/wanvideo/model_training/full/Wan2.1-Fun-V1.1-1.3B-Control.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.1-Fun-V1.1-1.3B-Control-diffusers}

launch multi_gpu \
  $(dataset Wan2.1-Fun-V1.1-1.3B-Control) \
  --data_file_keys "video,control_video,reference_image" \
  --height 480 --width 832 --num_frames 81 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-5 --num_epochs 2 \
  --trainable_models dit \
  --extra_inputs "control_video,reference_image" \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.1-Fun-V1.1-1.3B-Control_full" "$@"
