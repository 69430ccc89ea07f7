"""World-size-invariant batching: which instances form each global batch.

docs/design.md, "World-size invariance": the global batch of a step does not
depend on the number of ranks P. So the order is decided globally, from
(seed, epoch) alone, and every rank computes the same global batch and then
takes its own contiguous slice of it:

    perm    = epoch_permutation(n, seed, epoch)         # the same on all ranks
    batch_t = perm[t*B : (t+1)*B]                       # global batch of step t
    rank r  = batch_t[r*b : (r+1)*b],  b = B / P        # local_slice

Concatenating the local slices of ranks 0..P-1 gives back batch_t for every P,
which is what lets a P-rank run be compared with a 1-rank run.

The permutation comes from the named stream ``rng(seed, "sampler", epoch)``,
independent of the augmentation streams ``rng(seed, "augment", epoch, id)``.
"""
import numpy as np

from refimpl.backend import rng
from refimpl.checks import check_int


def epoch_permutation(n, seed, epoch):
    """int64 (n,): a permutation of 0..n-1 drawn from rng(seed, "sampler", epoch)."""
    n = check_int("n", n, minimum=0)
    check_int("seed", seed, minimum=0)
    check_int("epoch", epoch, minimum=0)
    return rng(seed, "sampler", epoch).permutation(n).astype(np.int64)


def steps_per_epoch(n, batch_size, drop_last=True):
    """Number of global batches in an epoch: n // B, or ceil(n / B) if not drop_last."""
    n = check_int("n", n, minimum=0)
    batch_size = check_int("batch_size", batch_size)
    return n // batch_size if drop_last else -(-n // batch_size)


def global_batches(n, batch_size, seed, epoch, drop_last=True):
    """List of int64 index arrays, the global batch of each step of the epoch.

    Every array has batch_size entries (the last one may be shorter when
    drop_last=False). Identical for every world size. An epoch with no batch
    at all (n < batch_size with drop_last) is an error, not a silent no-op.
    """
    steps = steps_per_epoch(n, batch_size, drop_last)
    if steps == 0:
        raise ValueError(f"no batch: {n} instances < batch size {batch_size} with drop_last=True")
    perm = epoch_permutation(n, seed, epoch)  # (n,)
    return [perm[t * batch_size:(t + 1) * batch_size] for t in range(steps)]


def local_slice(global_batch, rank, world_size):
    """Rank ``rank``'s contiguous share of a global batch: entries [r*b, (r+1)*b), b = B / P.

    global_batch: 1-d array (B,). B must be divisible by P (every rank gets
    the same local batch b; BatchNorm and the all-gather assume it).
    """
    global_batch = np.asarray(global_batch)
    if global_batch.ndim != 1:
        raise ValueError(f"global_batch must be 1-d, got shape {global_batch.shape}")
    world_size = check_int("world_size", world_size)
    rank = check_int("rank", rank, minimum=0, maximum=world_size - 1)
    B = global_batch.shape[0]
    if B % world_size:
        raise ValueError(f"global batch size {B} is not divisible by world size {world_size}: "
                         f"every rank needs the same local batch (choose B as a multiple of P)")
    b = B // world_size
    return global_batch[rank * b:(rank + 1) * b]
