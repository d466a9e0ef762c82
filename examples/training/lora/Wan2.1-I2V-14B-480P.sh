#!/usr/bin/env bash
# LoRA of Wan2.1-I2V-14B-480P (DiffSynth-Studio's examples/wanvideo/model_training/lora/Wan2.1-I2V-14B-480P.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.1-I2V-14B-480P-diffusers}

launch single_gpu \
  $(dataset Wan2.1-I2V-14B-480P) \
  --height 480 --width 832 --num_frames 81 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-4 --num_epochs 5 \
  --lora_base_model dit --lora_target_modules "q,k,v,o,ffn.0,ffn.2" --lora_rank 32 \
  --extra_inputs "input_image" \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.1-I2V-14B-480P_lora" "$@"
