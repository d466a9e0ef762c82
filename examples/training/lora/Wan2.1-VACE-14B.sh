#!/usr/bin/env bash
# LoRA of Wan2.1-VACE-14B: DiffSynth-Studio's model_training/lora/Wan2.1-VACE-14B.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.1-VACE-14B "" --extra_inputs "vace_video,vace_reference_image" --lora_base_model vace --use_gradient_checkpointing_offload "$@"
