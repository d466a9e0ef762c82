#!/usr/bin/env bash
# Full fine-tuning of Wan2.1-Fun-V1.1-1.3B-InP (DiffSynth-Studio's examples/wanvideo/model_training/full/Wan2.1-Fun-V1.1-1.3B-InP.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.1-Fun-V1.1-1.3B-InP-diffusers}

launch multi_gpu \
  $(dataset Wan2.1-Fun-V1.1-1.3B-InP) \
  --height 480 --width 832 --num_frames 81 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-5 --num_epochs 2 \
  --trainable_models dit \
  --extra_inputs "input_image,end_image" \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.1-Fun-V1.1-1.3B-InP_full" "$@"
