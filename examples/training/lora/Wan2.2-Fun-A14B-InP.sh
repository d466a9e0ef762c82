#!/usr/bin/env bash
# LoRA of Wan2.2-Fun-A14B-InP (DiffSynth-Studio's examples/wanvideo/model_training/lora/Wan2.2-Fun-A14B-InP.sh, same hyper-parameters).
set -euo pipefail
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.2-Fun-A14B-InP-diffusers}

# high-noise expert (transformer): timestep boundaries [0, 0.417) of the 1000-step grid (t >= 875); the trainer derives them from boundary_ratio when omitted
launch single_gpu \
  $(dataset Wan2.2-Fun-A14B-InP) \
  --height 480 --width 832 --num_frames 49 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-4 --num_epochs 5 \
  --lora_base_model dit --lora_target_modules "q,k,v,o,ffn.0,ffn.2" --lora_rank 32 \
  --extra_inputs "input_image,end_image" \
  --min_timestep_boundary 0 --max_timestep_boundary 0.417 \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.2-Fun-A14B-InP_high_noise_lora" "$@"

# low-noise expert (transformer_2): timestep boundaries [0.417, 1) of the 1000-step grid (t < 875); the trainer derives them from boundary_ratio when omitted
launch single_gpu \
  $(dataset Wan2.2-Fun-A14B-InP) \
  --height 480 --width 832 --num_frames 49 --dataset_repeat 100 \
  --model_path "$MODEL" \
  --learning_rate 1e-4 --num_epochs 5 \
  --lora_base_model dit2 --lora_target_modules "q,k,v,o,ffn.0,ffn.2" --lora_rank 32 \
  --extra_inputs "input_image,end_image" \
  --min_timestep_boundary 0.417 --max_timestep_boundary 1 \
  --use_gradient_checkpointing \
  --output_path "$OUT/Wan2.2-Fun-A14B-InP_low_noise_lora" "$@"
