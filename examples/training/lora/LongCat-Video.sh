#!/usr/bin/env bash
# LoRA of LongCat-Video: DiffSynth-Studio's model_training/lora/LongCat-Video.sh (one GPU), its LongCat module names
# (mapped to ours). Text-to-video; continuation: add --extra_inputs longcat_video (a column of 4n+1 conditioning
# frames: the clip's first ones, kept clean and out of the loss). The LoRA's original LongCat layout:
# diffusers_wan_ext.families.longcat.export_longcat_lora.
source "$(dirname "$0")/../common.sh"
lora LongCat-Video "" --lora_target_modules "adaLN_modulation.1,attn.qkv,attn.proj,cross_attn.q_linear,cross_attn.kv_linear,cross_attn.proj,ffn.w1,ffn.w2,ffn.w3" "$@"
