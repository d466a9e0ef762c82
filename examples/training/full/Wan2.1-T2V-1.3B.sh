#!/usr/bin/env bash
# Full fine-tuning of Wan2.1-T2V-1.3B: DiffSynth-Studio's model_training/full/Wan2.1-T2V-1.3B.sh (multi gpu).
source "$(dirname "$0")/../common.sh"
full multi_gpu Wan2.1-T2V-1.3B "" "$@"
