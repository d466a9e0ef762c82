#!/usr/bin/env bash
# Full fine-tuning of Wan2.2-Animate-2-14B-Distilled: DiffSynth-Studio's model_training/full/Wan2.2-Animate-2-14B-Distilled.sh (deepspeed zero2 offload,
# 640x352, 81 frames). As DiffSynth: only the self-attention q / k / v of every block train (its module paths
# dit.blocks.N.block.self_attn.q, N < 40; --trainable_models dit trains the whole DiT).
source "$(dirname "$0")/../common.sh"
modules=$(for i in $(seq 0 39); do printf 'dit.blocks.%d.block.self_attn.%s,' "$i" q "$i" k "$i" v; done)
data=${DATA:-./data/diffsynth_example_dataset/wanvideo/Wan2.2-Animate-2-14B-Distilled}
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload Wan2.2-Animate-2-14B-Distilled "" --dataset_metadata_path "$data/metadata.json" --height 640 --width 352 \
  --data_file_keys "video,animate2_reference_image,animate2_reference_video" \
  --extra_inputs "animate2_prompt_ref,animate2_reference_image,animate2_reference_video" \
  --trainable_models "${modules%,}" "$@"
