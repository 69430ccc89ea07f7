"""The global batch of every fine-tuning step: a stream of passes over the labeled ids.

Contract. The n labeled ids (``labels.label_subset``) are visited in passes;
pass q visits them in the order ``data.sampler.epoch_permutation(n, seed, q)``
(the stream rng(seed, "sampler", q)). The passes are laid end to end, and
the global batch of step t is entries [t B, (t + 1) B) of that stream:

    stream  = ids[perm_0] ++ ids[perm_1] ++ ids[perm_2] ++ ...
    batch_t = stream[t B : (t + 1) B]          rank r: entries [r b, (r + 1) b)

Each entry carries the pass it came from, which keys its augmentation
(``rng(seed, "augment", q, id)``): an image seen twice is augmented twice
differently. A batch may straddle two passes, and with B > n it holds an
image more than once (from different passes).

Why a stream and not epochs of the labeled set: 1% of the labels can be
fewer images than one batch, and a fine-tune's budget is a number of steps
that must not depend on the fraction (``FineTuneConfig.steps_per_epoch``).
Like ``data.sampler`` it depends on (seed, t) alone, never on P, so a
P-rank step sees the 1-rank step's batch and pixels.
"""
import numpy as np

from refimpl.checks import check_int
from refimpl.data.sampler import epoch_permutation


def batch_of_step(ids, batch_size, seed, step):
    """(ids (B,), passes (B,)): the global batch of ``step`` and each entry's pass.

    ids: int64 (n,) the labeled ids; batch_size B >= 1; step t >= 0.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n = ids.shape[0]
    if n < 1:
        raise ValueError("batch_of_step: no labeled ids")
    B = check_int("batch_size", batch_size)
    t = check_int("step", step, minimum=0)
    positions = np.arange(t * B, (t + 1) * B, dtype=np.int64)     # (B,) in the stream
    passes = positions // n
    out = np.empty(B, dtype=np.int64)
    for q in np.unique(passes):  # one or two passes unless B > n
        at = passes == q
        out[at] = ids[epoch_permutation(n, seed, int(q))[positions[at] % n]]
    return out, passes
