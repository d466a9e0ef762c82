#!/usr/bin/env bash
# Full fine-tuning of Wan2.2-Animate-14B's adapter: DiffSynth-Studio's model_training/full/Wan2.2-Animate-14B.sh
# (deepspeed zero2 offload). animate_adapter = pose embedding, motion / face encoders and face blocks of the
# transformer; the saved transformer/ folder holds the rest unchanged.
source "$(dirname "$0")/../common.sh"
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload Wan2.2-Animate-14B "" --extra_inputs "input_image,animate_pose_video,animate_face_video" --trainable_models animate_adapter --use_gradient_checkpointing_offload "$@"
