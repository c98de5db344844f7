#!/usr/bin/env bash
# Issue 22 on one GPU (H100 80 GB, or an H200 capped to 80 GB): the memory plan's predicted vs measured
# peak, and tokens/s of the automatic plan against DeepSpeed ALST's recipe, 1B and 8B shapes, P = 1.
#   OUT=benchmarks/results/<date>_<gpu> bash benchmarks/one_gpu_frontier.sh [plan_1b|thr_1b|thr_8b|plan_8b ...]
# Each phase writes <phase>.json and <phase>.log under $OUT (JSON rewritten after every configuration).
set -u
OUT=${OUT:?set OUT to the results folder}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
CAP=$($PY -c "import torch; print('--gpu-memory-gib 80' if torch.cuda.get_device_properties(0).total_memory > 90 * 2**30 else '')")
PHASES=${*:-plan_1b thr_1b thr_8b plan_8b}
for phase in $PHASES; do
  case $phase in
    plan_1b) cmd="$PY benchmarks/memory_plan_check.py $CAP --model 1b --seq 16384,65536,131072
                 --modes auto,none,full,selective,full+tiled,full+offload+tiled" ;;
    plan_8b) cmd="$PY benchmarks/memory_plan_check.py $CAP --model 8b --seq 16384,32768
                 --modes full,full+tiled,selective+offload+tiled" ;;
    thr_1b) cmd="$PY -m torch.distributed.run --nproc_per_node 1 benchmarks/bench_train.py --model 1b
                 --seq 16384,32768,65536,131072 --modes ulysses+auto,alst --sp 1 $CAP --steps 2 --warmup 1 --no-profile" ;;
    thr_8b) cmd="$PY -m torch.distributed.run --nproc_per_node 1 benchmarks/bench_train.py --model 8b --long-sequence
                 --seq 16384,32768,65536 --modes ulysses+auto,alst --sp 1 $CAP --steps 2 --warmup 1 --no-profile" ;;
    matmul) cmd="$PY benchmarks/matmul_peak.py --iters 20" ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
  echo "=== $phase: $cmd"
  $cmd --json "$OUT/$phase.json" > "$OUT/$phase.log" 2>&1
  echo "rc=$?"; grep -v "^ulysses_attn: memory plan" "$OUT/$phase.log" | tail -12
done
