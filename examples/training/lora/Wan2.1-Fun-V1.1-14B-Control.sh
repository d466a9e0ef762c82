#!/usr/bin/env bash
# LoRA of Wan2.1-Fun-V1.1-14B-Control: DiffSynth-Studio's model_training/lora/Wan2.1-Fun-V1.1-14B-Control.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.1-Fun-V1.1-14B-Control "" --extra_inputs "control_video,reference_image" "$@"
