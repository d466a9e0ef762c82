#!/usr/bin/env bash
# Full fine-tuning of Wan-Dancer-14B's global model: DiffSynth-Studio's model_training/full/Wan-Dancer-14B-global.sh
# (deepspeed zero2 offload, 1280x720, 149 frames). Model and columns: see ../lora/Wan-Dancer-14B-global.sh.
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan-Dancer-14B-diffusers}
data=${DATA:-./data/diffsynth_example_dataset/wanvideo/Wan-Dancer-14B-global}
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload Wan-Dancer-14B-global "" --dataset_metadata_path "$data/metadata.json" --height 1280 \
  --width 720 --num_frames 149 \
  --data_file_keys "video,wantodance_reference_image,wantodance_keyframes,wantodance_music_path" \
  --extra_inputs "wantodance_music_path,wantodance_reference_image,wantodance_fps,wantodance_keyframes,wantodance_keyframes_mask" \
  --trainable_models dit --use_gradient_checkpointing_offload "$@"
