#!/usr/bin/env bash
# LoRA of Wan2.2-Fun-A14B-Control: DiffSynth-Studio's model_training/lora/Wan2.2-Fun-A14B-Control.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.2-Fun-A14B-Control _high_noise --extra_inputs "control_video,reference_image" --num_frames 49 --lora_base_model dit "${HIGH_NOISE[@]}" "$@"
lora Wan2.2-Fun-A14B-Control _low_noise --extra_inputs "control_video,reference_image" --num_frames 49 --lora_base_model dit2 "${LOW_NOISE[@]}" "$@"
