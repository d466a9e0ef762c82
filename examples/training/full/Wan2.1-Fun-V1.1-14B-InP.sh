#!/usr/bin/env bash
# Full fine-tuning of Wan2.1-Fun-V1.1-14B-InP: DiffSynth-Studio's model_training/full/Wan2.1-Fun-V1.1-14B-InP.sh (deepspeed zero2 offload).
source "$(dirname "$0")/../common.sh"
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload Wan2.1-Fun-V1.1-14B-InP "" --extra_inputs "input_image,end_image" "$@"
