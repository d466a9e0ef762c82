#!/usr/bin/env bash
# LoRA of Wan2.1-Fun-1.3B-Control (DiffSynth-Studio's examples/wanvideo/model_training/lora/Wan2.1-Fun-1.3B-Control.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.1-Fun-1.3B-Control-diffusers}

launch single_gpu \
  $(dataset Wan2.1-Fun-1.3B-Control) \
  --data_file_keys "video,control_video" \
  --height 480 --width 832 --num_frames 81 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-4 --num_epochs 5 \
  --lora_base_model dit --lora_target_modules "q,k,v,o,ffn.0,ffn.2" --lora_rank 32 \
  --extra_inputs "control_video" \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.1-Fun-1.3B-Control_lora" "$@"
