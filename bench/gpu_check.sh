#!/usr/bin/env bash
# One command for a lent GPU: build posattn._C, run the gpu-marked tests, measure the ceilings
# (device copy bandwidth, bf16 matmul rate), run the benchmark suites at sizes that fill the chip,
# and write the CSV, markdown tables, a plot and logs to $OUT (or the folder given as an argument).
#
#   bash bench/gpu_check.sh [OUT_DIR] [--dry-run] [--budget SECONDS] [--no-build] [--no-tests] [--with-ab]
#                           [--deep-fuzz N]
#
# --with-ab: also bench/bench_config_ab.py (60 s taken from the flash sweep): head_dim 256 learned-phase
# backward in the shipped sm_90 config (wgmma, 29 / 11 LDL spilled outside loops) vs a spill-free one
# (32-row / 32-key programs on mma.sync); the faster one should become BWD_CONFIGS[(256, "phases")].
#
# --deep-fuzz N: last, a stage (cap 120 s, kept from the benchmarks' time) running the CUDA C++
# backends' property-based fuzz tests (tests/test_fuzz_cuda.py, gpu-marked) under the deep hypothesis profile
# with N examples per test (POSATTN_FUZZ_EXAMPLES=N), random seeds, the example database in OUT_DIR/hyp (a
# failing example found there is replayed first by the next run with the same OUT_DIR). The tests run the
# most intricate kernels first (decode, varlen, ecoformer, rotary, unpad, pad); where N examples do not fit
# the cap, the stage is interrupted (SIGINT) 15 s before it, so pytest still prints the failures and the
# statistics of what ran. The ci count of those tests already runs in gpu_tests.
#
# Everything runs under one deadline (--budget, default 480 s = 8 minutes): each stage gets at most
# its own cap and never more than what is left, and the benchmark stages pass the time left to
# `python -m posattn bench --max-seconds`, which lists rows it had no time for as "skipped" (the
# table still comes out). --dry-run prints every stage with its cap and the benchmark rows it would
# run (`--list`, no device touched), and runs nothing.
#
# Outputs in OUT_DIR: env.log, build.log, gpu_tests.log, fuzz_cuda.log and hyp/ (the hypothesis example
# database; both with --deep-fuzz), ceilings.json, config_ab.json, bench.csv (all rows, with device, versions
# and git sha), models.md, flash.md, flash.png, gpu_results.md (the README section).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
BUILD=1
TESTS=1
AB=0
DEEP_FUZZ=0
BUDGET=480
OUT_DIR="${OUT:-bench/results}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-build) BUILD=0 ;;
    --no-tests) TESTS=0 ;;
    --with-ab) AB=1 ;;
    --budget) BUDGET="$2"; shift ;;
    --deep-fuzz) DEEP_FUZZ="${2:-}"; shift
      case "$DEEP_FUZZ" in ''|*[!0-9]*|0)
        echo "--deep-fuzz: expected a positive number of examples per test, got '$DEEP_FUZZ'" >&2; exit 2 ;;
      esac ;;
    *) OUT_DIR="$1" ;;
  esac
  shift
done
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
START=$(date +%s)

SPENT=0  # --dry-run charges each stage its full allotment, so the printed budgets are the worst case
left() { echo $(( BUDGET - ($(date +%s) - START) - SPENT )); }

run() {  # run <cap_s> <log name> <command...>: at most cap_s, never past the deadline
  local cap=$1 name=$2; shift 2
  local t; t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  echo "== $name (cap ${cap}s, ${t}s given): $*"
  if [ "$DRY" = 1 ]; then SPENT=$(( SPENT + (t > 0 ? t : 0) )); return 0; fi
  if [ "$t" -le 5 ]; then echo "== $name: skipped, no time left"; return 0; fi
  timeout "$t" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - START ))s in all"
  return 0
}

