#!/usr/bin/env bash
# LoRA of Wan2.1-1.3b-speedcontrol-v1 (DiffSynth-Studio's examples/wanvideo/model_training/lora/Wan2.1-1.3b-speedcontrol-v1.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.1-T2V-1.3B-diffusers}   # with the motion controller: diffusers-wan add-motion-controller

launch single_gpu \
  $(dataset Wan2.1-1.3b-speedcontrol-v1) \
  --height 480 --width 832 --num_frames 81 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-4 --num_epochs 5 \
  --lora_base_model dit --lora_target_modules "q,k,v,o,ffn.0,ffn.2" --lora_rank 32 \
  --extra_inputs "motion_bucket_id" \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.1-1.3b-speedcontrol-v1_lora" "$@"
