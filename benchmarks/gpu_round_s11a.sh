#!/usr/bin/env bash
# GPU round s11a (one H100 80 GB): Animate-2 480p, the new families' release-size forwards, S2V / VAP LoRA training
# and the 1.3B offload-training modes.  Run through the install step of run_gpu_round.sh (it sets PYTHONPATH and runs
# from benchmarks/):
#   bash benchmarks/run_gpu_round.sh "bash gpu_round_s11a.sh"
# CPU smoke test of the runner (every bench with --tiny): cd benchmarks && TINY=1 OUT=/tmp/s11a bash gpu_round_s11a.sh
# Each part has its own timeout (they sum to 545 s); a part that times out keeps the rows it wrote (every bench writes
# its JSON after each row).  Logs and JSON go to $OUT.  Estimated H100 times (from 14B 720p forward = 11 s, 1.3B 480p
# forward = 0.52 s, 14B LoRA 480p step = 16.5 s and 1.3B = 3.7 s in bench_train on 2026-11-21):
#   animate2 480p (stock compiled / ours / ours compiled)                      ~120 s  (timeout 140)
#   mova-360p eager (1 + 3 forwards of ~2.3 s) + compiled (compile ~60-80 s)   ~95 s   (timeout 110)
#   dancer-global / dancer-local (136 800 tokens, ~32 s each), mova-720p
#     (111 600 tokens, ~22 s): one timed forward each, no warm-up           ~110 s  (timeout 125)
#   s2v-14b (~16 s/step) and vap-14b (~25 s/step) LoRA, 1 warm-up + 1 step    ~95 s   (timeout 110)
#   1.3b lora / lora-model-offload / lora-model-optim-offload, 1 + 2 steps     ~50 s   (timeout 60)
set -uo pipefail
OUT=${OUT:-out}
export OUT
mkdir -p "$OUT"
part() {  # part NAME TIMEOUT COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "--- $name (timeout ${limit}s)"
  timeout -k 5 "$limit" "$@" ${TINY:+--tiny} > "$OUT/$name.log" 2>&1
  local rc=$?
  # short output: the per-row lines and the table (the full log is in $OUT)
  grep -E '^\||^\{|s/step|: [0-9.]+ s|OOM|Error|Traceback' "$OUT/$name.log" | grep -v -i warn | tail -n 30
  echo "--- $name: rc $rc, $((SECONDS - start)) s"
}
part animate2 140 python3 bench_animate2.py
part families_mova360 110 python3 bench_new_families.py --rows mova-360p --compile --warmup 1 --iters 3 --tag mova360
part families_big 125 python3 bench_new_families.py --rows dancer-global,dancer-local,mova-720p --warmup 0 --iters 1 \
  --tag big
part train_14b 110 python3 bench_train.py --models s2v-14b,vap-14b --variants lora --warmup 1 --steps 1 \
  --oom-fallback lora-offload
mv "$OUT/bench_train.json" "$OUT/bench_train_14b.json" 2>/dev/null
part train_13b_offload 60 python3 bench_train.py --models 1.3b --variants lora,lora-model-offload,lora-model-optim-offload \
  --warmup 1 --steps 2
mv "$OUT/bench_train.json" "$OUT/bench_train_13b_offload.json" 2>/dev/null
echo "total ${SECONDS} s"
