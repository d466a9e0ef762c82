#!/usr/bin/env bash
# LoRA of Wan2.2-Fun-A14B-InP: DiffSynth-Studio's model_training/lora/Wan2.2-Fun-A14B-InP.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.2-Fun-A14B-InP _high_noise --extra_inputs "input_image,end_image" --num_frames 49 --lora_base_model dit "${HIGH_NOISE[@]}" "$@"
lora Wan2.2-Fun-A14B-InP _low_noise --extra_inputs "input_image,end_image" --num_frames 49 --lora_base_model dit2 "${LOW_NOISE[@]}" "$@"
