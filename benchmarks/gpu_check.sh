#!/usr/bin/env bash
# The GPU check, in one run on a machine with one CUDA GPU (docs/gpu.md):
#
#   env            versions; CuPy must see the GPU (else the run stops here)
#   tests-layers   pytest -m gpu: layers, classifier, SGD, a ResNet-18 step
#                  (tests/test_gpu.py, test_backend.py, test_augment.py)
#   tests-method   pytest -m gpu tests/test_gpu_method.py: prior, ring search
#                  (P = 1, 2, ties), targets, augmentation, features, kNN
#   tests-train    pytest -m gpu tests/test_gpu_train.py: 2-epoch refimpl-train
#                  on 1 and 2 ranks = CPU (float64), checkpoints across
#                  devices, refimpl-eval --device gpu
#   tests-oracle   the rest of it: the dry run, oracle replay --device gpu,
#                  refimpl-train --trace on the device
#   mpi-cuda       the classifier and collectives on CuPy arrays, 2 ranks,
#                  CUDA-awareness detected, then forced through the host
#   (the five above run at the same time: each its own processes)
#   (the benchmarks below one after another; a part without torch is skipped)
#   classifier     the 1,281,167-way classifier step, B = 1024, fp32 (TF32
#                  off), refimpl vs PyTorch CUDA (bench_classifier.py)
#   resnet         ResNet-18 CIFAR step, batch 256, fp32, vs PyTorch + cuDNN
#                  (bench_resnet_step.py --device gpu)
#   million        the million-way run (bench_million.py): prior, neighbour
#                  table on 1 and 2 ranks, steps, kNN; seconds and memory
#   train-e2e      refimpl-train images/s against its step alone
#
# Each part has its own time limit (`timeout`), its log in $OUT/<part>.log;
# at the end one table ($OUT/summary.md, summary.json; benchmarks/gpu_summary.py).
# Under 8 minutes on one H200 (the limits add up to 7.9), --quick under 3 (2.7).
#
#   bash benchmarks/gpu_check.sh [--quick] [--dry]
#   OUT=/some/dir PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
#   --quick  env and the tests only
#   --dry    NumPy in place of CuPy, tiny sizes, every part on this CPU: the
#            check's plumbing (tests/test_gpu_check.py runs it); no GPU needed
#
# Needs, and installs nothing: a Python (PYTHON, default python3) with numpy,
# pytest, mpi4py, CuPy (`pip install -e '.[gpu]'`) and torch with CUDA (the
# benchmarks' other side; without it those ratios are "no torch"), an mpirun,
# scikit-learn for the linear probe test. refimpl comes from this checkout
# (PYTHONPATH). Exit status 0 when every check passed (benchmarks are
# measured, whatever their ratios), 1 otherwise.
set -uo pipefail

SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CUPY_TF32=0          # fp32 everywhere: cuBLAS without TF32 (CuPy's default, made explicit)
export PYTHONDONTWRITEBYTECODE=1
PYTHON="${PYTHON:-python3}"

QUICK=0 DRY=0 PART=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --dry) DRY=1 ;;
        --in-part) PART="$2"; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (--quick, --dry)" >&2; exit 2 ;;
    esac
    shift
done
export DRY
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
export OUT
if [ "$DRY" = 1 ]; then
    export REFIMPL_GPU_CHECK_DRY=1 DEVICE=cpu
else
    export DEVICE=gpu
fi

pytest_gpu() {  # pytest -m gpu FILES..., a line per test (a log cut by the limit shows how far
    # it got), no cache in the checkout, its own temp folder
    local tmp="${TMPDIR:-/tmp}/gpu_check-$$-$RANDOM" st
    # five sessions share the cores: 3 threads each for refimpl and BLAS
    REFIMPL_NUM_THREADS=3 OPENBLAS_NUM_THREADS=3 OMP_NUM_THREADS=3 \
        "$PYTHON" -m pytest -m gpu -v -p no:cacheprovider -o addopts="" -rfE --basetemp "$tmp" "$@"
    st=$?
    rm -rf "$tmp"
    return $st
}

