#!/usr/bin/env bash
# Full fine-tuning of Wan2.2-S2V-14B: DiffSynth-Studio's model_training/full/Wan2.2-S2V-14B.sh (deepspeed zero2 offload).
source "$(dirname "$0")/../common.sh"
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload Wan2.2-S2V-14B "" --height 448 --width 832 --num_epochs 1 --extra_inputs "input_image,input_audio,s2v_pose_video" --use_gradient_checkpointing_offload "$@"
