#!/usr/bin/env bash
# Full fine-tuning of Wan2.1-VACE-1.3B-Preview: DiffSynth-Studio's model_training/full/Wan2.1-VACE-1.3B-Preview.sh (multi gpu).
source "$(dirname "$0")/../common.sh"
# the learning rate is the VACE paper's, as DiffSynth-Studio's script
full multi_gpu Wan2.1-VACE-1.3B-Preview "" --extra_inputs "vace_video,vace_reference_image" --learning_rate 5e-5 --trainable_models vace --use_gradient_checkpointing_offload "$@"