# ------------------------------------------------------------------ the parts
p_env() {
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
    command -v mpirun >/dev/null && mpirun --version 2>/dev/null | head -1
    "$PYTHON" - <<'PY'
import os, sys, numpy, pytest
print("python", sys.version.split()[0], "| numpy", numpy.__version__, "| pytest", pytest.__version__)
from importlib.metadata import version, PackageNotFoundError
for name in ("mpi4py", "torch", "scikit-learn"):
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "not installed")
from refimpl.parallel.launch import find_mpirun
print("mpirun:", find_mpirun())
if os.environ["DRY"] == "1":
    print("dry: NumPy in place of CuPy")
    sys.exit(0)
import cupy
from refimpl.backend import gpu_available
props = cupy.cuda.runtime.getDeviceProperties(0)
name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
print("cupy", cupy.__version__, "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "| devices", cupy.cuda.runtime.getDeviceCount(), "|", name,
      f"{props['totalGlobalMem'] / 2**30:.0f} GiB")
if not gpu_available():
    sys.exit("refimpl.backend.gpu_available() is False: every gpu test would be skipped")
PY
}

p_tests_layers() {
    if [ "$DRY" = 1 ]; then echo "dry: tests/test_gpu.py runs only on a device"; return 0; fi
    REFIMPL_DEVICE=gpu pytest_gpu tests/test_gpu.py tests/test_backend.py tests/test_augment.py
}

p_tests_method() {
    if [ "$DRY" = 1 ]; then  # a sample: one test of each kind, P = 2 included
        pytest_gpu tests/test_gpu_method.py -k "ring_on_the_device_equals or two_ranks_sharing_the_device_equals or eval_transform"
    else
        pytest_gpu tests/test_gpu_method.py
    fi
}

# tests/test_gpu_train.py in two sessions at once: the runs the module shares
# (2 epochs, P = 1 and 2, resumes, refimpl-eval), and the rest
ORACLE_TESTS="dry_run or replay or trace_recorded or device_option"

p_tests_train() {
    if [ "$DRY" = 1 ]; then
        pytest_gpu tests/test_gpu_train.py -k "two_epochs"
    else
        pytest_gpu tests/test_gpu_train.py -k "not ($ORACLE_TESTS)"
    fi
}

p_tests_oracle() {
    if [ "$DRY" = 1 ]; then
        pytest_gpu tests/test_gpu_train.py -k "dry_run_on_the_device or device_option"
    else
        pytest_gpu tests/test_gpu_train.py -k "$ORACLE_TESTS"
    fi
}

p_mpi_cuda() {
    if [ "$DRY" = 1 ]; then echo "dry: needs CuPy"; return 0; fi
    local variants="detect 0" built st=0
    if command -v ompi_info >/dev/null; then  # the direct path only where Open MPI has CUDA
        built=$(ompi_info --parsable --all 2>/dev/null | grep -i "mpi_built_with_cuda_support:value" || true)
        echo "ompi_info: ${built:-no mpi_built_with_cuda_support line}"
        case "$built" in *true*) variants="detect 0 1" ;; esac
    fi
    for aware in $variants; do
        echo "== 2 ranks on this GPU, REFIMPL_CUDA_AWARE_MPI=$aware"
        if [ "$aware" = detect ]; then unset REFIMPL_CUDA_AWARE_MPI; else export REFIMPL_CUDA_AWARE_MPI=$aware; fi
        "$PYTHON" - "$OUT/mpi_gpu_$aware.json" <<'PY' || st=1
import json, sys
from refimpl.parallel.launch import mpirun_command, run_mpirun
out = sys.argv[1]
proc = run_mpirun(mpirun_command(2, "tests/mpi_worker.py", "check-gpu", out), timeout=60)
print(proc.stdout[-2000:], proc.stderr[-2000:])
if proc.returncode != 0:
    sys.exit(f"mpirun exit {proc.returncode}")
d = json.load(open(out))
worst = {}
for r, rank in enumerate(d["ranks"]):
    print(f"rank {r}: gpu {rank['gpu']}, cuda_aware {rank['cuda_aware']}")
    for case, c in rank["classifier"].items():
        if isinstance(c, dict):
            tol = 1e-12 if case.startswith("float64") else 1e-5
            err = max(c["loss"], c["dz"], c["dW"])
            ok = err <= tol and c["acc"] == c["ref_acc"]
            print(f"  {case}: worst of loss/dz/dW {err:.2e} (limit {tol:.0e}): {'ok' if ok else 'FAIL'}")
            worst[case] = ok and worst.get(case, True)
    a = rank["adjoint"]
    worst["adjoint"] = a["identity"] <= 1e-12 and worst.get("adjoint", True)
