# Sourced by examples/training/{lora,full}/*.sh: the arguments every run shares, DiffSynth-Studio's defaults.
#   MODEL: a converted Diffusers folder (diffusers-wan convert SRC DST) or the original release folder itself;
#          default ./models/<name>-diffusers.
#   DATA:  a dataset folder with metadata.csv (DiffSynth-Studio layout: video,prompt + extra input columns); default
#          the DiffSynth-Studio example dataset of the model:
#          modelscope download --dataset DiffSynth-Studio/diffsynth_example_dataset --local_dir ./data/diffsynth_example_dataset
#   OUT:   output root (default ./models/train).
#   PYTHON: the interpreter whose accelerate runs the training (default python3; e.g. a venv's bin/python).
# A script's own arguments come after these and win (argparse keeps the last value); so do the arguments given to the
# script (e.g. --max_train_steps 10 --export_format original).
set -euo pipefail
TRAINING_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-./models/train}

# launch CONFIG ARGS...: accelerate launch train.py with accelerate_configs/CONFIG.yaml (through $PYTHON -m, so
# accelerate need not be on PATH)
launch() {
  local config=$1
  shift
  "${PYTHON:-python3}" -m accelerate.commands.launch --config_file "$TRAINING_DIR/accelerate_configs/$config.yaml" \
    "$TRAINING_DIR/train.py" "$@"
}

# shared NAME: dataset, size and model arguments of model NAME
shared() {
  local data=${DATA:-./data/diffsynth_example_dataset/wanvideo/$1}
  echo --dataset_base_path "$data" --dataset_metadata_path "$data/metadata.csv" \
    --height 480 --width 832 --num_frames 81 --dataset_repeat 100 --model_path "${MODEL:-./models/$1-diffusers}"
}

# lora NAME [TAG] ARGS...: LoRA rank 32 on q,k,v,o,ffn.0,ffn.2 of dit, lr 1e-4, 5 epochs, one GPU
lora() {
  local name=$1 tag=${2:-}
  shift 2 || shift
  launch single_gpu $(shared "$name") --learning_rate 1e-4 --num_epochs 5 \
    --lora_base_model dit --lora_target_modules "q,k,v,o,ffn.0,ffn.2" --lora_rank 32 \
    --use_gradient_checkpointing --output_path "$OUT/${name}${tag}_lora" "$@"
}

# full CONFIG NAME [TAG] ARGS...: full fine-tuning of dit, lr 1e-5, 2 epochs, with accelerate_configs/CONFIG.yaml
full() {
  local config=$1 name=$2 tag=${3:-}
  shift 3 || shift 2
  launch "$config" $(shared "$name") --learning_rate 1e-5 --num_epochs 2 --trainable_models dit \
    --use_gradient_checkpointing --output_path "$OUT/${name}${tag}_full" "$@"
}

# Wan2.2 A14B: one run per expert (dit / vace = transformer, dit2 / vace2 = transformer_2). The high-noise expert
# takes the timestep indices [0, 0.417) of the 1000-step grid (t >= 875), the low-noise one [0.417, 1); the trainer
# derives the same boundaries from the folder's boundary_ratio when they are not given.
HIGH_NOISE=(--min_timestep_boundary 0 --max_timestep_boundary 0.417)
LOW_NOISE=(--min_timestep_boundary 0.417 --max_timestep_boundary 1)
