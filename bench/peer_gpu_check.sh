#!/usr/bin/env bash
# Build megapeer._C, run the GPU tests and the PEER kernel benchmark, in one go.
# Run from the repository root on a CUDA machine (H100/H200). Needs torch (CUDA
# build), nvcc and the nvidia-cutlass headers: installed, or carried as a wheel in
# .whl/ (pip download --no-deps nvidia-cutlass==4.2.0.0 -d .whl). Imports only
# torch and megapeer.ops (no megatron-core). Logs and bench.json go to $OUT.
#
#   bench/peer_gpu_check.sh [all|build|test|bench] [extra bench args...]
set -uo pipefail
STAGE=${1:-all}; shift || true
OUT=${OUT:-$PWD/peer_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if ! $PY -c "import cutlass_library" 2>/dev/null && ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/nvidia_cutlass-*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee "$OUT/gpu.txt"

if [[ $STAGE == all || $STAGE == build ]]; then
  t0=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} MEGAPEER_BUILD_EXT=1 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
  echo "build: rc=$rc in $(( $(date +%s) - t0 )) s"
  if [[ $rc -ne 0 ]]; then grep -E -B2 -A6 "error" "$OUT/build.log" | head -80; exit 1; fi
  grep -E "spill|warning" "$OUT/build.log" | grep -v " 0 bytes spill" | head -20
fi

$PY -c "from megapeer.ops import kernel_status; print('kernel_status:', kernel_status())"

if [[ $STAGE == all || $STAGE == test ]]; then
  t0=$(date +%s)
  timeout 300 $PY -m pytest -q -p no:cacheprovider --maxfail=15 -rfs tests/test_peer_kernel.py \
      >"$OUT/tests.log" 2>&1
  echo "tests: rc=$? in $(( $(date +%s) - t0 )) s"
  grep -E "passed|failed|error|Error|assert" "$OUT/tests.log" | tail -40
fi

if [[ $STAGE == all || $STAGE == bench ]]; then
  timeout 400 $PY bench/peer_kernel.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
fi
