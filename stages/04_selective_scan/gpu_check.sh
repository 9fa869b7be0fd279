#!/usr/bin/env bash
# One full GPU check of stage 04 on a CUDA machine, every log under $OUT:
#   build (sm_90) -> stage-04 pytest on the GPU -> bench_cuda.py --check (float64
#   reference, determinism, poisoned outputs), unsplit and with the length split
#   in 3 pieces -> compute-sanitizer memcheck and racecheck on small
#   forward/backward cases (both) -> linear-scan benchmark -> selective-scan
#   benchmark -> the length-split sweep (bench_split.py).
#
#   OUT=/tmp/out bash stages/04_selective_scan/gpu_check.sh [--quick] [--no-build] [--check-64bit]
#
# --quick: benchmark only the CUDA kernel and SDPA (no PyTorch baselines).
# Steps run in order and keep going after a failure; the exit code is the
# number of failed steps. Meant for the lent H100 (`run` tool), also fine elsewhere.
set -u
OUT=${OUT:-$(pwd)/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
QUICK=0 BUILD=1 BIG=""
for a in "$@"; do
  case $a in
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    --check-64bit) BIG="--check-64bit" ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
fails=0
step() {  # step NAME LOG CMD...: run, log, report
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  "$@" >"$OUT/$log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc in $((SECONDS - t0)) s (log: $log)"
  tail -n 4 "$OUT/$log" | sed 's/^/    /'
  [ $rc -eq 0 ] || fails=$((fails + 1))
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
  $PY -m pip show scikit-build-core pybind11 2>/dev/null | grep -E '^(Name|Version)'
  $PY -m pip config list 2>/dev/null; echo "PIP_NO_BUILD_ISOLATION=${PIP_NO_BUILD_ISOLATION:-unset}"
  nvcc --version | tail -n 1
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

if [ $BUILD = 1 ]; then
  step build build.log $PY -m pip install --no-build-isolation --no-deps -e . \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 -Cbuild.verbose=false || { echo "build failed"; exit 1; }
fi
$PY -c "from ssmlab.core import native; print(native.describe())"

step check check.log $PY stages/04_selective_scan/bench_cuda.py --check $BIG --out "$OUT"
step check-split check_split.log $PY stages/04_selective_scan/bench_cuda.py --check --segments 3 --out "$OUT"
step pytest pytest.log $PY -m pytest stages/04_selective_scan/tests -q -p no:cacheprovider
for tool in memcheck racecheck; do
  step "sanitizer-$tool" "sanitizer_$tool.log" compute-sanitizer --tool $tool --error-exitcode 1 \
    --kernel-name kns=ssmlab $PY stages/04_selective_scan/bench_cuda.py --sanitize
done
if [ -f stages/04_selective_scan/bench_linear_scan.py ]; then
  step bench-linear bench_linear.log $PY stages/04_selective_scan/bench_linear_scan.py --device cuda --out "$OUT"
fi
if [ $QUICK = 1 ]; then
  step bench bench.log $PY stages/04_selective_scan/bench_cuda.py --skip-baselines --out "$OUT"
else
  step bench bench.log $PY stages/04_selective_scan/bench_cuda.py --out "$OUT"
fi
step bench-split bench_split.log $PY stages/04_selective_scan/bench_split.py --out "$OUT"
tail -n 14 "$OUT/bench.log"
echo "failed steps: $fails"
exit $fails
