#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU (under 8 minutes on one): install the
# requirements, run the GPU tests (pytest -m gpu), then bench/gpu_runs.py: --preset fast and the
# default recipe on the real split on CUDA (bf16 and fp16 autocast, channels_last, torch.compile
# off and on), one torchrun process with NCCL, predicting and exporting. Every figure (images/s,
# time to accuracy, test accuracy, peak GPU memory) goes to OUT_DIR/gpu_check.json.
# Without a usable CUDA GPU it stops at the first CUDA step with one line and exit code 0.
#
# usage: bash bench/gpu_check.sh OUT_DIR
#   $GPU_CHECK_INSTALL=0 skips the install (the requirements are already there);
#   $MNIST_TRAIN / $MNIST_TEST: the CSVs (default ../shared/data/mnist_{train,test}.csv.gz)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash bench/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
if [ "${GPU_CHECK_INSTALL:-1}" != 0 ]; then
    python -m pip install -q -r requirements-dev.txt
fi
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: skipped: torch $(python -c 'import torch; print(torch.__version__)')" \
        "sees no usable CUDA GPU here, so nothing ran on CUDA"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" ||
    echo "gpu_check: no nvidia-smi here (the GPU's name is in gpu_check.json)"
tests=0
python -m pytest -m gpu -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt" || tests=$?
python bench/gpu_runs.py "$out"
[ "$tests" = 0 ] || { echo "gpu_check: the GPU tests failed (exit $tests): $out/gpu_tests.txt"; exit 1; }
