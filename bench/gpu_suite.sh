#!/usr/bin/env bash
# Everything a lent GPU session needs, in one device call (few, batched calls: each start costs minutes).
#   STEPS="env build test sanitize kernels overlap pipeline run run_ep compile poll comm calibrate plan_measured" bash bench/gpu_suite.sh
# Each step logs to $OUT/<step>.* and has its own time limit; a failing step does not stop the
# others (the summary at the end says which failed). JSON outputs need no rich/matplotlib.
set -u
OUT=${OUT:-gpu_out}
STEPS=${STEPS:-env build test sanitize kernels overlap pipeline run run_ep compile poll comm calibrate plan_measured}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
declare -A status

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  local rc=$?
  status[$name]="rc=$rc in $((SECONDS - start)) s"
  echo "[$name] ${status[$name]}"
}

step env 60 bash -c "nvidia-smi; nvidia-smi --query-gpu=name,clocks.sm,power.limit --format=csv; \
  $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)'; \
  git rev-parse --short HEAD; date -Is"
step build 300 $PY -m pip install -q --no-build-isolation --no-deps -e .
step test 600 $PY -m pytest -m gpu -q -rs
# Without PYTORCH_NO_CUDA_MEMORY_CACHING=1 torch's caching allocator hands out slices of big
# cached blocks, so an overrun into the rest of a block is invisible to memcheck.
step sanitize 600 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
  --error-exitcode 1 $PY -m pytest -m gpu -q -x tests/kernels
step kernels 300 $PY bench/bench_kernels.py --json
step overlap 120 $PY bench/bench_overlap.py --json
step pipeline 300 $PY bench/bench_pipeline.py --json
step run 300 $PY -m pyengine run --json --iters 10 --trace "$OUT/run_trace.json"
step run_ep 300 $PY -m pyengine run --config pyengine/configs/seed_ep_3gpu.json --json --iters 10
step compile 300 $PY -m pyengine kernels compile --arch 90 --json
step poll 60 $PY bench/bench_poll.py --json
step comm 120 $PY -m pyengine bench comm --backend local --nranks 3 --op all_reduce -b 8K -e 64M -f 4 --json
# A measured device profile of this GPU and this engine's kernels (on one GPU the link numbers stay
# the preset's published ones, labelled so), then the seed's plan on it.
step calibrate 300 $PY -m pyengine calibrate --out "$OUT/device_profile.json" --json
step plan_measured 60 $PY -m pyengine plan --device "$OUT/device_profile.json" --json

echo "summary:"
for k in "${!status[@]}"; do echo "  $k: ${status[$k]}"; done
