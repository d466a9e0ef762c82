#!/usr/bin/env bash
# LoRA of Wan2.2-TI2V-5B: DiffSynth-Studio's model_training/lora/Wan2.2-TI2V-5B.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.2-TI2V-5B "" --extra_inputs "input_image" --num_frames 49 "$@"
