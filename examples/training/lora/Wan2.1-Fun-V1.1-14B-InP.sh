#!/usr/bin/env bash
# LoRA of Wan2.1-Fun-V1.1-14B-InP: DiffSynth-Studio's model_training/lora/Wan2.1-Fun-V1.1-14B-InP.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.1-Fun-V1.1-14B-InP "" --extra_inputs "input_image,end_image" "$@"
