"""The rank program of the contrastive prior's MPI tests, and the dense reference.

    mpirun -np P python tests/prior_worker.py OUT.json      (tests/test_prior_mpi.py)

``dense_prior`` is the single-process reference the prior is checked
against (here and in tests/test_prior.py): the same global batches run
whole through one network, W[i] = z_hat_i written by plain indexing; no
routing, no sharding, no communicator.

The rank program runs, on every rank, with N = 37 instances (uneven shards
for P = 3, 4) and B = 12 (divisible by every P in 1..4):

- "sync": the P-rank prior with synchronized BN against ``dense_prior`` of
  a fresh network with plain BN: the whole W (the shards gathered after the
  pass) and the BN running statistics; the byte counters of the pass; the
  replicated parameters and BN statistics equal on every rank.
- "local": the same with per-rank BN against ``net.bn.groups = P``; the
  negative control: the same W against the plain-BN reference (must differ
  when P > 1).
- "doubled", "missing", "both": batches with one id written twice, one id
  never written, or both: the ValueError every rank raises, caught here
  (the error is expected on every rank, so the job ends normally).
Rank 0 writes every rank's results to OUT.json; pytest asserts on them.
"""
import sys

import numpy as np

from refimpl.backend import to_numpy
from refimpl.data.augment import augment_batch, eval_transform
from refimpl.data.synthetic import SyntheticDataset
from refimpl.method.prior import contrastive_prior, prior_batches
from refimpl.models import build_model

from mpi_run import write_rank_results

N, D, B, SIZE, SEED = 37, 8, 12, 8, 3  # 37 rows over 4 ranks: shards of 9, 9, 9, 10


def tiny_net(seed=0):
    """A float64 ResNet-18 of width 2 with a head 16 -> 8 -> 8."""
    return build_model("resnet18", stem="cifar", width=2, head_hidden=8, dim=D,
                       dtype=np.float64, seed=seed)


def dense_prior(net, dataset, batches, image_size, transform="eval", seed=0):
    """The reference: W (N, D) with W[i] = z_i / ||z_i|| from the batch that writes i.

    Each global batch (ids (B,), write (B,)) goes through ``net`` whole, in
    train mode (so BN normalizes with the statistics of the whole batch, or
    of ``net.bn.groups`` parts); rows with write=True are stored by
    indexing. Rows never written stay NaN.
    """
    W = np.full((len(dataset), net.dim), np.nan)
    for ids, write in batches:
        images = dataset.read(ids)
        if transform == "eval":
            x = eval_transform(images, image_size, dtype=net.store.dtype)
        else:
            x = augment_batch(images, ids, seed, 0, image_size, dtype=net.store.dtype)
        z = to_numpy(net.forward(x, train=True)).astype(np.float64)  # (B, D)
        zhat = z / np.linalg.norm(z, axis=1, keepdims=True)
        W[ids[write]] = zhat[write]
    return W


def scaled(a, b):
    """max |a - b| / max |b|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def check_prior(comm, bn):
    """The P-rank prior with ``bn`` BatchNorm vs the 1-process dense reference."""
    from refimpl.parallel import CosineClassifier, check_replicated, set_batchnorm_mode
    P = comm.size
    dataset = SyntheticDataset(N, size=SIZE)
    net = tiny_net()
    set_batchnorm_mode(net, comm, bn)
    clf = CosineClassifier(N, D, comm, dtype=np.float64, seed=0)
    params0 = net.store.data.copy()
    comm.reset_counters()
    report = contrastive_prior(net, clf, dataset, comm, B, seed=SEED)
    counters = {op: dict(c) for op, c in comm.counters.items()}
    W = comm.all_gather_v(clf.weight)                                # (N, D), the test's view

    ref_net = tiny_net()
    ref_net.bn.groups = P if bn == "local" else 1
    W_ref = dense_prior(ref_net, dataset, prior_batches(N, B, 1, SEED), SIZE)
    out = {"W": scaled(W, W_ref),
           "buffers": scaled(net.store.buffer_data, ref_net.store.buffer_data),
           "counts_equal": all(int(net.store.buffers[n]) == int(ref_net.store.buffers[n])
                               for n in net.store.counter_names()),
           "num_batches_tracked": int(net.store.buffers["bn1.num_batches_tracked"]),
           "params_unchanged": bool(np.array_equal(net.store.data, params0)),
           "grad_zero": bool(not np.any(net.store.grad)),
           "counters": counters, "report": report}
    try:
        check_replicated(comm, {"BN statistics": net.store.buffer_data,
                                "parameters": net.store.data})
        out["replicas"] = None
    except RuntimeError as e:
        out["replicas"] = str(e)
    if bn == "local":
        # Negative control: per-rank statistics are not the whole batch's.
        plain = tiny_net()
        out["W_vs_plain_bn"] = scaled(W, dense_prior(plain, dataset,
                                                     prior_batches(N, B, 1, SEED), SIZE))
    return out


def bad_batches(kind):
    """The default batches with one row doubled, one missing, or both."""
    batches = [(ids.copy(), write.copy()) for ids, write in prior_batches(N, B, 1, SEED)]
    if kind in ("doubled", "both"):
        batches[-1][1][-1] = True              # a padding entry written: its id twice
    if kind in ("missing", "both"):
        batches[1][1][5] = False               # an entry not written: its id never
    return batches


def check_error(comm, kind):
    """The error every rank raises for ``bad_batches(kind)`` (None if none)."""
    from refimpl.parallel import CosineClassifier
    clf = CosineClassifier(N, D, comm, dtype=np.float64, seed=0)
    try:
        contrastive_prior(tiny_net(), clf, SyntheticDataset(N, size=SIZE), comm,
                          batches=bad_batches(kind))
        return None
    except ValueError as e:
        return str(e)


def main():
    from mpi4py import MPI

    from refimpl.parallel import MPIComm, abort_on_error
    comm = MPIComm(MPI.COMM_WORLD)
    # abort_on_error: an unexpected failure on one rank ends the job (no hang);
    # the coverage errors are expected on every rank and caught in check_error.
    with abort_on_error(comm):
        result = {"sync": check_prior(comm, "sync"), "local": check_prior(comm, "local")}
        for kind in ("doubled", "missing", "both"):
            result[kind] = check_error(comm, kind)
        write_rank_results(comm, result, sys.argv[1])


if __name__ == "__main__":
    main()
