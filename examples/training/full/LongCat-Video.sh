#!/usr/bin/env bash
# Full fine-tuning of LongCat-Video: DiffSynth-Studio's model_training/full/LongCat-Video.sh (deepspeed zero2 offload).
source "$(dirname "$0")/../common.sh"
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload LongCat-Video "" "$@"
