#!/usr/bin/env bash
# One prepared run on a lent GPU machine, for the device tool's `run` (15 minutes of device
# time per session in all, 10 per command): install batchrun without its dependencies (the
# machine's image has torch, Triton, transformers, pytest, hypothesis), run the tests that need
# CUDA and the GPU benchmark, and leave every log and result under $OUT.
#
#     bash bench/gpu_session.sh              # tests, then the benchmark (one command, <= 10 min)
#     bash bench/gpu_session.sh tests        # or as two commands on the warm machine, which
#     BENCH_S=520 bash bench/gpu_session.sh bench   #   gives the benchmark more of the budget
#     OUT=/tmp/gs bash bench/gpu_session.sh  # here, without CUDA: checks the script (exit 3)
#
# Budget: install ~20 s, tests <= TESTS_S (180), benchmark <= BENCH_S (330). Both are stopped
# with SIGINT at their limit, so pytest prints its summary and the benchmark keeps every row
# it finished ($OUT/gpu.json is rewritten after each row; rows run most telling first).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
what=${1:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_CACHE_DIR=/tmp/triton-cache
rm -rf /tmp/site # --target keeps what an earlier run installed there: start clean
if ! python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . >"$OUT/install.log" 2>&1; then
  tail -5 "$OUT/install.log"
  echo "pip install failed: linking the source folders instead" | tee -a "$OUT/install.log"
  mkdir -p /tmp/site/batchrun
  for d in cli core kernels; do ln -sfn "$PWD/$d" "/tmp/site/batchrun/$d"; done
fi
export PYTHONPATH=/tmp/site
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'triton', triton.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
[ "$cuda" = 1 ] || echo "WARNING: torch sees no CUDA device: the tests skip their GPU cases and the
benchmark runs its CPU smoke shape only. Nothing measured here is a GPU number." | tee "$OUT/NO_CUDA.txt"
status=0

if [ "$what" = all ] || [ "$what" = tests ]; then
  # the Triton oracle and CUDA graphs (real kernels, real capture), the flash backend, every
  # gpu-marked test, then the Triton kernels' sweeps (many shapes, each a compile): in that
  # order, so a timeout cuts the least telling tests
  timeout -s INT -k 15 "${TESTS_S:-180}" python3 -m pytest -q -p no:cacheprovider -rs \
    tests/test_triton_oracle.py tests/test_cuda_graphs.py \
    tests/test_architectures.py::test_architecture_runs_in_cuda_graphs \
    tests/test_flash_gpu.py tests/test_flash_backend.py tests/test_triton_kernels.py >"$OUT/tests.log" 2>&1
  rc=$?
  tail -6 "$OUT/tests.log"
  echo "tests exit $rc" | tee -a "$OUT/tests.log"
  [ "$rc" = 0 ] || status=$rc
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
  limit=${BENCH_S:-330}
  smoke=$([ "$cuda" = 1 ] || echo --smoke)
  timeout -s INT -k 15 "$limit" python3 bench/gpu_bench.py $smoke --deadline-s $((limit - 15)) \
    --json "$OUT/gpu.json" --logs "$OUT/bench-logs" >"$OUT/gpu_bench.log" 2>&1
  rc=$?
  tail -25 "$OUT/gpu_bench.log"
  echo "benchmark exit $rc" | tee -a "$OUT/gpu_bench.log"
  [ "$rc" = 0 ] || status=$rc
fi
[ "$cuda" = 1 ] || status=3
exit $status
