#!/usr/bin/env bash
# Full fine-tuning of Wan2.2-TI2V-5B: DiffSynth-Studio's model_training/full/Wan2.2-TI2V-5B.sh (multi gpu).
source "$(dirname "$0")/../common.sh"
full multi_gpu Wan2.2-TI2V-5B "" --extra_inputs "input_image" --num_frames 49 "$@"
