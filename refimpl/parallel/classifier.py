"""The N-way cosine classifier, its rows sharded over the ranks (model parallel).

Contract. ``cosine_softmax_forward`` / ``cosine_softmax_backward`` compute the
loss of DESIGN.md's step table, rows 2 to 7, for one rank's shard W_r of the
classifier weight W (N x D):

    z_hat = z / ||z||,  w_hat_j = w_j / ||w_j||        (norms clamped at 1e-12)
    logit_bj = <z_hat_b, w_hat_j> / tau                 for the B global rows b
    loss = (1 / B) sum_b [ log sum_j exp(logit_bj) - sum_j y_bj logit_bj ]

with y_b = one-hot(label_b), or with smoothing (alpha > 0, a neighbour table
NK of K classes per instance)

    y_b = (1 - alpha) e_label + (alpha / K) sum_{j in NK(label)} e_j.

Equal to ``F.cross_entropy(F.normalize(z) @ F.normalize(W).T / tau, y)`` on
the gathered batch and the whole W, but no rank ever holds W, the B x N
logits, or more than one B x N_r buffer.

Sharding rule: rank r of P owns rows ``[floor(r N / P), floor((r+1) N / P))``
(``shard_range``); uneven shards are normal.

One forward + backward, per rank (b = B / P local rows, fp32 bytes):

    2  all_gather z_hat (b, D) -> Z (B, D), labels (b,) -> Y (B,)   B*D*4 + B*8
    3  local logits against W_r, (B, N_r), block by block
    4  all_reduce max of the row maxima                              B*4
    5  all_reduce sum of [sum exp(logit - max), target logit]        2*B*4
    6  dlogits = (softmax - y) / B, block by block;
       dW_r local; dZ_r = dlogits W_hat_r / tau (a partial sum)
    7  reduce_scatter dZ (B, D) -> this rank's (b, D)                B*D*4

(top-k accuracy, when asked for, adds one all_reduce of B or 2B values.)

Layout and memory. The logits (B, N_r) are the only buffer of that size.
They are made and used one block of ``block`` classes at a time: each block
is computed into a small contiguous (B, block) array, reduced along its rows
while it is in cache, and copied into its columns of the big buffer; backward
reads a block back into a small array and turns it into its gradient there.
The big buffer is written once and read once, and is not modified by
backward. The normalized rows W_hat are recomputed block by block in
backward instead of being kept (an N_r x D array saved). The row maxima and
sums of exp are combined over blocks like an online softmax:
s = sum_k s_k exp(m_k - m). Blocks run on ``backend.get_num_threads()``
threads; their partial results are combined in block order, so the bits do
not depend on the thread count. (Reductions run along the contiguous axis:
on a GPU a reduction over the strided axis of a (65536, 1024) block took
1.6 ms against 0.12 ms, measured on an H100.)
"""
import numpy as np

from refimpl.backend import (asarray, get_array_module, parallel_map, resolve_dtype,
                             rng as make_rng, scatter_add, to_numpy)
from refimpl.layers.normalize import l2_normalize_backward, l2_normalize_forward

# Classes per block. CPU: (256, 4096) float32 logits = 4 MiB, about a cache's
# worth. GPU: large blocks, since each block costs ~25 kernel launches.
BLOCK = {"cpu": 4096, "gpu": 65536}


def shard_range(num_classes, size, rank):
    """Rows [lo, hi) of the N x D weight that rank ``rank`` of ``size`` owns."""
    num_classes, size, rank = int(num_classes), int(size), int(rank)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"shard_range: rank {rank} is not in a world of size {size}")
    if num_classes < size:
        raise ValueError(f"the classifier has N = {num_classes} classes for {size} ranks: "
                         f"every rank needs at least one row (N >= P)")
    return rank * num_classes // size, (rank + 1) * num_classes // size


