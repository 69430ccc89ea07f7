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
  byte counters vs DESIGN.md's formula, labels out of range;
- adjoint: <all_gather(x), g> = <x, reduce_scatter(g)>, summed over ranks;
- step: 3 SGD steps of encoder + head + classifier, P ranks vs 1 process,
  "sync" BN and "local" BN (vs bn_groups = P), and a negative control that
  averages the gradients instead of summing them; every step checks that the
  replicated parameters and BN statistics are bitwise equal on all ranks
  (``check_replicas=True``: a difference aborts the job).

``fail``: rank 1 raises while the others wait in a collective; the job must
end (abort_on_error), not hang.
"""
import json
import sys

import numpy as np
from mpi4py import MPI

from refimpl.backend import asarray, device_of, rng as make_rng, to_numpy
from refimpl.layers.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from refimpl.layers.normalize import l2_normalize_backward, l2_normalize_forward
from refimpl.models import build_model
from refimpl.parallel import (CosineClassifier, MPIComm, SelfComm, abort_on_error,
                              check_replicated, cosine_softmax_backward,
                              cosine_softmax_forward, set_batchnorm_mode, shard_range,
                              select_gpu, target_entries, train_step)
from refimpl.sgd import SGD

N, D, B, TAU = 37, 8, 12, 0.15  # 37 classes over 4 ranks: shards of 9 and 10 rows


def scaled(a, b):
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


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


def dense_reference(z, labels, W, nb, alpha):
    """Loss, dz, dW, top-1/top-5 of the dense cosine softmax, from the layers."""
    zh, zc = l2_normalize_forward(z)
    wh, wc = l2_normalize_forward(W)
    L = zh @ wh.T / TAU                                                  # (B, N)
    ids, wts = target_entries(labels, N, nb, alpha)
    y = np.zeros((B, N))
    np.add.at(y, (np.repeat(np.arange(B), ids.shape[1]), ids.ravel()), wts.ravel())
    loss, cache = softmax_cross_entropy_forward(L, y)
    dL = softmax_cross_entropy_backward(1.0, cache)
    dz = l2_normalize_backward(dL @ wh / TAU, zc)
    dW = l2_normalize_backward(dL.T @ zh / TAU, wc)
    ly = L[np.arange(B), labels][:, None]
    rank = (L > ly).sum(1) + ((L == ly) & (np.arange(N) < labels[:, None])).sum(1)
    return float(loss), dz, dW, {1: float(np.mean(rank < 1)), 5: float(np.mean(rank < 5))}


def check_classifier(comm, device="cpu"):
    P, r = comm.size, comm.rank
    b = B // P
    lo, hi = shard_range(N, P, r)
    out = {}
    z, labels, W, nb = problem(0)
    for dtype in (np.float64, np.float32):
        for alpha in (0.0, 0.2):
            ref_loss, ref_dz, ref_dW, ref_acc = dense_reference(z, labels, W, nb, alpha)
            comm.reset_counters()
            # block=4: several blocks per shard, so the block combination is tested too.
            loss, acc, cache = cosine_softmax_forward(
                asarray(z[r * b:(r + 1) * b].astype(dtype), device=device),
                labels[r * b:(r + 1) * b], asarray(W[lo:hi].astype(dtype), device=device),
                comm, N, TAU, nb, alpha, topk=(1, 5), block=4)
            dz, dW = cosine_softmax_backward(cache)
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
    net.bn_groups = groups
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
        if mode == "fail":
            if comm.rank == 1:
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
                      "replicas": check_replicas(comm), "step": check_step(comm)}
        everyone = comm.comm.gather(result, root=0)  # test plumbing only (pickles)
        if comm.rank == 0:
            with open(sys.argv[2], "w") as f:
                json.dump({"size": comm.size, "ranks": everyone}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
