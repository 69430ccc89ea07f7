"""The contrastive prior: the classifier's rows start as the instances' own features.

Contract (docs/design.md, "Contrastive prior"). Before the first training step,
``contrastive_prior`` makes one pass over the whole training set with the
randomly initialized encoder and head and writes, for every instance i,

    W[i] = z_hat_i = z_i / ||z_i||,     z_i = head(encoder(x_i))

into the classifier weight W (N x D), sharded over the ranks. During the pass:

- BatchNorm runs in TRAINING mode: each batch is normalized with its own
  statistics (per rank, synchronized or grouped: whatever ``net.bn`` says)
  and the running statistics are updated, as in a training step. With
  "local" BN (``net.bn.allreduce is None``) rank 0's running statistics are
  broadcast at the end, as ``train.step.update`` does after a step.
- No gradient: nothing calls backward, no gradient buffer and no optimizer
  is touched, no parameter moves, and no cache is kept: the layers' caches
  are dropped after every batch (``Network.drop_caches``).
- The evaluation transform (central crop, resize, normalize; no randomness),
  or ``transform="train"``: the training augmentation of epoch 0.
- W is written IN PLACE (``CosineClassifier.write_rows``): an optimizer built
  before the pass holds a view of ``clf.weight`` and sees the new rows.

Batches (``prior_batches``): the N instances in the order of the permutation
``rng(seed, "prior")`` (independent of the world size P), cut into global
batches of B. A short last batch is filled up to B by wrapping around to the
start of the order; those extra entries are computed (BatchNorm sees a full
batch) but carry ``write=False``. Rank r computes the slice
``local_slice(batch, r, P)`` of every global batch (b = B / P entries).

Routing. Row i of W lives on the rank that owns it (``shard_owner``), which
is in general not the rank that computed z_hat_i. One Alltoallv per batch
(``comm.all_to_all_v``) sends every written row to its owner; nobody ever
gathers W. The batch ids and write flags are known on every rank, so each
rank computes without communication what it receives from whom, in which
order (the written entries of the batch that it owns, in batch order). Bytes
per rank per batch, s = itemsize of the features (8 for float64):

    sent      (written entries in this rank's slice) * D * s   <= b * D * s
    received  (written entries of the batch it owns) * D * s

over the whole pass: received = N_r * D * s (each own row once), and the sum
over the ranks of what was sent is N * D * s.

Coverage check. Each rank counts the writes of each of its rows. At the end
one all-reduce (two integers) tells every rank how many rows anywhere were
written 0 times or more than once; if any, every rank raises the SAME
ValueError naming the first few such ids (gathered with ``all_gather_v``).
The rows that were written stay written (the error is meant to stop the run).

Variants (the paper leaves these open; ``docs/ablation.md`` measures each):

    rows       "paper"     W[i] = z_hat_i (the reading above)
               "centered"  W[i] = normalize(z_i - m), m = (1/N) sum_j z_j over ALL N
               "whitened"  W[i] = normalize(C^(-1/2) (z_i - m)), C the covariance of
                           the N features (ZCA: the whitening closest to z itself)
    features   "head"      z = head(encoder(x)) (the paper's; what the classifier sees)
               "pooled"    z = encoder(x), the pooled encoder output (needs F = D)
    bn_statistics  "pass"     training starts with the running statistics of the
                              pass (the paper's reading: BN ran in training mode)
                   "initial"  they are put back to what they were before the pass
    scale      the norm of each written row (1: unit rows; nn.Linear's rows have
               about sqrt(1/3) = 0.577, and a cosine classifier's row turns by
               an angle of about lr |gradient| / ||w||^2 per step)
    mix        W[i] = mix * scale * row_i + (1 - mix) * W0[i], W0 the rows the
               pass found (the random init): 1 writes the features alone

For "centered" and "whitened" the pass routes the raw z_i and writes them; a
finishing step then needs the statistics of all N rows: one all-reduce of
D sums ("centered") or of D + D^2 ("whitened", in float64), after which
every rank transforms its own rows in place. The report's ``mean_cosine`` is
the mean pairwise cosine of the written rows over all N,

    (1 / (N (N - 1))) sum_{i != j} <w_hat_i, w_hat_j> = (||sum_i w_hat_i||^2 - N) / (N (N - 1)),

from one all-reduce of D sums: near 0 for random directions, near 1 when
the rows share one direction (random-init features live in such a cone).

    batches = prior_batches(len(dataset), 256, comm.size, seed=0)
    report = contrastive_prior(net, clf, dataset, comm, 256, seed=0)
    print(prior_summary(report))
"""
import time

