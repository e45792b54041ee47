#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, PyTorch (CUDA build), Triton, pybind11,
# CMake and nvcc, one command that
#   1. builds the compiled core and the CUDA kernels (RECMETA_ENABLE_CUDA=ON) in place,
#   2. runs the GPU tests (marker gpu) and the Triton kernel tests compiled for the GPU,
#   3. runs compute-sanitizer (memcheck, then racecheck for the shared-memory top-k) over
#      one short call of each CUDA kernel,
#   4. times the Triton and CUDA kernels against PyTorch (embedding_bag; matmul + topk) on
#      N = 1M / 10M items, d = 64 / 128, B = 1 / 64 / 1024, float16 / int8 tables, with
#      CUDA events after warm-up, as a fraction of the measured copy bandwidth,
# and prints a short table last. Budget: under 8 minutes (each step has its own timeout).
# Usage: bash bench/gpu_check.sh [json-output]   (PYTHON=... picks the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
JSON="${1:-}"
status=0
start=$SECONDS
step() { echo; echo "== $* (at $((SECONDS - start)) s)"; }
left() { echo $(( 470 - (SECONDS - start) )); }  # seconds left of the 8-minute budget

step "environment"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__); print(torch.cuda.get_device_name())" || { echo "gpu_check: needs PyTorch with CUDA and Triton"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

step "build (RECMETA_ENABLE_CUDA=ON)"
gen=""; command -v ninja >/dev/null && gen="-G Ninja"
bdir=build/gpu-check
cap="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')"
mkdir -p "$bdir"
timeout 60 cmake -S . -B "$bdir" $gen -DCMAKE_BUILD_TYPE=Release -DRECMETA_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${cap}-real" \
  -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >"$bdir/build.log" 2>&1 \
  && timeout 150 cmake --build "$bdir" -j "$(nproc)" >>"$bdir/build.log" 2>&1 \
  && cp "$bdir"/_core*.so recmeta_sdk/ || { tail -40 "$bdir/build.log"; echo "gpu_check: build failed"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m recmeta_sdk env | sed -n '/backends/,$p'

step "GPU tests"
# (tests/test_triton_kernels.py also runs compiled on a GPU; its interpreter run in CI covers
# it and its many tiny-block variants would spend this budget on Triton compiles.)
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py || status=1

step "compute-sanitizer"
if command -v compute-sanitizer >/dev/null; then
  san=compute-sanitizer
elif [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  san=/usr/local/cuda/bin/compute-sanitizer
else
  san=""
  echo "gpu_check: compute-sanitizer not found"; status=1
fi
if [ -n "$san" ]; then
  timeout 70 "$san" --tool memcheck --error-exitcode 9 "$PY" bench/gpu_check.py --sanitize || status=1
  timeout 60 "$san" --tool racecheck --error-exitcode 9 "$PY" bench/gpu_check.py --sanitize || status=1
fi

step "timings"
t=$(left); [ "$t" -lt 60 ] && t=60
RECMETA_BENCH_BUDGET_S="${RECMETA_BENCH_BUDGET_S:-$((t - 50))}" timeout "$t" "$PY" bench/gpu_check.py --bench ${JSON:+--json "$JSON"} || status=1
echo "gpu_check: $((SECONDS - start)) s, status $status"
exit $status