def target_entries(labels, num_classes, neighbours=None, alpha=0.0):
    """The non-zero entries of the targets y, as (ids (B, T), weights (B, T)).

    labels      (B,) int, global instance ids in [0, N)
    neighbours  None, or (N, K) int: NK(i), the K classes nearest to class i
    alpha       smoothing weight in [0, 1); 0 (or no table) gives one-hot targets
    One-hot: T = 1, weight 1. Smoothed: T = K + 1, weights (1 - alpha) then
    alpha / K each. Host arrays (NumPy): they are tiny.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} "
                         f"of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (the instance ids), "
                         f"got values in [{labels.min()}, {labels.max()}]")
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
    ids = labels.astype(np.int64).reshape(-1, 1)                    # (B, 1)
    if neighbours is None or alpha == 0:
        return ids, np.ones(ids.shape)
    neighbours = np.asarray(neighbours)
    if neighbours.ndim != 2 or neighbours.shape[0] != num_classes or neighbours.shape[1] < 1:
        raise ValueError(f"neighbours must have shape ({num_classes}, K) with K >= 1, "
                         f"got {neighbours.shape}")
    K = neighbours.shape[1]
    near = neighbours[labels]                                       # (B, K), the rows used
    if near.dtype.kind not in "iu" or near.min() < 0 or near.max() >= num_classes:
        raise ValueError(f"neighbours must hold integer class ids in [0, {num_classes}), "
                         f"got {near.dtype} values in [{near.min()}, {near.max()}]")
    if np.any(near == labels[:, None]):
        b = int(np.nonzero(np.any(near == labels[:, None], axis=1))[0][0])
        raise ValueError(f"neighbours of class {labels[b]} include the class itself: "
                         f"NK(i) holds K classes j != i")
    ids = np.concatenate([ids, near.astype(np.int64)], axis=1)      # (B, K+1)
    weights = np.empty(ids.shape)
    weights[:, 0] = 1 - alpha
    weights[:, 1:] = alpha / K
    return ids, weights


def _blocks(n, block):
    return [(a, min(a + block, n)) for a in range(0, n, block)]


def _block_size(block, x):
    """block, or the default for x's device (BLOCK)."""
    if block is None:
        return BLOCK["cpu" if get_array_module(x) is np else "gpu"]
    if int(block) != block or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    return int(block)


