#!/usr/bin/env bash
# LoRA of krea-realtime-video: DiffSynth-Studio's model_training/lora/krea-realtime-video.sh (one GPU).
source "$(dirname "$0")/../common.sh"
lora krea-realtime-video "" "$@"
