#!/usr/bin/env bash
# One device call for the foundation / training / performance issues: install the carried
# wheels (.whl: megatron-core, nvidia-cutlass), build the PEER kernels, then check and time.
# Logs go to $OUT. Run from the repository root on an H100/H200.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
bash bench/peer_gpu_check.sh build 2>&1 | tail -3
python3 -m megapeer.cli info
STAGES=${STAGES:-sdpa,t100m,t1b,resume}
if [[ $STAGES == *sdpa* ]]; then
  timeout 120 python3 bench/sdpa_mla.py 2>&1 | tee "$OUT/sdpa.txt"
fi
if [[ $STAGES == *t100m* ]]; then
  timeout 300 python3 bench/train_throughput.py --size 100m --json "$OUT/t100m.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/t100m.txt" | tail -6
fi
if [[ $STAGES == *t1b* ]]; then
  timeout 400 python3 bench/train_throughput.py --size 1b --json "$OUT/t1b.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/t1b.txt" | tail -6
fi
if [[ $STAGES == *resume* ]]; then
  python3 -m megapeer.data.demo --out /tmp/demo --max-mb 2 >/dev/null
  timeout 240 python3 bench/resume_check.py --data /tmp/demo --steps 8 \
    training.use_distributed_optimizer=true 2>&1 | grep -v -i warn | tee "$OUT/resume.txt" | tail -8
fi
if [[ $STAGES == *layouts* ]]; then
  [[ -f /tmp/demo/tokenizer.model ]] || python3 -m megapeer.data.demo --out /tmp/demo --max-mb 4 >/dev/null
  timeout 560 python3 bench/layout_scaling.py --data /tmp/demo --gpus "${GPUS:-4}" --steps 10 \
    --json "$OUT/layouts.json" 2>&1 | grep -v -i warn | tee "$OUT/layouts.txt" | tail -20
fi
