"""Features of a whole dataset, encoded by all ranks, each its share, then gathered.

Contract. ``extract_features(net, dataset, comm)`` returns, on EVERY rank,
a dict of host arrays in dataset order:

    "pooled"  (N, F)    h = net.features(x, train=False), the pooled encoder output
    "head"    (N, dim)  z = net.head(h, train=False) = net.forward(x, train=False)

where x = ``eval_transform`` of image i (central square, bilinear resize to
S x S, normalize; no randomness). BatchNorm is in EVAL mode: it normalizes
with its running statistics, so a feature does not depend on which batch,
batch size or rank encoded it, no collective runs inside the network, and
the running statistics are not changed. (An untrained network's running
statistics are mean 0, variance 1: "random init, eval-mode BN" is a
statement about those, not about batch statistics.)

Work split: rank r encodes the contiguous share ``shard_range(N, P, r)``,
rows [floor(r N / P), floor((r + 1) N / P)), in batches of ``batch_size``; the
share is moved to the host and one ``comm.all_gather_v`` per feature kind
(the counts are known from the split, so no count exchange) assembles all
N rows on every rank. Bytes per rank and kind: sent n_r F s, received N F s
(s = 4 or 8, the network's dtype). With N < P the ranks r where the formula
gives an empty share encode nothing and send zero rows.

Memory per rank: one batch of uint8 images (host), its transform
(B, 3, S, S) and the network's activations for one batch (device), the share
n_r (F + dim) s (host), then the whole result N (F + dim) s (host), on every
rank: CIFAR-10's 50,000 train images with ResNet-18 (F = 512, dim = 128) in
float32 are 128 MB; ImageNet's 1.28M with ResNet-50 (F = 2048) are 11 GB, so
there take a subset of the train split as the kNN bank.
"""
import numpy as np

from refimpl.backend import to_numpy
from refimpl.checks import check_int
from refimpl.data.augment import eval_transform
from refimpl.parallel.sharding import shard_range

KINDS = ("pooled", "head")


def extract_features(net, dataset, comm, batch_size=256, image_size=None,
                     which=("pooled", "head"), config=None, progress=None):
    """{kind: host array (N, width)} of every image of ``dataset``, on every rank.

    net: a ``refimpl.models.Network`` (its store's device and dtype are used);
    dataset: ``read(indices)`` -> uint8 (n, H, W, 3), ``len()``, ``image_size``;
    comm: ``SelfComm`` or ``MPIComm``, every rank calls this together;
    batch_size >= 1 images per forward; image_size: the side S the network
    sees (default: min(H, W) of the dataset); which: the kinds, a non-empty
    subset of ("pooled", "head"), returned in this order; config: the
    ``AugmentConfig`` whose normalization ``eval_transform`` applies (default
    ImageNet's mean/std, as training); progress: None or a callable
    ``progress(done, total)`` called after each batch with this rank's counts.

    Returns {"pooled": (N, F), "head": (N, dim)} host arrays of the network's
    dtype, row i = image i, identical on every rank (module docstring).
    """
    which = _check_which(which)
    batch_size = check_int("batch_size", batch_size)
    N, P, r = len(dataset), comm.size, comm.rank
    if N < 1:
        raise ValueError("extract_features: the dataset is empty")
    if image_size is None:
        image_size = min(dataset.image_size)
    image_size = check_int("image_size", image_size)
    # shard_range's split; with N < P its formula leaves some ranks without rows
    bounds = [shard_range(N, P, q) if N >= P else (q * N // P, (q + 1) * N // P)
              for q in range(P)]
    counts = [hi - lo for lo, hi in bounds]
    lo, hi = bounds[r]
    widths = {"pooled": net.encoder.out_features, "head": net.dim}
    dtype = net.store.dtype
    parts = {kind: [] for kind in which}
    for s in range(lo, hi, batch_size):
        images = dataset.read(np.arange(s, min(s + batch_size, hi)))      # (b, H, W, 3) uint8
        x = eval_transform(images, image_size, config, device=net.store.device,
                           dtype=dtype)                                   # (b, 3, S, S)
        h = net.features(x, train=False)                                  # (b, F)
        if "pooled" in parts:
            parts["pooled"].append(to_numpy(h))
        if "head" in parts:
            # what net.forward(x, train=False) computes, without a second encoder pass
            parts["head"].append(to_numpy(net.head.forward(h, train=False)))  # (b, dim)
        if progress is not None:
            progress(min(s + batch_size, hi) - lo, hi - lo)
    net.drop_caches()                                                     # no backward follows
    out = {}
    for kind in which:
        mine = (np.concatenate(parts[kind]) if parts[kind]
                else np.empty((0, widths[kind]), dtype=dtype))            # (n_r, width)
        out[kind] = comm.all_gather_v(mine, counts)                       # (N, width)
    return out


def _check_which(which):
    """A non-empty tuple of distinct kinds from KINDS (a single name allowed)."""
    which = (which,) if isinstance(which, str) else tuple(which)
    if not which or len(set(which)) != len(which) or any(k not in KINDS for k in which):
        raise ValueError(f"which must name distinct feature kinds from {KINDS}, got {which!r}")
    return which
