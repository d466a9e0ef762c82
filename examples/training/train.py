"""Train a Wan LoRA or fine-tune a Wan transformer (PEFT + accelerate).

    accelerate launch examples/training/train.py \\
        --dataset_base_path data/example_video_dataset \\
        --dataset_metadata_path data/example_video_dataset/metadata.csv \\
        --model_path Wan2.1-T2V-1.3B-diffusers \\
        --height 480 --width 832 --num_frames 81 --dataset_repeat 100 \\
        --learning_rate 1e-4 --num_epochs 5 --lora_base_model transformer --lora_rank 32 \\
        --use_gradient_checkpointing --output_path ./models/Wan2.1-T2V-1.3B_lora

Arguments follow DiffSynth-Studio's examples/wanvideo/model_training/train.py; see docs/training.md and
`python examples/training/train.py --help` (answered at once, from the command-line manifest).
"""

from diffusers_wan_ext_cli import train

if __name__ == "__main__":
    train()
