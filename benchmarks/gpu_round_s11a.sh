#!/usr/bin/env bash
# GPU round s11a (one H100 80 GB): Animate-2 480p, the new families' release-size forwards, S2V / VAP LoRA training
# and the 1.3B offload-training modes.  Run through the install step of run_gpu_round.sh (it sets PYTHONPATH and runs
# from benchmarks/):
#   bash benchmarks/run_gpu_round.sh "bash gpu_round_s11a.sh"
# CPU smoke test of the runner (every bench with --tiny): cd benchmarks && TINY=1 OUT=/tmp/s11a bash gpu_round_s11a.sh
# Each part has its own timeout (they sum to 540 s); a part that times out keeps the rows it wrote (every bench writes
# its JSON after each row).  Logs and JSON go to $OUT.  Estimated H100 times (from 14B 720p forward = 11 s, i.e.
# ~590 TFLOP/s effective; 1.3B 480p forward = 0.52 s; bench_train on 2026-11-21: 14B LoRA 480p 16.5 s/step, 56.7 GiB
# peak; 1.3B 3.7 s/step, 12.1 GiB):
#   animate2 480p: 3 variants x 6 passes of ~3 s + compiles (stock flex ~60 s, ours ~45 s)   ~140 s (timeout 150)
#   mova-360p (27 280 tokens, ~2.3 s): eager 1 + 3 forwards; compiled: both towers'
#     compile_repeated_blocks (~60 s) + 3 forwards                                         ~90 s  (timeout 95)
#   dancer-global / dancer-local (136 800 tokens, ~32 s each) and mova-720p (111 600 tokens,
#     ~22 s): build ~6 s + one timed forward each, no warm-up (first-call overhead < 1 %)   ~110 s (timeout 120)
#   s2v-14b lora (~17 s/step, ~60 GiB) and vap-14b lora-offload (20.7 B params = 38.5 GiB of
#     weights: plain checkpointing would need ~85 GiB; ~28 s/step), 1 warm-up + 1 step each  ~110 s (timeout 120)
#   1.3b lora / lora-model-offload / lora-model-optim-offload, 1 warm-up + 1 step each        ~50 s  (timeout 55)
# Dancer has no compiled row here (compile + two 32 s forwards per model do not fit the round); run
#   python3 bench_new_families.py --rows dancer-local --compile --no-eager --warmup 1 --iters 1   for it.
source "$(dirname "$0")/gpu_part.sh"
part animate2 150 python3 bench_animate2.py
# LEAN=1: no compiled MOVA-360p row (~35 s instead of ~90 s); LEAN=2: no MOVA-360p row (MOVA-720p stays in
# families_big), for a round with little device time left
if [ "${LEAN:-}" = 2 ]; then
  echo "--- families_mova360: skipped (LEAN=2)"
elif [ -n "${LEAN:-}" ]; then
  part families_mova360 40 python3 bench_new_families.py --rows mova-360p --warmup 1 --iters 3 --tag mova360
else
  part families_mova360 95 python3 bench_new_families.py --rows mova-360p --compile --warmup 1 --iters 3 --tag mova360
fi
part families_big 120 python3 bench_new_families.py --rows dancer-global,dancer-local,mova-720p --warmup 0 --iters 1 \
  --tag big
part train_14b 120 python3 bench_train.py --models s2v-14b,vap-14b:lora-offload --variants lora --warmup 1 --steps 1
mv "$OUT/bench_train.json" "$OUT/bench_train_14b.json" 2>/dev/null
part train_13b_offload 55 python3 bench_train.py --models 1.3b --variants lora,lora-model-offload,lora-model-optim-offload \
  --warmup 1 --steps 1
mv "$OUT/bench_train.json" "$OUT/bench_train_13b_offload.json" 2>/dev/null
echo "total ${SECONDS} s"