import numpy as np

from refimpl.backend import get_array_module, rng, synchronize, to_numpy
from refimpl.checks import check_int
from refimpl.data.augment import augment_batch, eval_transform
from refimpl.data.sampler import local_slice
from refimpl.layers.normalize import l2_normalize_forward
from refimpl.parallel.data_parallel import broadcast_buffers, check_replicated
from refimpl.parallel.sharding import shard_owner, shard_range

TRANSFORMS = ("eval", "train")
ROWS = ("paper", "centered", "whitened")
FEATURES = ("head", "pooled")
BN_STATISTICS = ("pass", "initial")
# "whitened": eigenvalues of the covariance below this fraction of the mean
# eigenvalue are raised to it, so that directions of almost no variance (a
# random head's rank deficit) are not blown up into the rows.
WHITEN_FLOOR = 1e-2
SHOW_IDS = 10  # ids named in a coverage error, at most, of each kind


def prior_batches(num_instances, batch_size, world_size, seed=0):
    """The global batches of the prior pass: [(ids int64 (B,), write bool (B,)), ...].

    The N instances in the order ``rng(seed, "prior").permutation(N)`` (the
    same for every world size), cut into ceil(N / B) batches of exactly B.
    Slot k of the pass (k = 0 .. ceil(N/B) * B - 1) holds order[k mod N] and
    write = (k < N): every instance appears with write=True exactly once;
    the slots after N repeat the start of the order (several times when
    N < B) with write=False. world_size P is only checked: B must be
    divisible by P (every rank computes b = B / P entries of each batch).
    """
    N = check_int("num_instances", num_instances)
    B = check_int("batch_size", batch_size)
    P = check_int("world_size", world_size)
    seed = check_int("seed", seed, minimum=0)
    if B % P:
        raise ValueError(f"prior batch size {B} is not divisible by world size {P}: every "
                         f"rank needs the same local batch (choose B as a multiple of P)")
    order = rng(seed, "prior").permutation(N).astype(np.int64)      # (N,)
    T = -(-N // B)                                                  # batches, the last padded
    slots = np.arange(T * B)                                        # (T*B,)
    ids = order[slots % N]                                          # wraps to the start
    write = slots < N                                               # the padding is not written
    return [(ids[t * B:(t + 1) * B], write[t * B:(t + 1) * B]) for t in range(T)]


def _check_batches(batches, num_classes, world_size):
    """batches as a list of (int64 ids (B_t,), bool write (B_t,)) host arrays, or ValueError.

    Each batch: 1-d integer ids in [0, N), boolean write flags of the same
    shape, a positive length divisible by P. (Coverage is what the pass
    itself checks.)
    """
    out = []
    for t, batch in enumerate(batches):
        if len(batch) != 2:
            raise ValueError(f"prior batch {t} must be a pair (ids, write), got "
                             f"{len(batch)} items")
        ids, write = np.asarray(batch[0]), np.asarray(batch[1])
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError(f"prior batch {t}: ids must be a non-empty 1-d integer array, "
                             f"got {ids.dtype} of shape {ids.shape}")
        if write.shape != ids.shape or write.dtype != bool:
            raise ValueError(f"prior batch {t}: write must be a bool array of shape "
                             f"{ids.shape}, got {write.dtype} of shape {write.shape}")
        if ids.size % world_size:
            raise ValueError(f"prior batch {t} has {ids.size} entries, not divisible by world "
                             f"size {world_size}: every rank needs the same local batch")
        if ids.min() < 0 or ids.max() >= num_classes:
            raise ValueError(f"prior batch {t}: ids must lie in [0, {num_classes}) (the rows of "
                             f"W), got values in [{ids.min()}, {ids.max()}]")
        out.append((ids.astype(np.int64), write))
    if not out:
        raise ValueError("the prior needs at least one batch")
    return out


def _coverage_message(num_classes, n_missing, missing, n_doubled, doubled):
    """The coverage error's text: counts, then the first ids of each kind.

    missing (k,) ids never written; doubled (k, 2) [id, times written].
    """
    parts = []
    if n_missing:
        more = ", ..." if n_missing > len(missing) else ""
        parts.append(f"{n_missing} row(s) never written (ids "
                     f"{', '.join(str(int(i)) for i in missing)}{more})")
    if n_doubled:
        more = ", ..." if n_doubled > len(doubled) else ""
        parts.append(f"{n_doubled} row(s) written more than once (ids "
                     f"{', '.join(f'{int(i)} x{int(c)}' for i, c in doubled)}{more})")
    return (f"contrastive prior: every row of W (N = {num_classes}) must be written exactly "
            f"once; " + " and ".join(parts))


def contrastive_prior(net, clf, dataset, comm, batch_size=None, seed=0, image_size=None,
                      transform="eval", augment_config=None, batches=None, progress=None,
                      rows="paper", features="head", bn_statistics="pass", scale=1.0, mix=1.0):
    """One no-gradient, train-mode-BN pass: W[i] = z_hat_i for every instance i, in place.

    Inputs (this rank):
      net        ``models.Network``, randomly initialized; its BN mode as set
                 by ``set_batchnorm_mode`` (or ``net.bn.groups``)
      clf        ``parallel.CosineClassifier`` of N = len(dataset) rows, this
                 rank's shard [lo, hi); ``clf.weight`` is overwritten in place
      dataset    ``read(indices) -> uint8 (n, H, W, 3)``, ``len()``,
                 ``image_size`` (used only when image_size is None)
      comm       the communicator of clf (``SelfComm`` or ``MPIComm``)
      batch_size global batch B of the pass, divisible by P (ignored when
                 ``batches`` is given)
      seed       the order of the pass (``prior_batches``) and, with
                 transform="train", the augmentation (epoch 0)
      image_size side S of the network's input (default: min of the
                 dataset's H, W)
      transform  "eval" (``eval_transform``) or "train" (``augment_batch``)
      augment_config  ``AugmentConfig`` of the transform (default: its default)
      batches    None (``prior_batches(N, B, P, seed)``) or the caller's list of
                 (ids (B_t,), write (B_t,)), the same on every rank
      progress   None or a callable, called after each batch with the number
                 of instances that batch wrote (e.g. a tqdm bar's ``update``)
      rows, features, bn_statistics, scale, mix: the variants (module
                 docstring); the defaults are the paper's reading
    Output: a dict (the same keys on every rank) with rows (N), batches,
      computed (entries run through the network, padding included), seconds,
      instances_per_second (N / seconds), bytes_sent / bytes_received (this
      rank's routing traffic, module docstring), mean_cosine (of the written
      rows; nan for N = 1).
    Raises ValueError on every rank when some row was written 0 or > 1 times.

    Per batch: z = net.forward(x_r, train=True) (b, D); z_hat = normalize(z);
    the written rows go to their owners (one all_to_all_v); each owner
    writes W[i] = z_hat_i.
    """
    P, r = comm.size, comm.rank
    N = clf.num_classes
    if (clf.lo, clf.hi) != shard_range(N, P, r):
        raise ValueError(f"clf owns rows [{clf.lo}, {clf.hi}) but rank {r} of {P} owns "
                         f"{shard_range(N, P, r)}: the classifier was made for another "
                         f"communicator")
    if len(dataset) != N:
        raise ValueError(f"the dataset has {len(dataset)} instances but the classifier has "
                         f"N = {N} rows: the prior writes row i from instance i")
    for name, value, choices in (("transform", transform, TRANSFORMS), ("rows", rows, ROWS),
                                 ("features", features, FEATURES),
                                 ("bn_statistics", bn_statistics, BN_STATISTICS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    width = net.encoder.out_features if features == "pooled" else net.dim
    if width != clf.dim:
        what = ("pooled encoder features" if features == "pooled" else
                "network's features")
        raise ValueError(f"the {what} have dim {width} but the classifier's rows have "
                         f"{clf.dim}")
    if not 0 < scale < float("inf"):
        raise ValueError(f"scale must be > 0 and finite, got {scale}")
    if not 0 < mix <= 1:
        raise ValueError(f"mix must lie in (0, 1], got {mix}")
    seed = check_int("seed", seed, minimum=0)
    S = min(dataset.image_size) if image_size is None else check_int("image_size", image_size)
    if batches is None:
        if batch_size is None:
            raise ValueError("contrastive_prior needs batch_size (or batches)")
        batches = prior_batches(N, batch_size, P, seed)
    batches = _check_batches(batches, N, P)
    # Every rank must route the same batches: otherwise the Alltoallv counts
    # disagree. One all_gather of one checksum, raised on every rank.
    check_replicated(comm, {"prior batches": np.concatenate(
        [np.concatenate([ids, write.astype(np.int64)]) for ids, write in batches])})

    xp = get_array_module(net.store.data)
    device, dtype = net.store.device, net.store.dtype
    initial_rows = clf.weight.copy() if mix < 1 else None          # (N_r, D) the random init
    initial_bn = net.store.snapshot_buffers() if bn_statistics == "initial" else None
    writes = np.zeros(clf.hi - clf.lo, dtype=np.int64)              # (N_r,) writes per own row
    sent = received = computed = 0
    start = time.perf_counter()
    for ids, write in batches:
        b = ids.shape[0] // P
        owner = shard_owner(ids, N, P)                              # (B,) who owns each row
        ids_r, write_r, owner_r = (local_slice(a, r, P) for a in (ids, write, owner))  # (b,)

        # Forward only, BatchNorm in train mode (batch statistics, running
        # statistics updated).
        images = dataset.read(ids_r)                                # uint8 (b, H, W, 3)
        if transform == "eval":
            x = eval_transform(images, S, augment_config, device, dtype)       # (b, 3, S, S)
        else:
            x = augment_batch(images, ids_r, seed, 0, S, augment_config, device, dtype)
        if features == "head":
            z = net.forward(x, train=True)                          # (b, D)
        else:
            z = net.features(x, train=True)                         # (b, F = D)
        net.drop_caches()                                           # no backward follows
        if rows == "paper":
            z, _ = l2_normalize_forward(z)                          # (b, D) z_hat
        # else the raw z is written; the finishing step transforms it

        # What this rank sends: its written rows, grouped by owner rank (a
        # stable sort keeps batch order within each owner).
        pos = np.nonzero(write_r)[0]
        pos = pos[np.argsort(owner_r[pos], kind="stable")]          # (n_send,)
        send_counts = np.bincount(owner_r[pos], minlength=P)        # (P,)
        # What it receives, known without asking: the written entries of the
        # batch that it owns, from rank q = position // b, in batch order.
        got = np.nonzero(write & (owner == r))[0]                   # (n_recv,) batch positions
        recv_counts = np.bincount(got // b, minlength=P)            # (P,)
        # The routing collective: one Alltoallv per batch, rows to the owners
        # of their W rows. Sends n_send * D * s bytes, receives n_recv * D * s.
        routed = comm.all_to_all_v(z[xp.asarray(pos)], send_counts, recv_counts)  # (n_recv, D)
        clf.write_rows(ids[got], routed)                            # in place
        np.add.at(writes, ids[got] - clf.lo, 1)

        sent += pos.size * z.shape[1] * z.itemsize
        received += routed.nbytes
        computed += ids.shape[0]
        if progress is not None:
            progress(int(write.sum()))
    if initial_bn is not None:
        # Training starts from the running statistics the network had before.
        net.store.restore_buffers(initial_bn)
    elif net.bn.allreduce is None:
        # "local" BN: ranks saw different batches; keep rank 0's statistics.
        broadcast_buffers(net.store, comm)
    synchronize(clf.weight)  # the last writes are part of the pass's time
    seconds = time.perf_counter() - start

    # Coverage: every row of W written exactly once, checked on every rank.
    missing = clf.lo + np.nonzero(writes == 0)[0]                   # (n_missing_r,) global ids
    doubled = clf.lo + np.nonzero(writes > 1)[0]                    # (n_doubled_r,)
    n_missing, n_doubled = comm.all_reduce(
        np.array([missing.size, doubled.size], dtype=np.int64), "sum").tolist()
    if n_missing or n_doubled:
        # The first few of each kind from every rank, in rank order = id order.
        missing = comm.all_gather_v(missing[:SHOW_IDS])[:SHOW_IDS]
        doubled = comm.all_gather_v(np.stack(
            [doubled[:SHOW_IDS], writes[doubled[:SHOW_IDS] - clf.lo]], axis=1))[:SHOW_IDS]
        raise ValueError(_coverage_message(N, n_missing, missing, n_doubled, doubled))

    if rows != "paper":
        clf.weight[...] = _standardized_rows(clf.weight, N, comm, rows)
    if scale != 1 or mix < 1:
        # mix and scale as Python floats keep W's dtype
        clf.weight[...] = (mix * scale) * clf.weight if mix == 1 else \
            (mix * scale) * clf.weight + (1 - mix) * initial_rows
    return {"rows": N, "batches": len(batches), "computed": computed, "seconds": seconds,
            "instances_per_second": N / seconds if seconds > 0 else float("inf"),
            "bytes_sent": sent, "bytes_received": received,
            "mean_cosine": mean_pairwise_cosine(clf.weight, N, comm)}


def _standardized_rows(weight, num_rows, comm, rows):
    """The own raw rows Z_r (N_r, D), centred or whitened with all N rows' statistics, unit.

    "centered": normalize(z - m); "whitened": normalize((z - m) T), T = V diag(1 /
    sqrt(max(e, floor))) V^T from the covariance C = V diag(e) V^T of all N rows
    (ZCA), floor = WHITEN_FLOOR * mean(e). Statistics in float64: one all-reduce of
    the D sums (and of the D x D products). Every rank computes the same T from
    the same reduced numbers.
    """
    xp = get_array_module(weight)
    z = weight.astype(xp.float64)                                   # (N_r, D)
    D = z.shape[1]
    if rows == "centered":
        m = comm.all_reduce(z.sum(axis=0), "sum") / num_rows        # (D,)
        out = z - m
    else:
        stats = comm.all_reduce(xp.concatenate([z.sum(axis=0), (z.T @ z).ravel()]), "sum")
        m = stats[:D] / num_rows                                    # (D,)
        cov = stats[D:].reshape(D, D) / num_rows - xp.outer(m, m)   # (D, D), biased
        e, V = xp.linalg.eigh(cov)                                  # ascending eigenvalues
        e = xp.maximum(e, WHITEN_FLOOR * max(float(e.mean()), 0.0) + 1e-30)
        out = (z - m) @ ((V / xp.sqrt(e)) @ V.T)                    # (N_r, D) ZCA
    out, _ = l2_normalize_forward(out)
    return out.astype(weight.dtype)


def mean_pairwise_cosine(weight, num_rows, comm):
    """Mean of <w_hat_i, w_hat_j> over all pairs i != j of the N rows (sharded), a float.

    = (||sum_i w_hat_i||^2 - N) / (N (N - 1)), from one all-reduce of D sums in
    float64; nan for N = 1.
    """
    if num_rows < 2:
        return float("nan")
    xp = get_array_module(weight)
    unit, _ = l2_normalize_forward(weight.astype(xp.float64))       # (N_r, D)
    total = to_numpy(comm.all_reduce(unit.sum(axis=0), "sum"))      # (D,)
    return float((total @ total - num_rows) / (num_rows * (num_rows - 1)))


def prior_summary(report):
    """One line for the log: rows, time, throughput and this rank's routed bytes."""
    return (f"contrastive prior: {report['rows']} rows of W written once each "
            f"(mean pairwise cosine {report['mean_cosine']:+.3f}), "
            f"{report['batches']} batches ({report['computed']} forward passes incl. "
            f"padding) in {report['seconds']:.2f} s, {report['instances_per_second']:.1f} "
            f"instances/s; routed {report['bytes_sent'] / 2**20:.2f} MiB sent, "
            f"{report['bytes_received'] / 2**20:.2f} MiB received on this rank")