# benchmark rows: models at GPU size (every provider, fwd + fwd_bwd), then FlashAttention's shape sweep
# (fwd + fwd_bwd; FlexAttention left out of the sweep: it compiles once per shape and mode)
MODELS=(python -m posattn bench --size gpu --suite models --save "$OUT_DIR/bench.csv" --markdown "$OUT_DIR/models.md")
FLASH=(python -m posattn bench --size gpu --suite flash --modes fwd,fwd_bwd
       --providers posattn-triton,sdpa-flash,sdpa-cudnn,sdpa-efficient,flash_attn
       --save "$OUT_DIR/bench.csv" --markdown "$OUT_DIR/flash.md" --plot "$OUT_DIR/flash.png")

run 15  env bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch,triton;print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"'
if [ "$BUILD" = 1 ]; then
  # the GPU machine reaches no registry: no deps, no isolation; sm_90a only (the chip at hand) halves the build
  run 180 build env POSATTN_CUDA_ARCHS="${POSATTN_CUDA_ARCHS:-90a}" \
      python -m pip install -q --no-deps --no-build-isolation -e .
fi
[ "$TESTS" = 1 ] && run 90 gpu_tests python -m pytest -q -m gpu --no-header -p no:cacheprovider --maxfail=5
run 20  ceilings python bench/ceilings.py --out "$OUT_DIR/ceilings.json"
if [ "$DRY" = 1 ]; then
  echo "== models rows:"; "${MODELS[@]}" --device cuda --list | sed 's/^/   /'
  echo "== flash rows:";  "${FLASH[@]}" --device cuda --list | sed 's/^/   /'
fi
# kept from the benchmarks for the optional stages after them: --with-ab 60 s, --deep-fuzz 120 s
AB_S=0; [ "$AB" = 1 ] && AB_S=60
FZ_S=0; [ "$DEEP_FUZZ" -gt 0 ] && FZ_S=120
T=$(left); M=$(( (T - 20 - AB_S - FZ_S) / 2 )); [ "$M" -lt 0 ] && M=0
run "$(( M + 15 ))" bench_models "${MODELS[@]}" --max-seconds "$M"
T=$(left); F=$(( T - 15 - AB_S - FZ_S )); [ "$F" -lt 0 ] && F=0
run "$(( F + 15 ))" bench_flash "${FLASH[@]}" --max-seconds "$F"
# head_dim 256 learned-phase backward: the shipped wgmma config (epilogue spills) vs the spill-free mma.sync one
[ "$AB" = 1 ] && run 60 config_ab python bench/bench_config_ab.py --seqlen 2048 --out "$OUT_DIR/config_ab.json"
if [ "$DEEP_FUZZ" -gt 0 ]; then
  # SIGINT 15 s before the stage's time is up (then SIGKILL 10 s later): pytest reports what ran so far
  FZ=$(left); [ "$FZ" -gt 120 ] && FZ=120; FZ=$(( FZ - 15 )); [ "$FZ" -lt 1 ] && FZ=1
  run 120 fuzz_cuda timeout -s INT -k 10 "$FZ" env POSATTN_FUZZ_EXAMPLES="$DEEP_FUZZ" \
      HYPOTHESIS_STORAGE_DIRECTORY="$OUT_DIR/hyp" python -m pytest -p no:cacheprovider tests/test_fuzz_cuda.py -m gpu \
      --hypothesis-profile=deep --hypothesis-show-statistics -q
fi

if [ "$DRY" = 0 ]; then
  {
    echo "## GPU results"
    echo
    head -n 1 "$OUT_DIR/models.md" 2>/dev/null
    echo
    [ -f "$OUT_DIR/ceilings.json" ] && echo "Ceilings (bench/ceilings.py): \`$(tr -d '\n ' < "$OUT_DIR/ceilings.json")\`" && echo
    [ -f "$OUT_DIR/config_ab.json" ] && echo "Config A/B (bench/bench_config_ab.py): \`$(tr -d '\n ' < "$OUT_DIR/config_ab.json")\`" && echo
    echo "### Model shapes"; echo; tail -n +2 "$OUT_DIR/models.md" 2>/dev/null; echo
    echo "### FlashAttention's benchmark shapes"; echo; tail -n +2 "$OUT_DIR/flash.md" 2>/dev/null
  } > "$OUT_DIR/gpu_results.md"
fi
echo "results in $OUT_DIR after $(( $(date +%s) - START ))s"
