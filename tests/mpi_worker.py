"""The rank program of the MPI tests (tests/test_parallel_mpi.py launches it).

    mpirun -np P python tests/mpi_worker.py check OUT.json
    mpirun -np P python tests/mpi_worker.py fail
    mpirun -np P python tests/mpi_worker.py check-gpu OUT.json   (benchmarks/gpu_check.sh)

``check`` runs every P-rank check of the hybrid parallel step on this rank,
against a dense single-process reference that every rank computes itself on
the same global data, and rank 0 writes the measured errors of all ranks to
OUT.json (pytest asserts on them, so a failure shows the numbers):

- classifier: sharded loss, dW and dz vs the dense cosine softmax built from
  the layers (float64 and float32, one-hot and smoothed targets), top-1/top-5,
  byte counters vs docs/design.md's formula, labels out of range;
- adjoint: <all_gather(x), g> = <x, reduce_scatter(g)>, summed over ranks;
- uneven: all_gather_v, all_to_all_v and ring_shift on uneven shards;
- neighbours: the ring search of the hardest classes vs the dense top-K;
- step: 3 SGD steps of encoder + head + classifier, P ranks vs 1 process,
  "sync" BN and "local" BN (vs net.bn.groups = P), and a negative control that
  averages the gradients instead of summing them; every step checks that the
  replicated parameters and BN statistics are bitwise equal on all ranks
  (``check_replicas=True``: a difference aborts the job).

``fail``: rank 1 raises while the others wait in a collective; the job must
end (abort_on_error), not hang. ``exit``: rank 1 calls sys.exit(0) instead.
"""
import sys

import numpy as np
from mpi4py import MPI

from refimpl.backend import asarray, device_of, rng as make_rng, to_numpy
from refimpl.method.neighbours import dense_hardest_neighbours, hardest_neighbours
from refimpl.method.targets import target_entries
from refimpl.models import build_model
from refimpl.optim.sgd import SGD
from refimpl.oracle import dense_cosine_softmax, scaled_error as scaled
from refimpl.parallel import (CosineClassifier, MPIComm, SelfComm, abort_on_error,
                              check_replicated, cosine_softmax_backward,
                              cosine_softmax_forward, select_gpu, set_batchnorm_mode,
                              shard_range)
from refimpl.train.step import train_step

from mpi_run import write_rank_results

N, D, B, TAU = 37, 8, 12, 0.15  # 37 classes over 4 ranks: shards of 9 and 10 rows


def problem(seed):
    """Global z (B, D), labels (B,), W (N, D), neighbour table (N, 3), float64.

    z is near the rows of its labels so that top-1/top-5 are not trivially 0.
    """
    g = make_rng(seed, "test")
    W = g.normal(size=(N, D))
    labels = g.integers(0, N, B)
    z = 2.0 * W[labels] / np.linalg.norm(W[labels], axis=1, keepdims=True) \
        + g.normal(size=(B, D))
    nb = np.array([g.choice(np.delete(np.arange(N), i), 3, replace=False) for i in range(N)])
    return z, labels, W, nb


def check_classifier(comm, device="cpu"):
    P, r = comm.size, comm.rank
    b = B // P
    lo, hi = shard_range(N, P, r)
    out = {}
    z, labels, W, nb = problem(0)
    for dtype in (np.float64, np.float32):
        for alpha in (0.0, 0.2):
            targets = target_entries(labels, N, nb, alpha)
            ref_loss, ref_dz, ref_dW, ref_acc = dense_cosine_softmax(z, labels, W, TAU,
                                                                     targets, topk=(1, 5))
            comm.reset_counters()
            # block=4: several blocks per shard, so the block combination is tested too.
            loss, acc, cache = cosine_softmax_forward(
                asarray(z[r * b:(r + 1) * b].astype(dtype), device=device),
                labels[r * b:(r + 1) * b], asarray(W[lo:hi].astype(dtype), device=device),
                comm, N, TAU, targets, topk=(1, 5), block=4)
            dz, dW = cosine_softmax_backward(1.0, cache)
            assert device_of(dz) == device_of(dW) == device
            loss, dz, dW = to_numpy(loss), to_numpy(dz), to_numpy(dW)
            key = f"{np.dtype(dtype).name}_alpha{alpha}"
            out[key] = {
                "loss": abs(float(loss) - ref_loss) / abs(ref_loss),
                "dz": scaled(dz, ref_dz[r * b:(r + 1) * b]),
                "dW": scaled(dW, ref_dW[lo:hi]),
                "dtypes_kept": dz.dtype == dtype and dW.dtype == dtype,
                "acc": acc, "ref_acc": ref_acc,
                "counters": comm.counters,
            }
    # Labels out of range on one rank only: every rank must raise (no hang).
    bad = labels[r * b:(r + 1) * b].copy()
    if r == P - 1:
        bad[0] = N
    try:
        cosine_softmax_forward(z[r * b:(r + 1) * b], bad, W[lo:hi], comm, N, TAU)
        out["bad_label_error"] = None
    except ValueError as e:
        out["bad_label_error"] = str(e)
    return out


