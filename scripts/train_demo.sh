#!/usr/bin/env bash
# Tiny LoRA training run on CPU from a fresh clone: a tiny original-layout Wan2.1 T2V release (random weights) is
# converted, a tiny dataset (mp4 clips + a png) is written, `accelerate launch examples/training/train.py` trains a
# LoRA for a few steps, and stock Diffusers loads it (WanPipeline.load_lora_weights) to render outputs/train_demo.mp4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_env.sh
PY=${PYTHON:-python3}
WORK=${1:-outputs/train_demo}
[ $# -gt 0 ] && shift   # the rest goes to train.py
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
read -r MODEL DATA < <("$PY" -c "
from diffusers_wan_ext.demo import prepare_training_demo
model, data = prepare_training_demo('$WORK')
print(model, data)")
rm -rf "$WORK/lora"
"$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  --cpu examples/training/train.py \
  --dataset_base_path "$DATA" --dataset_metadata_path "$DATA/metadata.csv" \
  --model_path "$MODEL" --height 32 --width 32 --num_frames 9 --dataset_repeat 4 \
  --lora_base_model dit --lora_target_modules "q,k,v,o,ffn.0,ffn.2" --lora_rank 8 --learning_rate 1e-3 \
  --max_sequence_length 64 --dtype fp32 --save_steps 6 --output_path "$WORK/lora" "$@"
"$PY" examples/training/validate.py --model_path "$MODEL" --lora "$WORK/lora" --prompt "a red square sliding" \
  --height 32 --width 32 --num_frames 9 --num_inference_steps 4 --max_sequence_length 64 --dtype fp32 \
  --device cpu --output outputs/train_demo.mp4
echo "LoRA: $WORK/lora/pytorch_lora_weights.safetensors (losses in $WORK/lora/logs/losses.jsonl)"
