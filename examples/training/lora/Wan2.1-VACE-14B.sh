#!/usr/bin/env bash
# LoRA of Wan2.1-VACE-14B (DiffSynth-Studio's examples/wanvideo/model_training/lora/Wan2.1-VACE-14B.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.1-VACE-14B-diffusers}

launch single_gpu \
  $(dataset Wan2.1-VACE-14B) \
  --data_file_keys "video,vace_video,vace_reference_image" \
  --height 480 --width 832 --num_frames 81 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-4 --num_epochs 5 \
  --lora_base_model vace --lora_target_modules "q,k,v,o,ffn.0,ffn.2" --lora_rank 32 \
  --extra_inputs "vace_video,vace_reference_image" \
  --use_gradient_checkpointing_offload \
  --output_path "$OUT/Wan2.1-VACE-14B_lora" "$@"
