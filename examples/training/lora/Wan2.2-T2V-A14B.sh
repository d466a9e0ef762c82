#!/usr/bin/env bash
# LoRA of Wan2.2-T2V-A14B: DiffSynth-Studio's model_training/lora/Wan2.2-T2V-A14B.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.2-T2V-A14B _high_noise --num_frames 49 --lora_base_model dit "${HIGH_NOISE[@]}" "$@"
lora Wan2.2-T2V-A14B _low_noise --num_frames 49 --lora_base_model dit2 "${LOW_NOISE[@]}" "$@"
