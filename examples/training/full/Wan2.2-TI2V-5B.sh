#!/usr/bin/env bash
# Full fine-tuning of Wan2.2-TI2V-5B (DiffSynth-Studio's examples/wanvideo/model_training/full/Wan2.2-TI2V-5B.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.2-TI2V-5B-diffusers}

launch multi_gpu \
  $(dataset Wan2.2-TI2V-5B) \
  --height 480 --width 832 --num_frames 49 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-5 --num_epochs 2 \
  --trainable_models dit \
  --extra_inputs "input_image" \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.2-TI2V-5B_full" "$@"
