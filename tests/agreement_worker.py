"""The rank program of tests/test_agreement_mpi.py: ranks that disagree, caught by name.

    mpirun -np 2 python tests/agreement_worker.py OUT.json

Every case makes the last rank bring something else than the others (a
longer or shorter buffer, another dtype, another N, another config or
dataset) to a collective or a check, and records what every rank raised
(None: nothing). After each case the ranks run a matching all_reduce, to
show that a refused call leaves the job usable (no half-done collective).
"""
import sys

import numpy as np
from mpi4py import MPI

from refimpl.data.synthetic import open_synthetic
from refimpl.parallel import CosineClassifier, MPIComm, abort_on_error
from refimpl.parallel.agreement import check_same_config, check_same_dataset

from mpi_run import write_rank_results


def attempt(fn):
    try:
        fn()
        return None
    except ValueError as e:
        return str(e)


def main():
    comm = MPIComm(MPI.COMM_WORLD)
    last = comm.rank == comm.size - 1
    out = {}
    with abort_on_error(comm):
        n = 13 if last else 12
        cases = {
            "all_reduce_length": lambda: comm.all_reduce(np.ones(n), "sum"),
            "all_reduce_dtype": lambda: comm.all_reduce(
                np.ones(12, dtype=np.float32 if last else np.float64), "max"),
            "reduce_scatter_length": lambda: comm.reduce_scatter(
                np.ones((6 if last else 4, 3))),
            "bcast_length": lambda: comm.bcast(np.ones(n)),
            "all_gather_v_width": lambda: comm.all_gather_v(np.ones((2, 4 if last else 3))),
            "classifier_N": lambda: CosineClassifier(38 if last else 37, 8, comm),
            "config": lambda: check_same_config(
                comm, {"alpha": 0.2 if last else 0.1, "augment": {"crop": True}}),
            "dataset": lambda: check_same_dataset(
                comm, "train 'data/x'", open_synthetic(f"synthetic:n={62 if last else 64},"
                                                       f"size=8")),
        }
        for name, fn in cases.items():
            out[name] = attempt(fn)
            # the job goes on: a matching all-reduce gives the right sum
            total = comm.all_reduce(np.full(3, comm.rank + 1.0), "sum")
            assert np.all(total == comm.size * (comm.size + 1) / 2), (name, total)
        # agreeing ranks: checked once per shape, then free
        comm.reset_counters()
        for _ in range(3):
            comm.all_reduce(np.ones(5), "sum")
            comm.bcast(np.ones(5))
        out["checks_of_agreeing_calls"] = comm.counters.get("shape_check", {}).get("calls", 0)
        out["agreeing_sum"] = comm.all_reduce(np.ones(5), "sum").tolist()
        clf = CosineClassifier(37, 8, comm)
        out["agreeing_classifier_rows"] = [clf.lo, clf.hi]
        write_rank_results(comm, out, sys.argv[1])


if __name__ == "__main__":
    main()
