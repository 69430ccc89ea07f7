#!/usr/bin/env bash
# The device check, in one run, on a machine with a CUDA GPU:
#   1. versions, and whether CuPy sees the GPU;
#   2. the 1,281,167-way classifier step at B = 1024, refimpl (CuPy) vs
#      PyTorch (CUDA) on the same card (benchmarks/bench_classifier.py);
#   3. the sharded classifier and the collectives on CuPy arrays, 2 ranks
#      under mpirun on this GPU, first with the detected CUDA-awareness, then
#      forced through host buffers (REFIMPL_CUDA_AWARE_MPI=0), then forced
#      direct (=1) where ompi_info says Open MPI was built with CUDA;
#   4. every test marked `gpu` (CuPy vs NumPy parity of the layers, the
#      classifier, SGD and a whole ResNet-18 training step).
#
#   bash benchmarks/gpu_check.sh
#   OUT=/some/dir PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Needs a Python with numpy, pytest, mpi4py and CuPy (torch for step 2);
# installs nothing (refimpl is taken from this checkout via PYTHONPATH).
# Writes gpu_check.log, classifier_gpu.json and mpi_gpu*.json to ${OUT:-.}.
# Exit status: 1 at once when CuPy sees no GPU, else non-zero if any step failed.
set -uo pipefail

OUT="$(mkdir -p "${OUT:-.}" && cd "${OUT:-.}" && pwd)"
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

main() {
    echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(pwd)"
    nvidia-smi -L || echo "nvidia-smi: not available"
    "$PYTHON" - <<'PY' || exit 1
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

    echo "== classifier step, N = 1,281,167, D = 128, B = 1024, fp32 (no TF32 on either side)"
    CUPY_TF32=0 "$PYTHON" benchmarks/bench_classifier.py --device gpu --batch 1024 --ranks 1 \
        --repeat 10 | tee "$OUT/classifier_gpu.json" || status=1

    # Open MPI says whether it was built with CUDA; only then is the direct
    # (CUDA-aware) path tried as well, forced on.
    variants="detect 0"
    if command -v ompi_info >/dev/null; then
        built=$(ompi_info --parsable --all 2>/dev/null | grep -i "mpi_built_with_cuda_support:value" || true)
        echo "ompi_info: ${built:-no mpi_built_with_cuda_support line}"
        case "$built" in *true*) variants="detect 0 1" ;; esac
    fi
    "$PYTHON" -c "from mpi4py import MPI; from refimpl.parallel import detect_cuda_aware_mpi; print('detect_cuda_aware_mpi():', detect_cuda_aware_mpi())"
    for aware in $variants; do
        echo "== 2 ranks on this GPU, REFIMPL_CUDA_AWARE_MPI=$aware"
        if [ "$aware" = detect ]; then unset REFIMPL_CUDA_AWARE_MPI; else export REFIMPL_CUDA_AWARE_MPI=$aware; fi
        CUPY_TF32=0 timeout 180 mpirun -np 2 --oversubscribe --allow-run-as-root "$PYTHON" \
            tests/mpi_worker.py check-gpu "$OUT/mpi_gpu_$aware.json" || status=1
        "$PYTHON" - "$OUT/mpi_gpu_$aware.json" <<'PY' || status=1
import json, sys
d = json.load(open(sys.argv[1]))
worst = {}
for r, rank in enumerate(d["ranks"]):
    print(f"rank {r}: gpu {rank['gpu']}, cuda_aware {rank['cuda_aware']}")
    for case, c in rank["classifier"].items():
        if isinstance(c, dict):
            tol = 1e-12 if case.startswith("float64") else 1e-5
            err = max(c["loss"], c["dz"], c["dW"])
            ok = err <= tol and c["acc"] == c["ref_acc"]
            print(f"  {case}: worst of loss/dz/dW {err:.2e} (limit {tol:.0e}), top-k "
                  f"{c['acc']} vs {c['ref_acc']}: {'ok' if ok else 'FAIL'}")
            worst[case] = ok and worst.get(case, True)
    a = rank["adjoint"]
    print(f"  adjoint identity {a['identity']:.2e}, all_gather {a['all_gather_values']:.1e}, "
          f"reduce_scatter {a['reduce_scatter_values']:.1e}")
    worst["adjoint"] = a["identity"] <= 1e-12 and worst.get("adjoint", True)
sys.exit(0 if all(worst.values()) else 1)
PY
    done
    unset REFIMPL_CUDA_AWARE_MPI

    echo "== pytest -m gpu"
    # float32 parity is checked at 1e-4: keep cuBLAS off TF32 (CuPy's default, made explicit).
    CUPY_TF32=0 REFIMPL_DEVICE=gpu timeout 300 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider \
        tests/test_gpu.py tests/test_backend.py tests/test_augment.py || status=1
    echo "== gpu_check done, status $status"
    return $status
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
