#!/usr/bin/env bash
# LoRA of Wan2.1-I2V-14B-720P: DiffSynth-Studio's model_training/lora/Wan2.1-I2V-14B-720P.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.1-I2V-14B-720P "" --extra_inputs "input_image" "$@"
