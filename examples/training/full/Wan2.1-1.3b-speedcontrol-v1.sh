#!/usr/bin/env bash
# Full fine-tuning of Wan2.1-1.3b-speedcontrol-v1: DiffSynth-Studio's model_training/full/Wan2.1-1.3b-speedcontrol-v1.sh (multi gpu).
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan2.1-T2V-1.3B-speedcontrol-diffusers}  # Wan2.1-T2V-1.3B + diffusers-wan add-motion-controller
full multi_gpu Wan2.1-1.3b-speedcontrol-v1 "" --extra_inputs "motion_bucket_id" --trainable_models motion_controller "$@"
