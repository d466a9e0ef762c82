#!/usr/bin/env bash
# GPU round s12a (one H100 80 GB): what session 11's round cut -- Animate-2 480p with the "ours compiled" row,
# MOVA-360p / 720p release-size forwards, Wan2.2-S2V-14B LoRA training with activation offload and with layer offload
# (plain LoRA ran out of memory on 80 GB).  Run through run_gpu_round.sh's install step:
#   bash benchmarks/run_gpu_round.sh "bash gpu_round_s12a.sh"
# CPU smoke test: cd benchmarks && TINY=1 OUT=/tmp/s12a bash gpu_round_s12a.sh
# Estimates (session 11): animate2 stock compiled 68 s first call + ours eager + ours compiled (~45 s) ~190 s;
# mova-360p ~2.3 s and mova-720p ~22 s per forward, 1 warm-up + 2 timed each ~110 s; s2v-14b ~20-25 s/step,
# 1 warm-up + 1 step per variant + 2 builds ~120 s.
source "$(dirname "$0")/gpu_part.sh"
part animate2 210 python3 bench_animate2.py
part families_mova 150 python3 bench_new_families.py --rows mova-360p,mova-720p --warmup 1 --iters 2 --tag mova
part train_s2v 150 python3 bench_train.py --models s2v-14b:lora-offload+lora-model-offload --warmup 1 --steps 1
mv "$OUT/bench_train.json" "$OUT/bench_train_s2v.json" 2>/dev/null
echo "total ${SECONDS} s"
