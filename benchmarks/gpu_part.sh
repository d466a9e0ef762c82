#!/usr/bin/env bash
# Shared by the gpu_round_*.sh runners: `part NAME TIMEOUT COMMAND...` runs one bench under its own timeout, keeps
# its full log in $OUT/NAME.log and prints the per-row lines, the table and its exit status.
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
