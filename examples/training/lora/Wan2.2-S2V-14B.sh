#!/usr/bin/env bash
# LoRA of Wan2.2-S2V-14B: DiffSynth-Studio's model_training/lora/Wan2.2-S2V-14B.sh (one GPU). Columns: video, prompt,
# input_audio (wav / mp3, read at 16 kHz), s2v_pose_video; input_image is the clip's first frame (the reference). The
# wav2vec2 audio encoder stays frozen; --audio_processor_path replaces the folder's processor.
source "$(dirname "$0")/../common.sh"
lora Wan2.2-S2V-14B "" --height 448 --width 832 --extra_inputs "input_image,input_audio,s2v_pose_video" --use_gradient_checkpointing_offload "$@"
