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
- "variant": a whitened, mixed, scaled prior of the pooled features that keeps
  the initial BN statistics (every option of the pass that needs the
  statistics of all N rows or a copy of them) against ``dense_prior``.
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


def dense_prior(net, dataset, batches, image_size, transform="eval", seed=0, rows="paper",
                features="head", W0=None, scale=1.0, mix=1.0):
    """The reference: W (N, D) with W[i] = z_i / ||z_i|| from the batch that writes i.

    Each global batch (ids (B,), write (B,)) goes through ``net`` whole, in
    train mode (so BN normalizes with the statistics of the whole batch, or
    of ``net.bn.groups`` parts); rows with write=True are stored by
    indexing. Rows never written stay NaN.

    The variants (method/prior.py), written from their definitions: features
    "pooled" takes z = net.features(x); rows "centered" normalizes z_i - mean
    of all N, "whitened" (z_i - mean) C^(-1/2) with C's eigenvalues raised to
    at least floor * their mean (ZCA); then W = mix * scale * W + (1 - mix) * W0.
    """
    from refimpl.method.prior import WHITEN_FLOOR
    Z = np.full((len(dataset), net.dim if features == "head" else
                 net.encoder.out_features), np.nan)
    for ids, write in batches:
        images = dataset.read(ids)
        if transform == "eval":
            x = eval_transform(images, image_size, dtype=net.store.dtype)
        else:
            x = augment_batch(images, ids, seed, 0, image_size, dtype=net.store.dtype)
        z = net.forward(x, train=True) if features == "head" else net.features(x, train=True)
        Z[ids[write]] = to_numpy(z).astype(np.float64)[write]          # (B, D)
    if rows == "centered":
        Z = Z - Z.mean(axis=0)
    elif rows == "whitened":
        C = np.cov(Z, rowvar=False, bias=True)                          # (D, D)
        e, V = np.linalg.eigh(C)
        e = np.maximum(e, WHITEN_FLOOR * e.mean())
        Z = (Z - Z.mean(axis=0)) @ V @ np.diag(e ** -0.5) @ V.T
    W = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    return W if mix == 1 and scale == 1 else mix * scale * W + (1 - mix) * W0


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


def check_variant(comm):
    """The variants that need all N rows' statistics (a whitened, mixed, scaled prior
    of the pooled features, initial BN statistics kept), P ranks vs the reference."""
    from refimpl.parallel import CosineClassifier, set_batchnorm_mode
    dataset = SyntheticDataset(N, size=SIZE)
    net = build_model("resnet18", stem="cifar", width=1, head_hidden=8, dim=D,  # F = D = 8
                      dtype=np.float64, seed=1)
    set_batchnorm_mode(net, comm, "sync")
    clf = CosineClassifier(N, D, comm, dtype=np.float64, seed=0)
    W0, buffers0 = comm.all_gather_v(clf.weight), net.store.buffer_data.copy()
    report = contrastive_prior(net, clf, dataset, comm, B, seed=SEED, rows="whitened",
                               features="pooled", bn_statistics="initial", scale=0.6,
                               mix=0.7)
    W = comm.all_gather_v(clf.weight)
    ref_net = build_model("resnet18", stem="cifar", width=1, head_hidden=8, dim=D,
                          dtype=np.float64, seed=1)
    W_ref = dense_prior(ref_net, dataset, prior_batches(N, B, 1, SEED), SIZE, rows="whitened",
                        features="pooled", W0=W0, scale=0.6, mix=0.7)
    U = W_ref / np.linalg.norm(W_ref, axis=1, keepdims=True)
    cos = (U @ U.T)[~np.eye(N, dtype=bool)]                            # every pair i != j
    return {"W": scaled(W, W_ref), "mean_cosine": report["mean_cosine"],
            "mean_cosine_ref": float(cos.mean()),
            "buffers_initial": bool(np.array_equal(net.store.buffer_data, buffers0))}


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
        result = {"sync": check_prior(comm, "sync"), "local": check_prior(comm, "local"),
                  "variant": check_variant(comm)}
        for kind in ("doubled", "missing", "both"):
            result[kind] = check_error(comm, kind)
        write_rank_results(comm, result, sys.argv[1])


if __name__ == "__main__":
    main()
