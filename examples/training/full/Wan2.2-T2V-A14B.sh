#!/usr/bin/env bash
# Full fine-tuning of Wan2.2-T2V-A14B: DiffSynth-Studio's model_training/full/Wan2.2-T2V-A14B.sh (deepspeed zero2 offload).
source "$(dirname "$0")/../common.sh"
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload Wan2.2-T2V-A14B _high_noise --num_frames 49 --trainable_models dit "${HIGH_NOISE[@]}" "$@"
full deepspeed_zero2_offload Wan2.2-T2V-A14B _low_noise --num_frames 49 --trainable_models dit2 "${LOW_NOISE[@]}" "$@"
