"""Launching a test's rank program under mpirun, one BLAS thread per rank.

    proc, seconds = run_ranks(P, script, *args)       # the CompletedProcess and its time
    data = rank_results(P, script, out_json, *args)   # what rank 0 wrote, checked
    write_rank_results(comm, result, out_json)         # in the rank program: the writing

P ranks share this 2-core machine, so every rank gets one refimpl thread
(unless REFIMPL_NUM_THREADS says otherwise: tests/kernel_matrix.py runs the
ranks at 1, 2 and 4) and one BLAS thread (ENV): P ranks with one BLAS thread
per core each would oversubscribe it. A rank program writes every rank's results to one JSON
file from rank 0: ``{"size": P, "ranks": [...]}`` (``write_rank_results``).
"""
import json
import os
import time
from pathlib import Path

from refimpl.parallel.launch import mpirun_command, run_mpirun

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, REFIMPL_NUM_THREADS=os.environ.get("REFIMPL_NUM_THREADS", "1"),
           OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def run_ranks(P, script, *args, timeout=300):
    """``mpirun -np P python script args...`` from the repository root."""
    start = time.monotonic()
    proc = run_mpirun(mpirun_command(P, script, *args), timeout=timeout, env=ENV, cwd=ROOT)
    return proc, time.monotonic() - start


def rank_results(P, script, out, *args, timeout=300):
    """Run the rank program with ``out`` (a JSON path) and return rank 0's JSON."""
    proc, _ = run_ranks(P, script, *args, out, timeout=timeout)
    assert proc.returncode == 0, f"mpirun -np {P} failed:\n{proc.stdout}\n{proc.stderr}"
    data = json.loads(Path(out).read_text())
    assert data["size"] == P and len(data["ranks"]) == P
    return data


def write_rank_results(comm, result, out):
    """Gather every rank's ``result`` (a dict of JSON-able values) to rank 0,
    which writes ``{"size": P, "ranks": [result of rank 0, ...]}`` to ``out``:
    what ``rank_results`` reads. A collective: every rank of ``comm`` (an
    MPIComm) calls it. Test plumbing, so mpi4py's pickling gather."""
    everyone = comm.comm.gather(result, root=0)
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump({"size": comm.size, "ranks": everyone}, f, indent=1, default=str)