def cosine_softmax_forward(z, labels, w, comm, num_classes, tau=0.15, neighbours=None,
                           alpha=0.0, topk=None, block=None, workspace=None):
    """Sharded cosine-softmax cross-entropy: forward (step table rows 2-5).

    Inputs (this rank):
      z            (b, D) unnormalized features of the local batch
      labels       (b,) int, global instance ids of the local batch
      w            (N_r, D) this rank's shard of W (``shard_range``)
      comm         communicator (``SelfComm`` or ``MPIComm``)
      num_classes  N
      tau          temperature > 0
      neighbours, alpha  smoothed targets (``target_entries``); host arrays
      topk         None, or a tuple like (1, 5): also return the fraction of the
                   global batch whose label ranks in the top k (ties: the lower
                   class id ranks first, like argmax)
      block        classes per block (None: BLOCK of z's device; any value gives
                   the same loss up to rounding)
      workspace    None, or a (B, N_r) array of z's dtype to hold the logits
                   (reused across steps: a fresh 1.3 GB buffer per step costs
                   its page faults every time)
    Outputs (identical on every rank):
      loss    0-d array, the mean over the global batch B
      acc     {} or {k: fraction} for topk (host floats)
      cache   for cosine_softmax_backward
    """
    xp = get_array_module(z)
    P, r = comm.size, comm.rank
    lo, hi = shard_range(num_classes, P, r)
    if z.ndim != 2 or w.ndim != 2 or z.shape[1] != w.shape[1]:
        raise ValueError(f"z (b, D) and w (N_r, D) must share D, got {z.shape} and {w.shape}")
    if w.shape[0] != hi - lo:
        raise ValueError(f"rank {r} of {P} owns rows [{lo}, {hi}) of N = {num_classes}: "
                         f"w must have {hi - lo} rows, got {w.shape[0]}")
    if labels.shape != (z.shape[0],) or np.dtype(labels.dtype).kind not in "iu":
        raise ValueError(f"labels must be integer instance ids of shape ({z.shape[0]},), "
                         f"got {labels.dtype} of shape {labels.shape}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    block = _block_size(block, z)

    # 1 (end): normalize the local features.
    zhat, zcache = l2_normalize_forward(z)                           # (b, D)
    # 2: every rank needs every feature and label.
    Z = comm.all_gather(zhat)                                        # (B, D)
    Y = comm.all_gather(xp.asarray(labels, dtype=xp.int64))          # (B,)
    B = Z.shape[0]
    # Checked after the gather, so every rank raises the same error together.
    ids, weights = target_entries(to_numpy(Y), num_classes, neighbours, alpha)
    # The target entries that fall in this shard, sorted by class (for block
    # lookups): t_rows indexes the global batch, t_cols the shard's classes.
    b_idx = np.broadcast_to(np.arange(B)[:, None], ids.shape)
    mine = (ids >= lo) & (ids < hi)
    order = np.argsort(ids[mine], kind="stable")
    t_cols = (ids[mine] - lo)[order]                                 # classes in the shard
    t_rows, t_wts = b_idx[mine][order], weights[mine][order]

    # 3: local logits (B, N_r), one block of classes at a time.
    Zt = Z * (1.0 / tau)                                             # (B, D): 1/tau folded in once
    logits = workspace                                               # the one B x N_r buffer
    if logits is None or logits.shape != (B, hi - lo) or logits.dtype != z.dtype:
        logits = xp.empty((B, hi - lo), dtype=z.dtype)

    def forward_block(ab):
        a, c = ab
        what, _ = l2_normalize_forward(w[a:c])                       # (c-a, D)
        L = Zt @ what.T                                              # (B, c-a) logits, / tau
        logits[:, a:c] = L
        m = xp.max(L, axis=1)                                        # (B,) block max
        s = xp.sum(xp.exp(L - m[:, None]), axis=1)                   # (B,) sum exp(l - m)
        return m, s

    parts = parallel_map(forward_block, _blocks(hi - lo, block))
    m_loc = parts[0][0]
    for m, _ in parts[1:]:
        m_loc = xp.maximum(m_loc, m)
    s_loc = sum(s * xp.exp(m - m_loc) for m, s in parts)             # (B,), in block order

    # 4: the global row max, the shift that keeps every exp <= 1.
    M = comm.all_reduce(m_loc, "max")                                # (B,)
    # 5: sum of exp over all shards, and the target logit sum_j y_bj l_bj.
    rows_d, cols_d = xp.asarray(t_rows), xp.asarray(t_cols)
    t_loc = xp.zeros(B, dtype=z.dtype)
    scatter_add(t_loc, rows_d, xp.asarray(t_wts, dtype=z.dtype) * logits[rows_d, cols_d])
    msg = [s_loc * xp.exp(m_loc - M), t_loc]
    smoothed = ids.shape[1] > 1
    want_acc = bool(topk)
    if want_acc and smoothed:
        # Accuracy needs the label's own logit; with one-hot targets it is t.
        label_own = (ids[:, 0] >= lo) & (ids[:, 0] < hi)
        l_loc = xp.zeros(B, dtype=z.dtype)
        own_b = xp.asarray(np.nonzero(label_own)[0])
        l_loc[own_b] = logits[own_b, xp.asarray(ids[label_own, 0] - lo)]
        msg.append(l_loc)
    total = comm.all_reduce(xp.concatenate(msg), "sum")              # (2B,) or (3B,)
    S, T = total[:B], total[B:2 * B]
    # log softmax of the target: sum_j y_j (l_j - M - log S) = T - M - log S.
    loss = xp.mean(M + xp.log(S) - T)

    acc = {}
    if want_acc:
        l_label = total[2 * B:] if smoothed else T                   # (B,)
        acc = _topk_accuracy(logits, l_label, ids[:, 0], lo, topk, comm, block)

    cache = {"logits": logits, "M": M, "S": S, "Zt": Zt, "w": w, "zcache": zcache,
             "targets": (t_rows, t_cols, t_wts), "tau": tau, "block": block, "comm": comm}
    return xp.asarray(loss, dtype=z.dtype), acc, cache


def _topk_accuracy(logits, l_label, labels, lo, topk, comm, block):
    """{k: fraction of the B rows whose label is in the top k}, over all shards.

    The label's rank = #{j : l_j > l_label} + #{j < label : l_j == l_label},
    counted per shard and summed (one all_reduce of B counts).
    """
    xp = get_array_module(logits)
    label_d = xp.asarray(labels)[:, None]                            # (B, 1)
    l_label = l_label[:, None]                                       # (B, 1)

    def count_block(ab):
        a, c = ab
        L = logits[:, a:c]                                           # (B, c-a)
        before = xp.arange(lo + a, lo + c) < label_d                 # (B, c-a) lower ids
        return xp.sum((L > l_label) | ((L == l_label) & before), axis=1)

    counts = sum(parallel_map(count_block, _blocks(logits.shape[1], block)))
    rank = to_numpy(comm.all_reduce(counts.astype(logits.dtype), "sum"))  # (B,)
    return {int(k): float(np.mean(rank < k)) for k in topk}


def cosine_softmax_backward(cache, dw_out=None):
    """Gradients of cosine_softmax_forward (step table rows 6-7), for dout = 1.

    Inputs:  cache from forward (not modified); dw_out: None or an (N_r, D)
             array to write dW_r into.
    Outputs: dz (b, D), the gradient of this rank's local features;
             dw (N_r, D), the gradient of this rank's shard.

      dlogits_bj = (softmax_bj - y_bj) / B                    (local block)
      dW_hat_r   = dlogits_r^T Z_hat / tau,  dW_r = normalize backward
      dZ_hat     = reduce_scatter( sum over shards of dlogits_r W_hat_r / tau )
      dz         = normalize backward of dZ_hat
    Gradient scale: this is the gradient of the *global* mean loss; summing
    the replicated parameters' gradients over ranks (never averaging) gives
    the 1-rank gradient.
    """
    logits, M, S, Zt, w = (cache[k] for k in ("logits", "M", "S", "Zt", "w"))
    xp = get_array_module(logits)
    dw = xp.empty_like(w) if dw_out is None else dw_out
    if dw.shape != w.shape or dw.dtype != w.dtype:
        raise ValueError(f"dw_out must be {w.dtype} of shape {w.shape}, "
                         f"got {dw.dtype} of shape {dw.shape}")
    B = logits.shape[0]
    inv_tau = 1.0 / cache["tau"]
    t_rows, t_cols, t_wts = cache["targets"]
    M = M[:, None]                                                   # (B, 1)
    inv_SB = (1.0 / (S * B))[:, None]                                # (B, 1)

    def backward_block(ab):
        a, c = ab
        D = logits[:, a:c] - M                                       # (B, c-a), a new array:
        xp.exp(D, out=D)                                             # exp(l - M) ->
        D *= inv_SB                                                  # softmax / B
        i, j = np.searchsorted(t_cols, [a, c])                       # targets in this block
        if j > i:
            scatter_add(D, (xp.asarray(t_rows[i:j]), xp.asarray(t_cols[i:j] - a)),
                        xp.asarray(-t_wts[i:j] / B, dtype=D.dtype))  # - y / B
        # W_hat recomputed here rather than kept from forward: N_r x D saved.
        what, wcache = l2_normalize_forward(w[a:c])                  # (c-a, D)
        dwhat = D.T @ Zt                                             # (c-a, D): Z_hat / tau
        dw[a:c] = l2_normalize_backward(dwhat, wcache)
        return D @ what                                              # (B, D) partial dZ_hat * tau

    parts = parallel_map(backward_block, _blocks(logits.shape[1], cache["block"]))
    dZ = parts[0]
    for p in parts[1:]:
        dZ += p                                                      # block order: same bits
    dZ *= inv_tau                                                    # (B, D), this shard's part
    # 7: the adjoint of step 2's all_gather.
    dzhat = cache["comm"].reduce_scatter(dZ)                        # (b, D)
    dz = l2_normalize_backward(dzhat, cache["zcache"])               # (b, D)
    return dz, dw




INIT_BLOCK = 65536  # rows per random stream of the initial weight


def init_shard(num_classes, dim, lo, hi, seed=0, dtype=np.float64):
    """Rows [lo, hi) of the initial N x D weight, the same for every P.

    nn.Linear's default (no bias): uniform(-1/sqrt(D), 1/sqrt(D)). The full
    matrix is drawn in blocks of INIT_BLOCK rows, block k from
    ``rng(seed, "init", 2, k)``, so a rank draws only the blocks its rows
    touch and every world size sees the same W. (The contrastive prior
    overwrites these rows before training.) Drawn in float64, stored as
    ``dtype`` block by block (no full-size float64 temporary).
    """
    bound = 1.0 / np.sqrt(dim)
    out = np.empty((hi - lo, dim), dtype=dtype)
    for k in range(lo // INIT_BLOCK, (hi - 1) // INIT_BLOCK + 1 if hi > lo else 0):
        a, c = k * INIT_BLOCK, min((k + 1) * INIT_BLOCK, num_classes)
        rows = make_rng(seed, "init", 2, k).uniform(-bound, bound, (c - a, dim))
        s, e = max(a, lo), min(c, hi)
        out[s - lo:e - lo] = rows[s - a:e - a]
    return out


class CosineClassifier:
    """This rank's shard of the N-way cosine classifier, and its gradient.

    Attributes:
      weight  (N_r, D) rows [lo, hi) of W (``shard_range``), on the device
      grad    (N_r, D) written (not accumulated) by each ``backward``
      lo, hi  the global rows this rank owns

    The optimizer of the shard is the caller's, e.g.
    ``SGD(clf.weight.ravel(), clf.grad.ravel(), ...)``: W_r is local, nothing
    about it is communicated.
    """

    def __init__(self, num_classes, dim, comm, tau=0.15, dtype=None, device=None, seed=0,
                 block=None):
        from refimpl.backend import xp_for
        self.num_classes, self.dim, self.comm = int(num_classes), int(dim), comm
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau, self.block = tau, block
        self.lo, self.hi = shard_range(num_classes, comm.size, comm.rank)
        dtype = resolve_dtype(dtype)
        self.weight = asarray(init_shard(num_classes, dim, self.lo, self.hi, seed, dtype),
                              device=device)
        self.grad = xp_for(device).zeros_like(self.weight)
        self.workspace = None  # the (B, N_r) logits buffer, kept across steps

    def forward(self, z, labels, neighbours=None, alpha=0.0, topk=None):
        """Local z (b, D), labels (b,) -> (loss, acc); see cosine_softmax_forward."""
        loss, acc, self.cache = cosine_softmax_forward(
            z, labels, self.weight, self.comm, self.num_classes, self.tau,
            neighbours, alpha, topk, self.block, self.workspace)
        self.workspace = self.cache["logits"]
        return loss, acc

    def backward(self):
        """-> dz (b, D); writes this shard's gradient into ``self.grad``."""
        dz, _ = cosine_softmax_backward(self.cache, dw_out=self.grad)
        self.cache = None
        return dz
