#!/usr/bin/env bash
# Full fine-tuning of Wan2.1-1.3b-speedcontrol-v1 (DiffSynth-Studio's examples/wanvideo/model_training/full/Wan2.1-1.3b-speedcontrol-v1.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.1-T2V-1.3B-diffusers}   # with the motion controller: diffusers-wan add-motion-controller

launch multi_gpu \
  $(dataset Wan2.1-1.3b-speedcontrol-v1) \
  --height 480 --width 832 --num_frames 81 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-5 --num_epochs 2 \
  --trainable_models motion_controller \
  --extra_inputs "motion_bucket_id" \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.1-1.3b-speedcontrol-v1_full" "$@"
