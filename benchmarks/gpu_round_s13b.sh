#!/usr/bin/env bash
# GPU round s13b (one H100 80 GB, ~400 s): the two reruns session 12 / 13 code changes need, nothing else.
#   1. Animate-2 480p: stock compiled, ours eager, ours compiled. Session 13 (760f3b2) replaced the dense processor's
#      per-frame torch.cat of the whole generation K / V with one buffer and a per-frame reference slot; session 12
#      measured ours compiled 9.3 GiB above stock (39.05 vs 29.73 GiB) and ours eager at 0.93x stock compiled.
#   2. Wan2.2-S2V-14B LoRA at 480p, plain and with activation offload: both ran out of memory in session 12, before
#      23092aa checkpointed the 12 audio injections with their blocks (expected ~60 GiB).
# Run through run_gpu_round.sh's install step:
#   run(command='bash benchmarks/run_gpu_round.sh "bash gpu_round_s13b.sh"', carry=[".whl"], kind="nvidia-h100-x1")
# CPU smoke test: cd benchmarks && TINY=1 OUT=/tmp/s13b bash gpu_round_s13b.sh
source "$(dirname "$0")/gpu_part.sh"
part animate2 220 python3 bench_animate2.py
part train_s2v 200 python3 bench_train.py --models s2v-14b --variants lora,lora-offload --warmup 1 --steps 1
mv "$OUT/bench_train.json" "$OUT/bench_train_s2v.json" 2>/dev/null
echo "total ${SECONDS} s"
