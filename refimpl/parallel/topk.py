"""Top-k accuracy of the sharded classifier, without gathering the logits.

Contract. The label's rank in row b of the logits is

    rank_b = #{j : l_bj > l_b,label} + #{j < label : l_bj == l_b,label}

(ties: the lower class id ranks first, like ``argmax``), and the label is in
the top k when rank_b < k. Each rank counts over its own columns (its shard
of classes) and one all_reduce (SUM) of the B counts gives the global rank;
the label's own logit is known on every rank beforehand (the classifier's
loss message carries it).
"""
import numpy as np

from refimpl.backend import get_array_module, to_numpy
from refimpl.parallel.sharding import row_blocks
from refimpl.threads import parallel_map


def topk_accuracy(logits, l_label, labels, lo, topk, comm, block):
    """{k: fraction of the B rows whose label is in the top k}, over all shards.

    logits   (B, N_r) this rank's logits (classes [lo, lo + N_r))
    l_label  (B,) the logit of each row's label (from whichever rank owns it)
    labels   (B,) host int, the label of each row
    topk     iterable of k; comm: the communicator; block: classes per block
    One all_reduce of B values.
    """
    xp = get_array_module(logits)
    label_d = xp.asarray(labels)[:, None]                            # (B, 1)
    l_label = l_label[:, None]                                       # (B, 1)

    def count_block(ab):
        a, c = ab
        L = logits[:, a:c]                                           # (B, c-a)
        before = xp.arange(lo + a, lo + c) < label_d                 # (B, c-a) lower ids
        return xp.sum((L > l_label) | ((L == l_label) & before), axis=1)

    counts = sum(parallel_map(count_block, row_blocks(logits.shape[1], block)))
    rank = to_numpy(comm.all_reduce(counts.astype(logits.dtype), "sum"))  # (B,)
    return {int(k): float(np.mean(rank < k)) for k in topk}
