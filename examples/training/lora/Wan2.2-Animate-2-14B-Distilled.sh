#!/usr/bin/env bash
# LoRA of Wan2.2-Animate-2-14B-Distilled: DiffSynth-Studio's model_training/lora/Wan2.2-Animate-2-14B-Distilled.sh (one GPU, 640x352, 81 frames).
# MODEL: diffusers-wan convert Wan2.2-Animate-2-14B ./models/Wan2.2-Animate-2-14B-Distilled-diffusers --variant wan2.2-animate-2-14b-distilled (wan_animate_2_bf16_distillation.safetensors).
# Columns: video, prompt, animate2_reference_image (the character), animate2_reference_video (the driving video, as
# many frames as the clip), animate2_prompt_ref (optional). As DiffSynth: the LoRA adapts the self-attention q / k / v
# of every block only (its names map to this DiT's self_attn.to_q / to_k / to_v).
source "$(dirname "$0")/../common.sh"
data=${DATA:-./data/diffsynth_example_dataset/wanvideo/Wan2.2-Animate-2-14B-Distilled}
lora Wan2.2-Animate-2-14B-Distilled "" --dataset_metadata_path "$data/metadata.json" --height 640 --width 352 \
  --data_file_keys "video,animate2_reference_image,animate2_reference_video" \
  --extra_inputs "animate2_prompt_ref,animate2_reference_image,animate2_reference_video" \
  --lora_target_modules "self_attn.q,self_attn.k,self_attn.v" "$@"
