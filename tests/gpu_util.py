"""What the GPU tests share: the device under test, and a GPU run compared with a CPU run.

    DEVICE                    the device under test: "gpu"; "cpu" under
                              REFIMPL_GPU_CHECK_DRY=1 (below)
    on_device(host, dtype)    a host array on DEVICE, floats cast to dtype
    check_placed(label, x, dtype)    x lives on DEVICE and has dtype
    check_close(label, dev, cpu, dtype, truth=None)
                              one tensor computed on DEVICE against the CPU's:
                              float64 within INDEPENDENT64; float32 within
                              INDEPENDENT32, or, given ``truth`` (the CPU in
                              float64), as close to it as the CPU's float32 is
                              (x 4, + INDEPENDENT32): through a whole network
                              float32 rounding grows on both devices alike
    train_on(device, *args, ranks=None)   refimpl-train on a device (alone or
                              under mpirun, the ranks sharing the GPU)
    assert_runs_match(run, ref, tol)      every tensor of two runs' final
                              checkpoints and their step losses within tol
    assert_run_matches_cpu(args, out_dir, ranks=1, tol=TRAIN64, cpu_run=None)
                              the helper for a new feature: its refimpl-train
                              run on DEVICE against the same run on one CPU
                              process (float64, sync BN: P ranks = 1 rank)

A test module whose ``gpu`` tests name DEVICE (never "gpu" itself) and so
also run on the CPU sets ``RUNS_DRY = True``: ``benchmarks/gpu_check.sh
--dry`` runs them with REFIMPL_GPU_CHECK_DRY=1 on a machine without a GPU,
where DEVICE is "cpu" and every comparison is the CPU against itself: the
plumbing of the check (conftest, subprocesses, mpirun, the comparisons)
runs end to end, the device is not tested. Without a GPU and without that
variable every ``gpu`` test is skipped (conftest.py).
"""
import json
import os

import numpy as np

from refimpl.backend import asarray, device_of
from refimpl.oracle import check_tensor, scaled_error
from test_train import state_errors, train
from tolerances import INDEPENDENT32, INDEPENDENT64, TRAIN64

DRY = os.environ.get("REFIMPL_GPU_CHECK_DRY") == "1"
DEVICE = "cpu" if DRY else "gpu"
TOL = {np.float64: INDEPENDENT64, np.float32: INDEPENDENT32}


def on_device(host, dtype=None, device=DEVICE):
    """A host array on ``device``: floats cast to dtype (when given), ints as they are."""
    a = np.asarray(host)
    if dtype is not None and a.dtype.kind == "f":
        a = a.astype(dtype)
    return asarray(a, device=device)


def check_placed(label, x, dtype, device=DEVICE):
    """x is an array of ``dtype`` on ``device``."""
    assert device_of(x) == device, f"{label}: expected a {device} array, got {type(x)}"
    assert x.dtype == dtype, f"{label}: dtype {x.dtype}, expected {np.dtype(dtype).name}"


def check_close(label, dev, cpu, dtype, truth=None):
    """One tensor from DEVICE against the CPU's (module docstring)."""
    dtype = np.dtype(dtype).type
    if truth is None or dtype == np.float64:
        check_tensor(f"{label} ({np.dtype(dtype).name})", dev, cpu, TOL[dtype])
    else:
        check_tensor(f"{label} (float32) vs float64", dev, truth,
                     4 * scaled_error(cpu, truth) + INDEPENDENT32)


def train_on(device, *args, ranks=None, timeout=600):
    """refimpl-train (python -m refimpl.train) with device=..., alone or under mpirun."""
    return train(f"device={device}", *args, ranks=ranks, timeout=timeout)


def step_losses(run):
    """The loss of every step of a run directory (metrics.jsonl)."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def assert_runs_match(run, ref, tol=TRAIN64):
    """Every tensor of the final checkpoints (``test_train.state_errors``) and every
    step's loss of run against ref within tol."""
    errors = state_errors(run, ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{run.name} vs {ref.name}: {worst} off by {errors[worst]:.3e}"
    a, b = step_losses(run), step_losses(ref)
    assert len(a) == len(b) and a, f"{len(a)} steps against {len(b)}"
    worst_loss = max(abs(x - y) for x, y in zip(a, b))
    assert worst_loss <= tol, f"{run.name} vs {ref.name}: a step's loss off by {worst_loss:.3e}"
    return errors


def assert_run_matches_cpu(args, out_dir, ranks=1, tol=TRAIN64, cpu_run=None):
    """refimpl-train ``args`` on DEVICE (on ``ranks`` ranks under mpirun, sharing the
    GPU, when ranks > 1) against the same run on one CPU process.

    args: refimpl-train config overrides (without device= and out=); for a
    comparison at TRAIN64 they set dtype=float64 and, for ranks > 1, bn=sync.
    out_dir: where both run directories go. cpu_run: an existing CPU run
    directory of the same args (run here when None). Returns (device run,
    CPU run, the device run's stdout), the runs checked by ``assert_runs_match``.
    """
    run = out_dir / f"device-P{ranks}"  # not "cpu-P1": DEVICE is "cpu" in the dry run
    proc = train_on(DEVICE, *args, f"out={run}", ranks=ranks if ranks > 1 else None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if cpu_run is None:
        cpu_run = out_dir / "cpu-P1"
        proc = train_on("cpu", *args, f"out={cpu_run}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_runs_match(run, cpu_run, tol)
    return run, cpu_run, proc.stdout
