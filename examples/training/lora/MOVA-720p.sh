#!/usr/bin/env bash
# LoRA of MOVA-720p (openmoss/MOVA-720p): DiffSynth-Studio's examples/mova/model_training/lora/MOVA-720P-I2AV.sh
# (one GPU). One run per video expert (dit = video_dit/, dit2 = video_dit_2/); the audio DiT and the dual-tower bridge
# run frozen in the same joint forward and the loss adds the audio flow-matching MSE (--extra_inputs input_audio).
# The clips are resampled to 24 fps when read (MOVA's frame rate: the audio span of a clip is num_frames / 24 s);
# input_audio is read at 48 kHz. --lora_base_model audio_dit / dual_tower_bridge put the LoRA on the audio DiT /
# the bridge instead (the video expert frozen).
DATA=${DATA:-./data/diffsynth_example_dataset/mova/MOVA-720P-I2AV}
source "$(dirname "$0")/../common.sh"
MOVA=(--extra_inputs "input_image,input_audio" --height 720 --width 1280 --num_frames 121)
# boundary_ratio 0.9: the high-noise expert takes the grid indices [0, 0.358) (t >= 900), the low-noise one the rest
lora MOVA-720p _high_noise "${MOVA[@]}" --lora_base_model dit --min_timestep_boundary 0 --max_timestep_boundary 0.358 "$@"
lora MOVA-720p _low_noise "${MOVA[@]}" --lora_base_model dit2 --min_timestep_boundary 0.358 --max_timestep_boundary 1 "$@"
