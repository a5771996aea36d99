#!/usr/bin/env bash
# One device call for the training / performance issues: install the carried wheels (.whl:
# megatron-core, nvidia-cutlass), build the PEER kernels (skipped when already built on this
# machine), then check and time the stages named in STAGES. Logs and JSON go to $OUT.
# Run from the repository root on an H100/H200, e.g.
#   STAGES=prof1b,layouts GPUS=2 bash bench/gpu_session.sh
# PARALLEL runs stage lists side by side, one GPU each, logs in $OUT/gpuN.log, e.g.
#   PARALLEL="0:grouped 1:grouped1bc 2:parity,tune" bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ ! -d /tmp/site/megatron ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
[[ -n ${SKIP_BUILD:-} ]] || python3 -c "import megapeer._C" 2>/dev/null || bash bench/peer_gpu_check.sh build 2>&1 | tail -3
python3 -m megapeer.cli info | grep -i peer
# PREP_DEMO=1: the demo corpus once, before parallel jobs that both need it
[[ -n ${PREP_DEMO:-} && ! -f /tmp/demo/tokenizer.model ]] && python3 -m megapeer.data.demo --out /tmp/demo --max-mb 4 >/dev/null
if [[ -n ${PARALLEL:-} ]]; then
  for job in $PARALLEL; do
    gpu=${job%%:*}
    CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=8 STAGES=${job#*:} SKIP_BUILD=1 PARALLEL= NO_BUNDLE=1 \
      OUT=$OUT/gpu$gpu bash "$0" > "$OUT/gpu$gpu.log" 2>&1 &
  done
  wait
  for job in $PARALLEL; do echo "=== GPU ${job%%:*}: ${job#*:}"; tail -${TAIL:-40} "$OUT/gpu${job%%:*}.log"; done
fi
bundle() {  # the device tool returns at most 8 files: everything in $OUT as one archive
  [[ -n ${NO_BUNDLE:-} ]] && return
  (cd "$OUT" && tar -czf /tmp/results.tgz . && find . -mindepth 1 -delete && mv /tmp/results.tgz .)
}
[[ -n ${PARALLEL:-} ]] && { bundle; exit 0; }
STAGES=${STAGES:-sdpa,t100m,t1b,resume}
tput() {  # name timeout args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 bench/train_throughput.py --json "$OUT/$name.json" "$@" 2>&1 \
    | grep -v -i warn | tee "$OUT/$name.txt" | tail -${TAIL:-8}
}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
has sdpa && timeout 120 python3 bench/sdpa_mla.py 2>&1 | tee "$OUT/sdpa.txt"
has t100m && tput t100m 200 --size 100m
has t1b && tput t1b 400 --size 1b
# eager 1B runs with two profiled steps per variant (traces and summaries in $OUT/prof1b)
has prof1b && TAIL=80 tput prof1b 420 --size 1b --profile /tmp/prof1b
has compile1b && TAIL=40 tput compile1b 400 --size 1b --variants mla_dense --compile \
  --profile /tmp/compile1b
has mbs2 && tput mbs2 200 --size 1b --variants mla_dense \
  --set training.micro_batch_size=2 training.global_batch_size=8
# the same 1B runs with training.compile (the baseline stays Megatron's eager local spec)
has after1b && TAIL=80 tput after1b 420 --size 1b --compile --profile /tmp/after1b
has mbs2c && tput mbs2c 200 --size 1b --variants mla_dense --compile \
  --set training.micro_batch_size=2 training.global_batch_size=8
# CUDA graphs through torch.compile's reduce-overhead mode, micro-batch 1 and 2
has ro1b && tput ro1b 200 --size 1b --variants mla_dense --compile reduce-overhead
has ro1b2 && tput ro1b2 150 --size 1b --variants mla_dense --compile reduce-overhead \
  --set training.micro_batch_size=2 training.global_batch_size=8
has ccheck && timeout 240 python3 bench/compile_check.py 2>&1 | grep -v -i warn | tee "$OUT/ccheck.txt" | tail -4
has topk && timeout 60 python3 bench/peer_topk.py 2>&1 | tee "$OUT/topk.txt"
# the grouped Triton PEER kernels: checks (fp32 and bf16), kernel timings; the 1B PEER step
has grouped && timeout 150 python3 -m pytest -q -x tests/test_peer_grouped.py 2>&1 | tail -25
has grouped && timeout 200 python3 bench/peer_kernel.py --sizes ${KSIZES:-small,reuse,reuse128,reuse32} --no-variants \
  --no-breakdown --json "$OUT/grouped_kernel.json" 2>&1 | tail -8
has grouped1b && TAIL=90 tput grouped1b 500 --size 1b --variants mla_dense,mla_peer,mla_peer_wide \
  --set model.peer.kernel=grouped --profile /tmp/grouped1b
# the same with training.compile (the grouped ops are custom ops with fake implementations)
has grouped1bc && TAIL=12 tput grouped1bc 550 --size 1b --compile --set model.peer.kernel=grouped \
  --variants ${C1B_VARIANTS:-mla_dense,mla_peer,mla_peer_wide}
# compiled 1B runs with the default kernel choice (auto)
has auto1bc && TAIL=12 tput auto1bc 550 --size 1b --compile \
  --variants ${C1B_VARIANTS:-mla_dense,mla_peer,mla_peer_wide,mla_peer_wider}
# eager profile of the widest PEER variant
has wider1b && TAIL=70 tput wider1b 400 --size 1b --variants mla_dense,mla_peer_wider --profile /tmp/wider1b
# the wide variant with the fused CUDA kernels, for comparison
has widefused && tput widefused 300 --size 1b --variants mla_peer_wide
has tune && timeout ${TUNE_LIMIT:-330} python3 bench/grouped_tune.py --json "$OUT/tune.json" ${TUNE_ARGS:-} 2>&1 \
  | tee "$OUT/tune.txt" | tail -12
# compiled 1B steps under the profiler (where the time goes with training.compile)
has prof1bc && TAIL=70 tput prof1bc 420 --size 1b --compile --variants mla_dense,mla_peer_wider \
  --profile /tmp/prof1bc
# compiled 1B, micro-batch 2 (global batch 8)
has mbs2pc && tput mbs2pc 420 --size 1b --compile --variants ${MB2_VARIANTS:-mla_dense,mla_peer_wide,mla_peer_wider} \
  --set training.micro_batch_size=2 training.global_batch_size=8
# torch's grouped GEMM path (model.peer.kernel=gmm): checks on the GPU, kernel timings
# against the grouped Triton kernels, compiled 1B runs with it; the fused-Adam switch
has gmm && timeout 200 python3 -m pytest -q -x tests/test_peer_gmm.py tests/test_optimizer.py 2>&1 | tail -6
has gmm && timeout 200 python3 bench/peer_kernel.py --sizes ${KSIZES:-wider,m128,m64_512,m32_512} \
  --paths grouped,gmm --no-variants --no-breakdown --json "$OUT/gmm_kernel.json" 2>&1 | tail -8
has gmmdet && timeout 200 python3 bench/peer_kernel.py --sizes ${KSIZES:-wider,m128,m64_512,m32_512} \
  --paths grouped,gmm --no-variants --no-breakdown --deterministic --json "$OUT/gmm_det.json" 2>&1 | tail -8
has gmm1bc && TAIL=12 tput gmm1bc 550 --size 1b --compile --set model.peer.kernel=gmm \
  --variants ${C1B_VARIANTS:-mla_dense,mla_peer_wider}   # mla_peer_wide: 1024 experts, > gmm's 1023
has mbs2adam && tput mbs2adam 420 --size 1b --compile --variants mla_dense,mla_peer_wider \
  --set training.micro_batch_size=2 training.global_batch_size=8 training.fused_adam=false
has adamoff && TAIL=12 tput adamoff 450 --size 1b --compile --set training.fused_adam=false \
  --variants ${C1B_VARIANTS:-mla_dense,mla_peer_wider}
# gradient-accumulation fusion of the PEER tables (model.peer.grad_accum_fusion): GPU checks,
# kernel timings with and without it, and 1B (micro-batch 2) / 100M training steps on / off
has accum && timeout 240 python3 -m pytest -q -x tests/test_grad_accum.py tests/test_peer_kernel.py \
  tests/test_peer_grouped.py 2>&1 | tail -4
has accum && timeout 200 python3 bench/peer_kernel.py --sizes ${KSIZES:-small,large,wider} --accumulate \
  --no-variants --no-breakdown --json "$OUT/accum_kernel.json" 2>&1 | tail -12
has acc1bc && tput acc1bc 300 --size 1b --compile --variants mla_dense,mla_peer_wider \
  --set training.micro_batch_size=2 training.global_batch_size=8
has acc1bc && tput acc1bc_off 200 --size 1b --compile --variants mla_peer_wider \
  --set training.micro_batch_size=2 training.global_batch_size=8 model.peer.grad_accum_fusion=false
has acc100m && tput acc100m 150 --size 100m --variants mla_dense,mla_peer
has acc100m && tput acc100m_off 100 --size 100m --variants mla_peer --set model.peer.grad_accum_fusion=false
# fused vs grouped PEER kernels in real training (~100M, experts of width 16): losses, tok/s
if has parity; then
  [[ -f /tmp/demo/tokenizer.model ]] || python3 -m megapeer.data.demo --out /tmp/demo --max-mb 4 >/dev/null
  timeout ${PARITY_LIMIT:-450} python3 bench/kernel_parity.py --data /tmp/demo --steps 20 --json "$OUT/parity.json" \
    ${PARITY_ARGS:-} 2>&1 | grep -v -i warn | tail -8
fi
has ktest && timeout 200 python3 -m pytest -q -x tests/test_peer_kernel.py 2>&1 | tail -4
if has sync; then  # synchronising call sites of the trainer (~100M MLA+PEER, 12 steps)
  [[ -f /tmp/demo/tokenizer.model ]] || python3 -m megapeer.data.demo --out /tmp/demo --max-mb 4 >/dev/null
  model=$(python3 -c "from bench.train_throughput import GPU_100M as a, GPU_100M_PEER as b; print(*a, *b)")
  timeout ${SYNC_LIMIT:-150} python3 bench/sync_check.py --config examples/tiny_cpu.yaml $model \
    model.vocab_size=4096 data.tokenizer.path=/tmp/demo/tokenizer.model \
    data.blend=[/tmp/demo/stdlib_text_document] training.train_iters=12 training.warmup_iters=2 \
    training.eval_interval=0 training.micro_batch_size=4 training.global_batch_size=8 \
    training.deterministic=false logging.log_interval=4 logging.expert_usage_interval=4 \
    checkpoint.save=false checkpoint.resume=none logging.run_dir=/tmp/sync ${SYNC_ARGS:-} \
    > "$OUT/sync.log" 2>&1
  echo "sync_check exit $?"; grep -A25 "synchronising call sites" "$OUT/sync.log" | cut -c1-200
fi
if has resume; then
  python3 -m megapeer.data.demo --out /tmp/demo --max-mb 2 >/dev/null
  timeout 240 python3 bench/resume_check.py --data /tmp/demo --steps 8 \
    training.use_distributed_optimizer=true 2>&1 | grep -v -i warn | tee "$OUT/resume.txt" | tail -8
fi
tp2_compiled() {  # run_dir [prefix command...]: the layout model, TP2, compiled, on 2 GPUs
  local run_dir=$1; shift
  [[ -f /tmp/demo/tokenizer.model ]] || python3 -m megapeer.data.demo --out /tmp/demo --max-mb 4 >/dev/null
  local model
  model=$(python3 -c "from bench.train_throughput import GPU_100M as a, GPU_100M_PEER as b; print(*a, *b)")
  "$@" python3 -m torch.distributed.run --standalone \
    --nproc_per_node=2 -m megapeer.train --config examples/tiny_cpu.yaml $model \
    model.peer.num_experts=[128,128] model.vocab_size=4096 data.tokenizer.path=/tmp/demo/tokenizer.model \
    data.blend=[/tmp/demo/stdlib_text_document] training.train_iters=${TPC_STEPS:-6} training.warmup_iters=2 \
    training.eval_interval=0 logging.log_interval=1 logging.expert_usage_interval=0 logging.run_dir=$run_dir \
    checkpoint.save=false checkpoint.resume=none parallel.tensor=2 training.compile=true ${TPC_ARGS:-}
}
if has tpc; then  # compile under TP2 on GPUs (the layout model): per-step log, recompiles
  tp2_compiled /tmp/tpc env TORCH_LOGS=recompiles,graph_breaks timeout ${TPC_LIMIT:-240} > "$OUT/tpc.log" 2>&1
  echo "tpc exit $?: $(grep -c Recompiling "$OUT/tpc.log") recompiles, $(grep -ci 'graph break' "$OUT/tpc.log") graph-break lines"
  grep -i "step \|tokens/s" "$OUT/tpc.log" | tail -8
  grep -B14 -m1 "Error:" "$OUT/tpc.log" | grep -v "__graph_breaks" | cut -c1-220
  cp /tmp/tpc/metrics.jsonl "$OUT/tpc_metrics.jsonl" 2>/dev/null
fi
# training.fused_cross_entropy off / on, 1.3B compiled at micro-batch 2 (CE_VARIANTS)
for ce in off on; do
  has ce1b && tput ce1b_$ce ${CE_LIMIT:-280} --size 1b --compile --variants ${CE_VARIANTS:-mla_dense,mla_peer_wider} \
    --set training.micro_batch_size=2 training.global_batch_size=8 \
    training.fused_cross_entropy=$([[ $ce == on ]] && echo true || echo false) ${CE_ARGS:-}
done
# the Triton AdamW + copy, the product-key top-k and the narrow expert sort: GPU tests, kernel
# timings, then the 1.3B compiled step at micro-batch 2 with the first two off, then on (defaults)
if has optkern; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_adam.py tests/test_product_topk.py \
    tests/test_optimizer.py tests/test_peer_grouped.py 2>&1 | tail -3
  timeout 90 python3 bench/adam_copy.py --json "$OUT/adam_copy.json" 2>&1 | grep -v -i warn | tail -4
  timeout 90 python3 bench/product_topk.py --json "$OUT/product_topk.json" 2>&1 | grep -v -i warn | tail -6
  timeout 90 python3 bench/expert_sort.py --json "$OUT/expert_sort.json" 2>&1 | grep -v -i warn | tail -5
  for k in off on; do
    tput optkern_$k ${OPTKERN_LIMIT:-240} --size 1b --compile --steps 6 --warmup 2 \
      --variants ${OPTKERN_VARIANTS:-mla_dense,mla_peer_wider} --set training.micro_batch_size=2 \
      training.global_batch_size=8 model.peer.defer_table_grads=4 \
      $([[ $k == off ]] && echo "training.triton_adam=false model.peer.topk_kernel=torch")
  done
fi
if has tpcdiag; then  # a hung compiled TP2 run: Python stacks (SIGUSR2) and py-spy of each rank
  tp2_compiled /tmp/tpcd env TORCH_LOGS=recompiles ${DIAG_ENV:-} > "$OUT/tpcdiag.log" 2>&1 &
  job=$!
  for _ in $(seq ${DIAG_WAIT:-90}); do sleep 1; kill -0 $job 2>/dev/null || break; done
  launcher=$(pgrep -f "torch.distributed.run .*run_dir=/tmp/tpcd" | head -1)
  for pid in $([[ -n $launcher ]] && pgrep -P "$launcher" -f "megapeer.train"); do
    kill -USR2 "$pid"; sleep 1
    timeout 30 /tmp/site/bin/py-spy dump --native --pid "$pid" > "$OUT/pyspy_$pid.txt" 2>&1
  done
  sleep 3; kill -9 -- $([[ -n $launcher ]] && pgrep -P "$launcher") $launcher $job 2>/dev/null
  echo "tpcdiag: $(grep -c 'step ' "$OUT/tpcdiag.log") step lines"; grep "step " "$OUT/tpcdiag.log" | tail -3
fi
if has eplabel; then  # one EP2 layout: PEER's labelled collectives in the profile
  python3 -m megapeer.data.demo --out /tmp/demo --max-mb 4 >/dev/null
  timeout 300 python3 bench/layout_scaling.py --data /tmp/demo --gpus 2 --steps 7 --no-weak \
    --only "EP2 (DP2)" 2>&1 | grep -v -i warn | tail -6
  cat /tmp/layouts/EP2_DP2/profile/summary_rank0.txt
fi
if has layouts; then
  [[ -f /tmp/demo/tokenizer.model ]] || python3 -m megapeer.data.demo --out /tmp/demo --max-mb 4 >/dev/null
  timeout ${LAYOUT_LIMIT:-580} python3 bench/layout_scaling.py --data /tmp/demo --gpus "${GPUS:-4}" --steps 12 \
    --json "$OUT/layouts.json" ${LAYOUT_ARGS:-} 2>&1 | grep --line-buffered -v -i warn | tee "$OUT/layouts.txt" | tail -30
  for d in /tmp/layouts/*/; do
    [[ -f $d/profile/summary_rank0.txt ]] && cp "$d/profile/summary_rank0.txt" "$OUT/layout_$(basename "$d").txt"
  done
fi
bundle
exit 0
