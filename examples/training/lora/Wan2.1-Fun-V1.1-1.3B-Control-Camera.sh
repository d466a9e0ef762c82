#!/usr/bin/env bash
# LoRA of Wan2.1-Fun-V1.1-1.3B-Control-Camera (DiffSynth-Studio's examples/wanvideo/model_training/lora/Wan2.1-Fun-V1.1-1.3B-Control-Camera.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.1-Fun-V1.1-1.3B-Control-Camera-diffusers}

launch single_gpu \
  $(dataset Wan2.1-Fun-V1.1-1.3B-Control-Camera) \
  --height 480 --width 832 --num_frames 81 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-5 --num_epochs 5 \
  --lora_base_model dit --lora_target_modules "q,k,v,o,ffn.0,ffn.2" --lora_rank 32 \
  --extra_inputs "input_image,camera_control_direction,camera_control_speed" \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.1-Fun-V1.1-1.3B-Control-Camera_lora" "$@"
