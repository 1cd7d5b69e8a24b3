#!/usr/bin/env bash
# One prepared run on a lent GPU machine, for the device tool's `run` (15 minutes of device
# time per session in all, 10 per command): install batchrun without its dependencies (the
# machine's image has torch, Triton, transformers, pytest, hypothesis), run the tests that need
# CUDA and the GPU benchmark, and leave every log and result under $OUT.
#
#     bash bench/gpu_session.sh            # on the GPU machine; then give the machine back
#     OUT=/tmp/gs bash bench/gpu_session.sh   # here, without CUDA: checks the script itself
#
# Budget: install ~20 s, tests <= TESTS_S (180), benchmark <= BENCH_S (330).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . >"$OUT/install.log" 2>&1 ||
  { tail -20 "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'triton', triton.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")

# the Triton oracle and CUDA graphs (real kernels, real capture), the flash backend, every
# gpu-marked test, then the Triton kernels' sweeps (many shapes, each a compile): in that
# order, so a timeout cuts the least telling tests
timeout "${TESTS_S:-180}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_triton_oracle.py \
  tests/test_cuda_graphs.py tests/test_architectures.py::test_architecture_runs_in_cuda_graphs \
  tests/test_flash_gpu.py tests/test_flash_backend.py tests/test_triton_kernels.py >"$OUT/tests.log" 2>&1
rc=$?
tail -4 "$OUT/tests.log"
echo "tests exit $rc" | tee -a "$OUT/tests.log"

smoke=$([ "$cuda" = 1 ] || echo --smoke)
timeout "${BENCH_S:-330}" python3 bench/gpu_bench.py $smoke --json "$OUT/gpu.json" >"$OUT/gpu_bench.log" 2>&1
rc=$?
tail -25 "$OUT/gpu_bench.log"
echo "benchmark exit $rc" | tee -a "$OUT/gpu_bench.log"
