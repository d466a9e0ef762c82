#!/usr/bin/env bash
# LoRA of Wan2.1-T2V-14B: DiffSynth-Studio's model_training/lora/Wan2.1-T2V-14B.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.1-T2V-14B "" "$@"