sys.exit(0 if all(worst.values()) else 1)
PY
    done
    return $st
}

have_torch() {  # the benchmarks' other side; without it they are skipped (exit 3)
    "$PYTHON" -c "import torch" 2>/dev/null && return 0
    echo "torch not installed: no PyTorch side to compare with"
    exit 3
}

p_classifier() {
    have_torch
    if [ "$DRY" = 1 ]; then
        "$PYTHON" benchmarks/bench_classifier.py --device cpu --classes 5000 --batch 64 --ranks 1 --repeat 2 \
            --no-blocked
    else
        "$PYTHON" benchmarks/bench_classifier.py --device gpu --batch 1024 --ranks 1 --repeat 10
    fi
}

p_resnet() {
    have_torch
    if [ "$DRY" = 1 ]; then
        "$PYTHON" benchmarks/bench_resnet_step.py --device cpu --configs 2x16 --rounds 1
    else
        "$PYTHON" benchmarks/bench_resnet_step.py --device gpu --configs 64x256 --rounds 3
    fi
}

p_million() {
    if [ "$DRY" = 1 ]; then
        "$PYTHON" benchmarks/bench_million.py --device cpu --n 6000 --size 8 --width 2 --dim 16 \
            --batch 64 --steps 4 --knn-bank 256 --knn-queries 64 --budget-s 40 --out "$OUT"
    else
        "$PYTHON" benchmarks/bench_million.py --device gpu --steps 200 --budget-s 165 --out "$OUT"
    fi
}

p_train_e2e() {
    if [ "$DRY" = 1 ]; then
        "$PYTHON" benchmarks/bench_train_e2e.py --device cpu --n 256 --size 8 --width 2 --batch 32 \
            --repeat 2 --out "$OUT"
    else
        "$PYTHON" benchmarks/bench_train_e2e.py --device gpu --n 3072 --repeat 5 --out "$OUT"
    fi
}

if [ -n "$PART" ]; then  # one part, in its own process (so that `timeout` can end it)
    "p_${PART//-/_}"
    exit $?
fi

# ------------------------------------------------------------------ running them
PARTS="$OUT/parts.tsv"
: > "$PARTS"
START=$(date +%s)

run_part() {  # NAME LIMIT_S: the part in its own process group, its time and status to parts.tsv
    local name="$1" limit="$2" t0 rc status tenths
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" bash "$SELF" --in-part "$name" $([ "$DRY" = 1 ] && echo --dry) \
        > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=passed ;;
        3) status=skipped ;;
        124|137) status="timeout(${limit}s)" ;;
        *) status="failed(exit $rc)" ;;
    esac
    tenths=$(( ($(date +%s%N) - t0) / 100000000 ))
    printf '%s\t%s\t%d.%d\t%s\n' "$name" "$status" $((tenths / 10)) $((tenths % 10)) "$limit" >> "$PARTS"
    echo "== $name: $status, $(tail -1 "$PARTS" | cut -f3) s (limit $limit s), log $OUT/$name.log"
}

main() {
    echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT, out $OUT$([ "$DRY" = 1 ] && echo ', DRY: NumPy in place of CuPy')$([ "$QUICK" = 1 ] && echo ', quick: tests only')"
    run_part env 20
    cat "$OUT/env.log"
    if ! grep -q "^env	passed" "$PARTS"; then
        echo "== env failed: no usable GPU (or a missing package); nothing else is run"
    else
        # the checks at the same time: the compiled CuPy kernels land in one cache
        run_part tests-layers 140 & run_part tests-method 140 & run_part tests-train 140 &
        run_part tests-oracle 140 & run_part mpi-cuda 140 &
        wait
        if [ "$QUICK" = 0 ]; then  # the benchmarks, one at a time: the GPU to itself
            run_part classifier 45
            run_part resnet 45
            run_part million 180
            run_part train-e2e 45
        fi
    fi
    echo "== total $(( $(date +%s) - START )) s"
    "$PYTHON" benchmarks/gpu_summary.py "$OUT" "$(( $(date +%s) - START ))"
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
