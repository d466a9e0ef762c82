#!/usr/bin/env bash
# LoRA of Wan2.1-1.3b-speedcontrol-v1: DiffSynth-Studio's model_training/lora/Wan2.1-1.3b-speedcontrol-v1.sh (one GPU).
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.1-T2V-1.3B-speedcontrol-diffusers}  # Wan2.1-T2V-1.3B + diffusers-wan add-motion-controller
lora Wan2.1-1.3b-speedcontrol-v1 "" --extra_inputs "motion_bucket_id" "$@"
