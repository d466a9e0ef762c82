#!/usr/bin/env bash
# Full fine-tuning of krea-realtime-video: DiffSynth-Studio's model_training/full/krea-realtime-video.sh (deepspeed
# zero2 offload; a T2V-14B transformer, so the same configuration as Wan2.1-T2V-14B).
source "$(dirname "$0")/../common.sh"
# 8 GPUs; ZeRO-3 without offload: change the config to deepspeed_zero3 (pip install deepspeed)
full deepspeed_zero2_offload krea-realtime-video "" "$@"
