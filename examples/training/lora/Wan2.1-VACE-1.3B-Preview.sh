#!/usr/bin/env bash
# LoRA of Wan2.1-VACE-1.3B-Preview: DiffSynth-Studio's model_training/lora/Wan2.1-VACE-1.3B-Preview.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.1-VACE-1.3B-Preview "" --extra_inputs "vace_video,vace_reference_image" --lora_base_model vace --use_gradient_checkpointing_offload "$@"
