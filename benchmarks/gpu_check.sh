#!/usr/bin/env bash
# The device check, in one run: every test marked `gpu` (CuPy vs NumPy parity
# of the layers and of a whole ResNet-18 training step, host/device copies,
# augmentation on the GPU), after printing the GPU and the versions.
#
#   bash benchmarks/gpu_check.sh                      # on a machine with a CUDA GPU
#   OUT=/some/dir PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Needs a Python with numpy, pytest and CuPy (torch optional); installs
# nothing. The log goes to "${OUT:-.}/gpu_check.log" (and to stdout). Exit
# status: pytest's, or 1 at once when CuPy sees no GPU (all-skipped tests
# must not look like a pass).
set -euo pipefail

LOG="$(cd "${OUT:-.}" && pwd)/gpu_check.log"
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."

main() {
    echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(pwd)"
    nvidia-smi -L || echo "nvidia-smi: not available"
    "$PYTHON" - <<'PY'
import sys, numpy, pytest
print("python", sys.version.split()[0], "| numpy", numpy.__version__, "| pytest", pytest.__version__)
try:
    import torch
    print("torch", torch.__version__)
except ImportError:
    print("torch: not installed")
import cupy
print("cupy", cupy.__version__, "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "| devices", cupy.cuda.runtime.getDeviceCount())
from refimpl.backend import gpu_available
if not gpu_available():
    sys.exit("refimpl.backend.gpu_available() is False: every gpu test would be skipped")
PY
    # float32 parity is checked at 1e-4: keep cuBLAS off TF32 (CuPy's default, made explicit).
    CUPY_TF32=0 REFIMPL_DEVICE=gpu "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider \
        tests/test_gpu.py tests/test_backend.py tests/test_augment.py
}

main 2>&1 | tee "$LOG"
