#!/usr/bin/env bash
# The one script to run on a GPU machine (one H100/H200, under 10 minutes): what only a GPU can show.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: results/benchmarks
#
# Steps (each writes results/benchmarks/gpu-*.json, or OUT_DIR/gpu-*.json; a failing step is recorded and the
# others still run):
#   1. environment: GPU, torch/transformers/peft versions, flash-attention import and a flash-attention forward
#   2. bf16: one LoRA step of the tiny model loaded in bf16 (head kept in float32, every head weight moves)
#   3. benchmark.py train-step --full-size   (InternVL3.5-1B architecture, random weights: samples/s, MFU)
#   4. benchmark.py encode --full-size       (pages and queries per second, MFU)
#   5. benchmark.py memory --full-size       (the memory model against measured peaks)
#   6. a 100-step LoRA loss curve on a real-format dataset made locally (colpali_train_set columns)
# The GPU machines have torch, transformers, peft and accelerate but not mteb or colpali-engine: carry their wheels in
# .whl/ (see docs/installation.md); they are installed with --no-deps into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/benchmarks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline COLINTERN_HOME=${COLINTERN_HOME:-/tmp/colintern_home}
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-}
status=0
step() {  # step NAME COMMAND...: run, time, and keep going on failure
  local name=$1; shift
  local started=$SECONDS
  echo "=== $name: $*"
  if "$@" > "$OUT/gpu-$name.log" 2>&1; then
    echo "=== $name: ok in $((SECONDS - started)) s"
  else
    echo "=== $name: FAILED (exit $?) in $((SECONDS - started)) s; last lines:"; tail -n 20 "$OUT/gpu-$name.log"; status=1
  fi
}

step environment $PY -m colintern.benchmarks.gpu_check environment --output "$OUT/gpu-environment.json"
step bf16-step $PY -m colintern.benchmarks.gpu_check bf16-step --output "$OUT/gpu-bf16-step.json"
step train-step $PY scripts/benchmark.py train-step --full-size --steps 10 --warmup 3 --output-dir "$OUT" --tag gpu-full-size
step encode $PY scripts/benchmark.py encode --full-size --output-dir "$OUT" --tag gpu-full-size
step memory $PY scripts/benchmark.py memory --full-size --output-dir "$OUT" --tag gpu-full-size
step lora-curve $PY -m colintern.benchmarks.gpu_check lora-curve --steps 100 --output "$OUT/gpu-lora-curve.json"
exit $status
