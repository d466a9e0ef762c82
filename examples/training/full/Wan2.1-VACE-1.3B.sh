#!/usr/bin/env bash
# Full fine-tuning of Wan2.1-VACE-1.3B (DiffSynth-Studio's examples/wanvideo/model_training/full/Wan2.1-VACE-1.3B.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.1-VACE-1.3B-diffusers}

launch multi_gpu \
  $(dataset Wan2.1-VACE-1.3B) \
  --data_file_keys "video,vace_video,vace_reference_image" \
  --height 480 --width 832 --num_frames 81 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 5e-5 --num_epochs 2 \
  --trainable_models vace \
  --extra_inputs "vace_video,vace_reference_image" \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.1-VACE-1.3B_full" "$@"
