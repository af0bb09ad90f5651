#!/usr/bin/env bash
# The GPU check in one command, on a machine with a CUDA GPU, from the repository root:
#
#     OUT=results_dir bash gpu_tests/run.sh [h100|h100-quick]
#
# 1. the GPU test suite (compiled Triton kernels against the reference and cuDNN), then
# 2. `fastlstm bench` with the given preset (default h100-quick), cuDNN timed in the same run.
# Everything lands in $OUT (default ./gpu_results): environment, test log and junit XML, bench table,
# JSON rows (saved after every row, so a run cut short keeps what it measured) and a plot.
# TESTS_TIMEOUT / BENCH_TIMEOUT (seconds, default 210 / 250) and MAXFAIL bound the two parts.
# Needs no network: fastlstm runs from src/ (the GPU image's torch, triton, pytest are used).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_results}
PRESET=${1:-h100-quick}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); print('triton', triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
  git rev-parse HEAD 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

start=$(date +%s)
# Each new configuration compiles its kernels (seconds each): spread the tests over processes when
# pytest-xdist is there (the GPU image has it); the GPU is shared by them.
PARALLEL=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || true)
timeout ${TESTS_TIMEOUT:-210} $PY -m pytest gpu_tests -q --maxfail=${MAXFAIL:-10} -rfE --tb=short $PARALLEL -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
  2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu tests: exit $tests_rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu_tests.log"

start=$(date +%s)
timeout ${BENCH_TIMEOUT:-250} $PY -m fastlstm bench --preset "$PRESET" --json "$OUT/bench_$PRESET.json" --plot "$OUT/bench_$PRESET.png" \
  2>&1 | tee "$OUT/bench_$PRESET.txt"
bench_rc=${PIPESTATUS[0]}
echo "bench: exit $bench_rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/bench_$PRESET.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))