def check_replicas(comm):
    """check_replicated passes on equal arrays and raises on every rank when the
    last rank's copy differs in one bit."""
    a = np.arange(10.0)
    check_replicated(comm, {"a": a})
    if comm.rank == comm.size - 1:
        a[3] = np.nextafter(a[3], 10)
    try:
        check_replicated(comm, {"a": a, "b": np.ones(2)})
        return None
    except RuntimeError as e:
        return str(e)


def check_adjoint(comm, device="cpu"):
    """sum_r <all_gather(x)_r, g_r> == sum_r <x_r, reduce_scatter(g)_r>, and the values."""
    P, r = comm.size, comm.rank
    xs = [make_rng(1, "test", s).normal(size=(3, 5)) for s in range(P)]   # every rank's x
    gs = [make_rng(2, "test", s).normal(size=(3 * P, 5)) for s in range(P)]
    X = to_numpy(comm.all_gather(asarray(xs[r], device=device)))
    G = to_numpy(comm.reduce_scatter(asarray(gs[r], device=device)))
    lhs = comm.all_reduce(np.array([np.sum(X * gs[r])]), "sum")[0]
    rhs = comm.all_reduce(np.array([np.sum(xs[r] * G)]), "sum")[0]
    return {"identity": abs(lhs - rhs) / abs(lhs),
            "all_gather_values": scaled(X, np.concatenate(xs)),
            "reduce_scatter_values": scaled(G, sum(gs)[3 * r:3 * (r + 1)])}


def check_uneven(comm):
    """all_gather_v (counts given and asked for), all_to_all_v and ring_shift on
    uneven shards (N = 37 rows): the values every rank must end up with."""
    P, r = comm.size, comm.rank
    W = make_rng(4, "test").normal(size=(N, 3))                          # what all ranks know
    lo, hi = shard_range(N, P, r)
    counts = [shard_range(N, P, q)[1] - shard_range(N, P, q)[0] for q in range(P)]
    out = {"gather_v_given": scaled(comm.all_gather_v(W[lo:hi], counts), W),
           "gather_v_asked": scaled(comm.all_gather_v(W[lo:hi]), W),
           "gather_v_int": bool(np.array_equal(comm.all_gather_v(np.arange(lo, hi)),
                                               np.arange(N)))}
    # all_to_all_v: rank r sends row (r, q) repeated q + 1 times to rank q.
    send = np.concatenate([np.full((q + 1, 2), 10.0 * r + q) for q in range(P)])
    got = comm.all_to_all_v(send, [q + 1 for q in range(P)], [r + 1] * P)
    want = np.concatenate([np.full((r + 1, 2), 10.0 * q + r) for q in range(P)])
    out["all_to_all_v"] = bool(np.array_equal(got, want))
    # ring_shift: after s shifts rank r holds rank (r - s)'s shard.
    held, ok = W[lo:hi], True
    for step in range(1, P + 1):
        src = (r - step) % P
        a, c = shard_range(N, P, src)
        held = comm.ring_shift(held, (c - a, 3))
        ok &= bool(np.array_equal(held, W[a:c]))
    out["ring_shift"] = ok
    # Local batches of different sizes (4, 5, 4, ...): every rank refuses, no hang.
    try:
        comm.all_gather(np.zeros((4 + (r == 1), 3)))
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    return out


def check_neighbours(comm):
    """hardest_neighbours on P ranks (uneven shards, small tiles) = the dense top-K,
    for random rows and for rows full of exact ties; K >= N is refused everywhere."""
    out = {}
    g = make_rng(5, "test")
    ties = g.choice([-0.5, 0.5], size=(N, 16))                          # cosines exact
    ties[1:20:2] = ties[0:19:2]                                         # duplicate rows
    for name, W in (("random", g.normal(size=(N, 16))), ("ties", ties)):
        clf = CosineClassifier(N, 16, comm, dtype=np.float64)
        clf.weight[...] = W[clf.lo:clf.hi]
        ref = dense_hardest_neighbours(W, 5)
        for rows, cols in ((2048, 4096), (4, 3)):
            got = hardest_neighbours(clf, comm, 5, rows, cols)
            out[f"{name}_{rows}x{cols}"] = bool(np.array_equal(got, ref))
    try:
        hardest_neighbours(clf, comm, N)
        out["k_too_large"] = None
    except ValueError as e:
        out["k_too_large"] = str(e)
    return out


