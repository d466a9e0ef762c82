#!/usr/bin/env bash
# LoRA of Video-As-Prompt-Wan2.1-14B: DiffSynth-Studio's model_training/lora/Video-As-Prompt-Wan2.1-14B.sh (one GPU).
# Columns: video, prompt, vap_video (the reference video), vap_prompt (its caption, optional); input_image is the
# clip's first frame. dit = the main blocks; --lora_base_model vap puts the LoRA on the reference stream instead.
source "$(dirname "$0")/../common.sh"
lora Video-As-Prompt-Wan2.1-14B "" --num_frames 49 --dataset_repeat 10 --extra_inputs "vap_video,input_image" --use_gradient_checkpointing_offload "$@"
