#!/usr/bin/env bash
# Full fine-tuning of MOVA-360p (openmoss/MOVA-360p): DiffSynth-Studio's examples/mova/model_training/full/MOVA-360P-I2AV.sh
# (deepspeed zero2 offload, lr 1e-4, 5 epochs). One run per video expert (dit = video_dit/, dit2 = video_dit_2/), the
# audio DiT and the bridge frozen in the same joint forward; model and columns: see ../lora/MOVA-360p.sh.
# --trainable_models audio_dit / dual_tower_bridge fine-tune the audio DiT / the bridge instead.
DATA=${DATA:-./data/diffsynth_example_dataset/mova/MOVA-360P-I2AV}
source "$(dirname "$0")/../common.sh"
MOVA=(--extra_inputs "input_image,input_audio" --height 352 --width 640 --num_frames 121 --learning_rate 1e-4 --num_epochs 5)
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload MOVA-360p _high_noise "${MOVA[@]}" --trainable_models dit --min_timestep_boundary 0 \
  --max_timestep_boundary 0.358 "$@"
full deepspeed_zero2_offload MOVA-360p _low_noise "${MOVA[@]}" --trainable_models dit2 --min_timestep_boundary 0.358 \
  --max_timestep_boundary 1 "$@"