class AveragingComm:
    """Negative control: a communicator whose gradient all-reduce averages (DDP's
    habit) instead of summing, i.e. gradients off by a factor of P."""

    def __init__(self, comm):
        self.inner = comm

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def all_reduce(self, x, op="sum", inplace=False):
        out = self.inner.all_reduce(x, op, inplace)
        if inplace:
            out /= self.inner.size
        return out


def run_steps(comm, bn, groups, batches, steps=3):
    """3 SGD steps on this rank's slice of each global batch; the final state."""
    P, r = comm.size, comm.rank
    b = B // P
    net = build_model("resnet18", stem="cifar", width=2, head_hidden=8, dim=D,
                      dtype=np.float64, seed=0)
    set_batchnorm_mode(net, comm, bn)
    net.bn.groups = groups
    clf = CosineClassifier(N, D, comm, tau=TAU, dtype=np.float64, seed=0, block=4)
    net_opt = SGD(net.store.data, net.store.grad, lr=0.1, momentum=0.9, weight_decay=1e-3,
                  decay_mask=net.store.decay_mask(exclude=lambda n, s: len(s) <= 1))
    clf_opt = SGD(clf.weight.ravel(), clf.grad.ravel(), lr=0.1, momentum=0.9,
                  weight_decay=1e-3)
    losses = []
    for x, labels in batches[:steps]:
        loss, _ = train_step(net, clf, x[r * b:(r + 1) * b], labels[r * b:(r + 1) * b],
                             comm, net_opt, clf_opt, check_replicas=True)
        losses.append(loss)
    return net, clf, losses


def check_step(comm):
    P = comm.size
    g = make_rng(3, "test")
    batches = [(g.normal(size=(B, 3, 16, 16)), g.permutation(N)[:B]) for _ in range(3)]
    out = {}
    cases = [("sync", "sync", 1, comm), ("local", "local", P, comm)]
    if P > 1:
        cases.append(("averaged", "sync", 1, AveragingComm(comm)))
    for name, bn, groups, c in cases:
        net, clf, losses = run_steps(c, bn, 1, batches)
        # The reference: one process, the whole global batch, plain BN ("sync")
        # or BN in P groups ("local").
        ref_net, ref_clf, ref_losses = run_steps(SelfComm(), "local", groups, batches)
        errs = {n: scaled(net.store.params[n], ref_net.store.params[n])
                for n in net.store.param_names()}
        errs["classifier.weight"] = scaled(clf.weight, ref_clf.weight[clf.lo:clf.hi])
        errs_buf = scaled(net.store.buffer_data, ref_net.store.buffer_data)
        worst = max(errs, key=errs.get)
        out[name] = {"worst_param": worst, "worst_param_err": errs[worst],
                     "buffers": errs_buf,
                     "loss": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))}
    return out


def main():
    comm = MPIComm(MPI.COMM_WORLD)
    mode = sys.argv[1]
    with abort_on_error(comm):
        if mode in ("fail", "exit"):
            if comm.rank == 1:
                if mode == "exit":
                    sys.exit(0)  # a clean-looking exit, while the others wait
                raise RuntimeError("rank 1 failed on purpose (test_rank_failure_ends_job)")
            comm.all_reduce(np.zeros(1), "sum")  # the others wait here
            comm.barrier()
            return
        if mode == "check-gpu":  # the classifier and collectives on CuPy arrays
            device = select_gpu(comm)
            result = {"gpu": device, "cuda_aware": comm.cuda_aware,
                      "classifier": check_classifier(comm, "gpu"),
                      "adjoint": check_adjoint(comm, "gpu")}
        else:
            result = {"classifier": check_classifier(comm), "adjoint": check_adjoint(comm),
                      "uneven": check_uneven(comm), "neighbours": check_neighbours(comm),
                      "replicas": check_replicas(comm),
                      "step": check_step(comm)}
        write_rank_results(comm, result, sys.argv[2])


if __name__ == "__main__":
    main()
