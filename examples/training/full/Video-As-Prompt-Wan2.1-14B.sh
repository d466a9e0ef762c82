#!/usr/bin/env bash
# Full fine-tuning of Video-As-Prompt-Wan2.1-14B's reference stream: DiffSynth-Studio's
# model_training/full/Video-As-Prompt-Wan2.1-14B.sh (deepspeed zero2 offload; vap = the vap_* modules).
source "$(dirname "$0")/../common.sh"
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload Video-As-Prompt-Wan2.1-14B "" --num_frames 49 --extra_inputs "vap_video,input_image" --trainable_models vap --use_gradient_checkpointing_offload "$@"
