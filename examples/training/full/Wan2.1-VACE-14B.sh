#!/usr/bin/env bash
# Full fine-tuning of Wan2.1-VACE-14B: DiffSynth-Studio's model_training/full/Wan2.1-VACE-14B.sh (deepspeed zero2 offload).
source "$(dirname "$0")/../common.sh"
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload Wan2.1-VACE-14B "" --extra_inputs "vace_video,vace_reference_image" --learning_rate 5e-5 --trainable_models vace "$@"
