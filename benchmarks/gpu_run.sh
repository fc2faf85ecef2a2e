#!/usr/bin/env bash
# The GPU session in one script (run on a lent CUDA machine from the repo root; $OUT collects results).
# Wheels for packages the GPU image lacks (ray, cvxpy + clarabel + qdldl, torchidl, jsonschema) are
# carried in .whl/ (ignored by git) and installed into /tmp/site.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
nvidia-smi -L
python3 -c "import torch, ray, cvxpy; print('torch', torch.__version__, 'ray', ray.__version__, 'cvxpy', cvxpy.__version__)"
echo "== gpu_check"; timeout 360 python3 benchmarks/gpu_check.py --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
echo "== bench_implicit cuda"; timeout 120 python3 benchmarks/bench_implicit.py --device cuda --epochs 4 --same-repeats 10 2>&1 | tee "$OUT/bench_implicit_cuda.log" | tail -25
echo "== bench_sim cuda"; timeout 150 python3 benchmarks/bench_sim.py --device cuda --quick --skip-cvx --json "$OUT/bench_sim_cuda.json" 2>&1 | tee "$OUT/bench_sim_cuda.log" | tail -25
echo "== done"
