"""Bytes per rank per training step: the counters against docs/design.md's formula.

One full hybrid step (``train.step.train_step``: a tiny ResNet-18 + head, the
sharded classifier, SGD, "local" BatchNorm) runs under mpirun for each P,
(B, D) and N below; the communicator's counters of the second step are
compared with the step table (float32, f = 4 bytes, b = B / P):

    sent     = (b*D*f + b*8) + B*f + 2*B*f + B*D*f     + G*f + [rank 0] Q*f
    received = (B*D*f + B*8) + B*f + 2*B*f + b*D*f     + G*f + [rank > 0] Q*f
               all_gather      max   sum    reduce_     grad   BN running stats
               z_hat, labels                scatter dZ  all-   broadcast
                                                        reduce (local BN)

G = replicated parameters, Q = BatchNorm running statistics. The classifier
terms do not contain N: the same numbers come out for every N. Not counted
here: the shape check before the gather of z (``comm.check_same_shape``, 9
int64 per rank when P > 1), which is not payload.

    python benchmarks/bench_comm_bytes.py [--ranks 1 2 4]

Prints one JSON object per (P, B, D, N) with the measured and formula bytes
of every rank, and "match" (exact equality on every rank).
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import emit, run_child  # noqa: E402
from refimpl.parallel.launch import mpirun_command  # noqa: E402

CONFIGS = [(8, 16), (32, 128), (64, 64)]  # (B, D)
CLASSES = [64, 100_000]


def formula(B, D, P, rank, G, Q, f=4):
    """docs/design.md's bytes per rank per step (module docstring)."""
    b = B // P
    classifier_sent = (b * D * f + b * 8) + B * f + 2 * B * f + B * D * f
    classifier_received = (B * D * f + B * 8) + B * f + 2 * B * f + b * D * f
    return {"sent": classifier_sent + G * f + (Q * f if rank == 0 else 0),
            "received": classifier_received + G * f + (0 if rank == 0 else Q * f),
            "classifier_sent": classifier_sent, "classifier_received": classifier_received}


def worker():
    """All configurations on this rank; rank 0 prints one JSON list."""
    from mpi4py import MPI

    from refimpl.models import build_model
    from refimpl.optim.sgd import SGD
    from refimpl.parallel import CosineClassifier, MPIComm, set_batchnorm_mode
    from refimpl.train.step import train_step
    comm = MPIComm(MPI.COMM_WORLD)
    P, r = comm.size, comm.rank
    rows = []
    for B, D in CONFIGS:
        for N in CLASSES:
            b = B // P
            net = build_model("resnet18", stem="cifar", width=2, head_hidden=8, dim=D, seed=0)
            set_batchnorm_mode(net, comm, "local")
            clf = CosineClassifier(N, D, comm, seed=0)
            net_opt = SGD(net.store.data, net.store.grad, lr=0.1, momentum=0.9)
            clf_opt = SGD(clf.weight.ravel(), clf.grad.ravel(), lr=0.1, momentum=0.9)
            g = np.random.default_rng(0)
            x = g.standard_normal((B, 3, 8, 8)).astype(np.float32)[r * b:(r + 1) * b]
            y = g.permutation(N)[:B][r * b:(r + 1) * b]
            train_step(net, clf, x, y, comm, net_opt, clf_opt)      # warm-up
            comm.reset_counters()
            train_step(net, clf, x, y, comm, net_opt, clf_opt)      # the measured step
            rows.append({"B": B, "D": D, "N": N, "G": int(net.store.data.size),
                         "Q": int(net.store.buffer_data.size),
                         # docs/design.md's payload: every op but the shape check
                         # (9 int64 per rank before the gather of z, P > 1)
                         "sent": sum(c["sent"] for op, c in comm.counters.items()
                                     if op != "shape_check"),
                         "received": sum(c["received"] for op, c in comm.counters.items()
                                         if op != "shape_check"),
                         "per_op": comm.counters})
    everyone = comm.comm.gather(rows, root=0)  # benchmark plumbing (pickles)
    if r == 0:
        print(json.dumps({"P": P, "ranks": everyone}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker()
    all_match = True
    for P in args.ranks:
        job = run_child(mpirun_command(P, Path(__file__).resolve(), "--worker"), cwd=ROOT)
        for i, (B, D) in enumerate((B, D) for B, D in CONFIGS for _ in CLASSES):
            N = CLASSES[i % len(CLASSES)]
            ranks = []
            for r, rows in enumerate(job["ranks"]):
                row = rows[i]
                want = formula(B, D, P, r, row["G"], row["Q"])
                ranks.append({"rank": r, "sent": row["sent"], "sent_formula": want["sent"],
                              "received": row["received"],
                              "received_formula": want["received"],
                              "classifier_sent": want["classifier_sent"],
                              "classifier_received": want["classifier_received"]})
            match = all(x["sent"] == x["sent_formula"] and x["received"] == x["received_formula"]
                        for x in ranks)
            all_match &= match
            emit({"benchmark": "comm_bytes", "P": P, "B": B, "D": D, "N": N,
                  "G": job["ranks"][0][i]["G"], "Q": job["ranks"][0][i]["Q"],
                  "match": match, "ranks": ranks})
    if not all_match:
        raise SystemExit("measured bytes differ from the formula")


if __name__ == "__main__":
    main()
