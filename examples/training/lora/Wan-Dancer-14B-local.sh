#!/usr/bin/env bash
# LoRA of Wan-Dancer-14B's local model (30-fps rendering between keyframes): DiffSynth-Studio's
# model_training/lora/Wan-Dancer-14B-local.sh (one GPU, 1280x720, 149 frames).
# MODEL: diffusers-wan convert Wan-Dancer-14B ./models/Wan-Dancer-14B-diffusers --tokenizer umt5-xxl (transformer =
# global_model, transformer_2 = local_model; dit2 trains the local one; a folder converted with --variant
# wan-dancer-14b-local holds it as transformer: pass --lora_base_model dit).
# Columns: video (30 fps), prompt, wantodance_music_path (audio, needs librosa: pip install 'diffusers_wan_ext[dancer]';
# or precomputed features [frames, 35] in .npy / .safetensors), wantodance_reference_image, wantodance_fps (30),
# wantodance_keyframes (non-keyframes black) and wantodance_keyframes_mask (default: every 16th frame).
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan-Dancer-14B-diffusers}
data=${DATA:-./data/diffsynth_example_dataset/wanvideo/Wan-Dancer-14B-local}
lora Wan-Dancer-14B-local "" --dataset_metadata_path "$data/metadata.json" --height 1280 --width 720 --num_frames 149 \
  --data_file_keys "video,wantodance_reference_image,wantodance_keyframes,wantodance_music_path" \
  --extra_inputs "wantodance_music_path,wantodance_reference_image,wantodance_fps,wantodance_keyframes,wantodance_keyframes_mask" \
  --lora_base_model dit2 --use_gradient_checkpointing_offload "$@"
