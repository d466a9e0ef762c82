# Sourced by examples/training/{lora,full}/*.sh.
#   MODEL: a converted Diffusers folder (diffusers-wan convert SRC DST) or the original release folder itself.
#   DATA:  a dataset folder with metadata.csv (DiffSynth-Studio layout: video,prompt + extra input columns), e.g.
#          modelscope download --dataset DiffSynth-Studio/diffsynth_example_dataset --local_dir ./data/diffsynth_example_dataset
#   OUT:   output root (default ./models/train).
# Extra arguments given to a script are passed on to train.py (e.g. --max_train_steps 10 --export_format original).
TRAINING_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-./models/train}

# launch CONFIG ARGS...: accelerate launch train.py with examples/training/accelerate_configs/CONFIG.yaml
launch() {
  local config=$1
  shift
  accelerate launch --config_file "$TRAINING_DIR/accelerate_configs/$config.yaml" "$TRAINING_DIR/train.py" "$@"
}

# dataset NAME: the dataset arguments for DATA (default: the DiffSynth-Studio example dataset of NAME)
dataset() {
  local data=${DATA:-./data/diffsynth_example_dataset/wanvideo/$1}
  echo --dataset_base_path "$data" --dataset_metadata_path "$data/metadata.csv"
}
