#!/usr/bin/env bash
# Full fine-tuning of Wan2.2-VACE-Fun-A14B: DiffSynth-Studio's model_training/full/Wan2.2-VACE-Fun-A14B.sh (deepspeed zero2 offload).
source "$(dirname "$0")/../common.sh"
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload Wan2.2-VACE-Fun-A14B _high_noise --extra_inputs "vace_video,vace_reference_image" --num_frames 49 --learning_rate 5e-5 --trainable_models vace "${HIGH_NOISE[@]}" "$@"
full deepspeed_zero2_offload Wan2.2-VACE-Fun-A14B _low_noise --extra_inputs "vace_video,vace_reference_image" --num_frames 49 --learning_rate 5e-5 --trainable_models vace2 "${LOW_NOISE[@]}" "$@"
