#!/usr/bin/env bash
# LoRA of Wan2.2-VACE-Fun-A14B: DiffSynth-Studio's model_training/lora/Wan2.2-VACE-Fun-A14B.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora Wan2.2-VACE-Fun-A14B _high_noise --extra_inputs "vace_video,vace_reference_image" --num_frames 49 --use_gradient_checkpointing_offload --lora_base_model vace "${HIGH_NOISE[@]}" "$@"
lora Wan2.2-VACE-Fun-A14B _low_noise --extra_inputs "vace_video,vace_reference_image" --num_frames 49 --use_gradient_checkpointing_offload --lora_base_model vace2 "${LOW_NOISE[@]}" "$@"
