"""The rank program of tests/test_oracle_mpi.py: record a trace on P ranks.

    mpirun -np P python tests/oracle_worker.py OUT

Two float64 steps of the hybrid step on P ranks with synchronized BatchNorm,
N = 37 classes (uneven shards), smoothed targets, the classifier traced as
touched rows plus per-shard checksums ("rows"), every rank's rows gathered
by ``TraceRecorder``. The test replays the trace in one process.
"""
import sys

import numpy as np
from mpi4py import MPI

from refimpl.backend import rng as make_rng
from refimpl.method.neighbours import hardest_neighbours
from refimpl.method.targets import target_entries
from refimpl.models import build_model
from refimpl.optim.sgd import SGD
from refimpl.oracle.recorder import TraceRecorder
from refimpl.parallel import (CosineClassifier, MPIComm, abort_on_error, set_batchnorm_mode,
                              shard_range)
from refimpl.train.step import forward_backward, update

N, D, B, K = 37, 16, 12, 3


def main():
    comm = MPIComm(MPI.COMM_WORLD)
    P, r = comm.size, comm.rank
    with abort_on_error(comm):
        net = build_model("resnet18", "cifar", width=1, head_hidden=8, dim=D,
                          dtype=np.float64)
        set_batchnorm_mode(net, comm, "sync")
        clf = CosineClassifier(N, D, comm, 0.15, np.float64)
        g = make_rng(5, "oracle-worker")                   # the same draws on every rank
        W = g.choice([-0.5, 0.5], size=(N, D))
        lo, hi = shard_range(N, P, r)
        clf.weight[...] = W[lo:hi]
        net_opt = SGD(net.store.data, net.store.grad, 0.1, 0.9, 5e-4)
        clf_opt = SGD(clf.weight.ravel(), clf.grad.ravel(), 0.1, 0.9, 5e-4)
        rec = TraceRecorder(sys.argv[1], net, clf, net_opt, clf_opt, comm,
                            {"alpha": 0.2, "K": K, "neighbours": "initial_weight"}, steps=2,
                            classifier="rows")
        table = hardest_neighbours(clf, comm, K)
        b = B // P
        for lr in (0.1, 0.05):
            x, ids = g.normal(size=(B, 3, 8, 8)), g.permutation(N)[:B]
            targets = target_entries(ids, N, table, 0.2)
            mine = slice(r * b, (r + 1) * b)
            rec.begin()
            out = forward_backward(net, clf, x[mine], ids[mine], comm, targets)
            rec.record(x[mine], ids[mine], out, lr, targets)
            update(net, comm, net_opt, clf_opt, lr)
            rec.end()


if __name__ == "__main__":
    main()
