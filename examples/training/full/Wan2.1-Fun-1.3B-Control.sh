#!/usr/bin/env bash
# Full fine-tuning of Wan2.1-Fun-1.3B-Control: DiffSynth-Studio's model_training/full/Wan2.1-Fun-1.3B-Control.sh (multi gpu).
source "$(dirname "$0")/../common.sh"
full multi_gpu Wan2.1-Fun-1.3B-Control "" --extra_inputs "control_video" "$@"
