#!/usr/bin/env bash
# One command for a lent GPU: build posattn._C, run the gpu-marked tests, measure the ceilings
# (device copy bandwidth, bf16 matmul rate), run the benchmark suite at sizes that fill the chip,
# and write the CSV, a markdown table and logs to $OUT (or the folder given as the first argument).
#
#   bash bench/gpu_check.sh [OUT_DIR] [--dry-run]
#
# Budget: build ~2-4 min, tests ~1-2 min, ceilings ~10 s, benchmarks under 8 minutes in all
# (each stage has its own timeout so one slow stage cannot eat the others).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT_DIR="${OUT:-bench/results}"
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    *) OUT_DIR="$a" ;;
  esac
done
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

run() {  # run <timeout_s> <log name> <command...>
  local t=$1 name=$2; shift 2
  echo "== $name (timeout ${t}s): $*"
  if [ "$DRY" = 1 ]; then return 0; fi
  timeout "$t" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  return 0
}

run 60  env        bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch,triton;print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"'
run 420 install    python -m pip install -q --no-deps --no-build-isolation -e .   # the GPU machine reaches no registry
run 300 gpu_tests  python -m pytest -q -m gpu -x --no-header -p no:cacheprovider
run 120 ceilings   python bench/ceilings.py --out "$OUT_DIR/ceilings.json"
run 480 bench      python -m posattn bench --size gpu --save "$OUT_DIR/bench.csv" --markdown "$OUT_DIR/bench.md"
echo "results in $OUT_DIR"
