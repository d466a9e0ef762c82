#!/usr/bin/env bash
# LoRA of Wan-Dancer-14B's global model (keyframes at 7.5 fps): DiffSynth-Studio's
# model_training/lora/Wan-Dancer-14B-global.sh (one GPU, 1280x720, 149 frames).
# MODEL: diffusers-wan convert Wan-Dancer-14B ./models/Wan-Dancer-14B-diffusers --tokenizer umt5-xxl (transformer =
# global_model, transformer_2 = local_model; dit trains the global one).
# Columns: video (4n+1 frames at wantodance_fps), prompt, wantodance_music_path (audio, needs librosa: pip install
# 'diffusers_wan_ext[dancer]'; or precomputed features [frames, 35] in .npy / .safetensors), wantodance_reference_image,
# wantodance_fps (7.5 here), wantodance_keyframes / wantodance_keyframes_mask (optional). The target is the clip's
# frames 0, 4, 8, ... each VAE-encoded alone (DiffSynth's --framewise_decoding; the pipeline decodes them so).
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-./models/Wan-Dancer-14B-diffusers}
data=${DATA:-./data/diffsynth_example_dataset/wanvideo/Wan-Dancer-14B-global}
lora Wan-Dancer-14B-global "" --dataset_metadata_path "$data/metadata.json" --height 1280 --width 720 --num_frames 149 \
  --data_file_keys "video,wantodance_reference_image,wantodance_keyframes,wantodance_music_path" \
  --extra_inputs "wantodance_music_path,wantodance_reference_image,wantodance_fps,wantodance_keyframes,wantodance_keyframes_mask" \
  --lora_base_model dit --use_gradient_checkpointing_offload "$@"
