"""Training Wan models with PEFT + accelerate (``examples/training/train.py``, ``docs/training.md``).

* :mod:`.args` -- the command line (DiffSynth-Studio's argument names);
* :mod:`.dataset` -- metadata (csv / json / jsonl) datasets with row-naming errors;
* :mod:`.components` -- loading a converted folder or an original release;
* :mod:`.release_cache` -- family releases converted once and reused (``--conversion_cache_dir``);
* :mod:`.inputs` -- conditioning through the pipelines' own code;
* :mod:`.flow_match` -- DiffSynth-Studio's timestep sampling and loss weighting;
* :mod:`.modules` -- LoRA / full fine-tuning, fp8 storage, gradient checkpointing, the loss;
* :mod:`.checkpoints` -- checkpoint folders without pickle, found / checked / written safely;
* :mod:`.distill` -- DiffSynth-Studio's direct distillation (``--task direct_distill``);
* :mod:`.offload` -- layer-level CPU offload training (``--enable_model_cpu_offload``);
* :mod:`.quantized_base` -- LoRA on quantized frozen weights (GGUF / fp8 files, ``--quant_options``);
* :mod:`.model_ids` -- ``--model_id_with_origin_paths`` resolved to local files;
* :mod:`.trainer` -- the accelerate loop, checkpoints and exact resume, the two-stage cache.
"""

from .args import parse_args
from .dataset import EXTRA_INPUTS, DatasetRowError, VideoDataset
from .flow_match import FlowMatchTrainingSchedule, expert_timestep_boundaries
from .trainer import CachedDataset, main, run_training

__all__ = [
    "EXTRA_INPUTS",
    "CachedDataset",
    "DatasetRowError",
    "FlowMatchTrainingSchedule",
    "VideoDataset",
    "expert_timestep_boundaries",
    "main",
    "parse_args",
    "run_training",
]
