"""The rank program of tests/test_features_mpi.py: P ranks extract features together.

    mpirun -np P python tests/features_worker.py OUT.json

Every rank builds the same float64 network (seed 0, BN running statistics
moved off their defaults by two train-mode forwards, the same on every rank),
runs ``extract_features`` with an ``MPIComm`` on N = 23 images (not divisible
by 2, 3 or 4) and on N = 3 images (fewer than 4 ranks: some shares are empty),
and compares with the one-process result (``SelfComm``) that it also computes
itself. Rank 0 writes every rank's errors, byte counters and shares to
OUT.json; pytest asserts on them.
"""
import sys

import numpy as np
from mpi4py import MPI

from refimpl.data.synthetic import SyntheticDataset
from refimpl.evaluate.features import extract_features
from refimpl.parallel import MPIComm, SelfComm, abort_on_error
from mpi_run import write_rank_results
from test_features import SIZE, tiny_net  # the network the 1-process tests use


def check(comm, n, batch_size):
    """Errors of the P-rank extraction of n images against the 1-process one."""
    net = tiny_net()
    data = SyntheticDataset(n, SIZE, 4, seed=1)
    want = extract_features(net, data, SelfComm(), batch_size=n)
    before = net.store.buffer_data.copy()
    done = []
    comm.reset_counters()
    got = extract_features(net, data, comm, batch_size=batch_size,
                           progress=lambda d, t: done.append([d, t]))
    out = {"counters": comm.counters, "progress": done,
           "buffers_unchanged": bool(np.array_equal(net.store.buffer_data, before))}
    for kind in ("pooled", "head"):
        out[kind] = {"shape": list(got[kind].shape), "dtype": got[kind].dtype.name,
                     "err": float(np.max(np.abs(got[kind] - want[kind]))
                                  / np.max(np.abs(want[kind]))),
                     # negative control: one row out of place must show as an error
                     "rolled_err": float(np.max(np.abs(np.roll(got[kind], 1, axis=0)
                                                       - want[kind])))}
    return out


def main(path):
    comm = MPIComm(MPI.COMM_WORLD)
    with abort_on_error(comm):
        mine = {"rank": comm.rank, "n23": check(comm, 23, 4), "n3": check(comm, 3, 2)}
    write_rank_results(comm, mine, path)


if __name__ == "__main__":
    main(sys.argv[1])
