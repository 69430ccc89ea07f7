"""The N-way cosine classifier, its rows sharded over the ranks (model parallel).

Contract. ``cosine_softmax_forward`` / ``cosine_softmax_backward`` compute the
loss of docs/design.md's step table, rows 2 to 7, for one rank's shard W_r of the
classifier weight W (N x D):

    z_hat = z / ||z||,  w_hat_j = w_j / ||w_j||        (norms clamped at 1e-12)
    logit_bj = <z_hat_b, w_hat_j> / tau                 for the B global rows b
    loss = (1 / B) sum_b [ log sum_j exp(logit_bj) - sum_j y_bj logit_bj ]

with y_b = one-hot(label_b) by default, or any sparse target rows
``targets = (ids (B, T), weights (B, T))`` for the global batch, the label
first (``method.targets.target_entries`` makes the smoothed labels of the
hardest classes). Equal to
``F.cross_entropy(F.normalize(z) @ F.normalize(W).T / tau, y)`` on the
gathered batch and the whole W, but no rank ever holds W, the B x N logits,
or more than one B x N_r buffer. The rows a rank owns follow
``sharding.shard_range``. ``refimpl/oracle/dense.py`` is the readable
reference of the same computation (the whole B x N logits in one process);
the tests compare the two on P = 1 to 4 ranks.

One forward + backward, per rank (b = B / P local rows, fp32 bytes):

    2  all_gather z_hat (b, D) -> Z (B, D), labels (b,) -> Y (B,)   B*D*4 + B*8
    3  local logits against W_r, (B, N_r), block by block; kept as
       E = exp(logit - m_k), m_k the block's row maxima
    4  all_reduce max of the row maxima                              B*4
    5  all_reduce sum of [sum exp(logit - max), target logit]        2*B*4
    6  dlogits = (softmax - y) / B = E exp(m_k - M) / (B S) - y / B,
       block by block; dW_r local; dZ_r = dlogits W_hat_r / tau (a partial sum)
    7  reduce_scatter dZ (B, D) -> this rank's (b, D)                B*D*4

Top-k accuracy, when asked for, adds one all_reduce of B guesses of the
labels' logits before step 3 and one of B counts after step 5 (``topk.py``:
each block is counted while its logits exist), and with targets of more
than one entry the label's own logit rides in the SUM message of row 5 (B
more values).

Layout and memory. The buffer E (B, N_r) is the only one of that size. It
is made one block of ``block`` classes at a time: each block's logits are
computed into a small contiguous (B, block) array; while it is in cache its
row maxima m_k, the target logits and the top-k candidates are read from it,
and exp(logit - m_k) is written into the block's columns of E and summed
along its rows. E, not the logits, is kept because backward then needs one
multiply per element instead of an exp: softmax = E exp(m_k - M) / S, with
one exp per block and row. (An exp costs about ten multiplies, and a second
exp pass over B x N_r is a large share of the step: docs/benchmarks.md.)
E is written once and read once, and is not modified by backward. The
normalized rows W_hat are recomputed block by block in backward instead of
being kept (an N_r x D array saved). The row maxima and sums of exp are
combined over blocks like an online softmax: s = sum_k s_k exp(m_k - m).
Blocks run on ``threads.get_num_threads()`` threads (on a GPU one after
another in the calling thread); their partial results are combined in block
order, so the bits do not depend on the thread count.
(Reductions run along the contiguous axis: on a GPU a reduction over the
strided axis of a large block is many times slower.)

Reused block buffers (CPU). Written as above, every block allocates about ten
temporaries (the block's logits, their exp, W_hat, its gradient and the
normalization's products), each up to a few MiB, in each of some 300 blocks
per step at N_r = 1.28M; the allocator hands them back to the kernel and
faults them in again, and that system time is a large share of the step
(docs/benchmarks.md). On NumPy each thread therefore computes its blocks in
buffers of its own, made once and reused every step (``_buffers``: one
(B, block) array for the logits and two (block, D) ones for W_hat and a
temporary, per thread), with the same operations in the same order:
``_forward_block_into`` / ``_backward_block_into`` give the same bits as the
readable ``_forward_block`` / ``_backward_block``, which the GPU runs and the
tests compare them with (``REUSE_BUFFERS = False`` selects them on the CPU
too). The blocks' (B, D) parts of dZ are added in block order as they come
(``threads.parallel_sum``), not all held: at N_r = 1.28M there are some 300
of them.
"""
import threading

import numpy as np

from refimpl.backend import (asarray, get_array_module, resolve_dtype, scatter_add, to_numpy,
                             xp_for)
from refimpl.checks import check_int
from refimpl.layers.normalize import l2_normalize_backward, l2_normalize_forward
from refimpl.parallel.agreement import check_agree
from refimpl.parallel.sharding import init_shard, row_blocks, shard_range
from refimpl.parallel.topk import (label_logit_guess, label_logit_slack, topk_accuracy,
                                   topk_candidates)
from refimpl.threads import parallel_map, parallel_sum

# Classes per block. CPU: (256, 4096) float32 logits = 4 MiB, about a cache's
# worth. GPU: large blocks, since each block costs ~25 kernel launches.
BLOCK = {"cpu": 4096, "gpu": 65536}
# NumPy: compute blocks in per-thread buffers reused across steps (see above).
REUSE_BUFFERS = True
_thread_buffers = threading.local()


def _block_size(block, x):
    """block, or the default for x's device (BLOCK)."""
    if block is None:
        return BLOCK["cpu" if get_array_module(x) is np else "gpu"]
    return check_int("block", block)


def check_targets(targets, labels, num_classes):
    """Validated sparse targets (ids (B, T) int64, weights (B, T) float64), host arrays.

    targets: None (one-hot: ids = labels, weights 1) or (ids, weights) for
    the B rows of the global batch: ids[:, 0] must be the labels (the
    instance's own class first), every id in [0, N), weights >= 0 with rows
    summing to 1.
    """
    labels = np.asarray(labels, dtype=np.int64)
    B = labels.shape[0]
    if targets is None:
        return labels.reshape(-1, 1), np.ones((B, 1))
    ids, weights = np.asarray(targets[0]), np.asarray(targets[1], dtype=np.float64)
    if ids.ndim != 2 or ids.shape[0] != B or ids.shape[1] < 1 or weights.shape != ids.shape:
        raise ValueError(f"targets must be (ids, weights), both of shape ({B}, T) for the "
                         f"global batch of {B}, got {ids.shape} and {weights.shape}")
    if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= num_classes:
        raise ValueError(f"target ids must be integer class ids in [0, {num_classes}), got "
                         f"{ids.dtype} values in [{ids.min()}, {ids.max()}]")
    if not np.array_equal(ids[:, 0], labels):
        b = int(np.nonzero(ids[:, 0] != labels)[0][0])
        raise ValueError(f"target ids[:, 0] must be the labels (the own class first): row {b} "
                         f"has {ids[b, 0]}, its label is {labels[b]}")
    if not (np.all(weights >= 0) and np.all(np.abs(weights.sum(axis=1) - 1) <= 1e-8)):
        raise ValueError("target weights must be non-negative with rows summing to 1")
    return ids.astype(np.int64), weights


def _forward_block(Zt, w, E, a, c, inspect):
    """Classes [a, c) of the shard: -> (row max m, sum exp(l - m), inspect's result).

    Zt (B, D) = Z_hat / tau; w (N_r, D) the shard; E (B, N_r) the buffer,
    whose columns [a, c) get exp(l - m) (m: this block's row maxima).
    inspect(L, a, c) reads the block's logits L (B, c - a) before they are
    gone: the target logits, the top-k candidates.
    """
    xp = get_array_module(w)
    what, _ = l2_normalize_forward(w[a:c])                           # (c-a, D)
    L = Zt @ what.T                                                  # (B, c-a) logits, / tau
    m = xp.max(L, axis=1)                                            # (B,) block max
    seen = inspect(L, a, c)
    ex = xp.exp(L - m[:, None])                                      # (B, c-a) exp(l - m)
    E[:, a:c] = ex
    return m, xp.sum(ex, axis=1), seen


def _backward_block(E, g, targets, Zt, w, dw, a, c):
    """Classes [a, c): write dW rows [a, c) into dw; -> this block's part of dZ_hat * tau.

    g (B, 1) = exp(m - M) dout / (B S), the block's row maxima m against the
    global M: E g = dout softmax / B. targets: the (rows, cols - a,
    -dout y / B) entries in this block.
    """
    dL = E[:, a:c] * g                                               # (B, c-a) dout softmax / B
    if targets[0].size:
        scatter_add(dL, targets[:2], targets[2])                     # - dout y / B
    # W_hat recomputed here rather than kept from forward: N_r x D saved.
    what, wcache = l2_normalize_forward(w[a:c])                      # (c-a, D)
    dwhat = dL.T @ Zt                                                # (c-a, D): Z_hat / tau
    dw[a:c] = l2_normalize_backward(dwhat, wcache)
    return dL @ what                                                 # (B, D) partial dZ_hat * tau


def _block_entries(t_cols, a, c):
    """The slice of the target entries (sorted by class) whose class is in [a, c)."""
    i, j = np.searchsorted(t_cols, [a, c])
    return slice(int(i), int(j))


def _reuse_buffers(xp):
    return REUSE_BUFFERS and xp is np


def _buffers(B, n, D, dtype):
    """This thread's reusable arrays for a block of n classes, as contiguous
    views: L (B, n), what, tmp (n, D), norm, denom (n, 1). Made anew only
    when B, D or the dtype change or a block is larger than any before."""
    key = (B, D, np.dtype(dtype))
    bufs = getattr(_thread_buffers, "arrays", None)
    if bufs is None or bufs[0] != key or bufs[1] < n:
        bufs = (key, n, {"L": np.empty(B * n, dtype),
                         **{k: np.empty(n * D, dtype) for k in ("what", "tmp")},
                         **{k: np.empty(n, dtype) for k in ("norm", "denom")}})
        _thread_buffers.arrays = bufs
    flat = bufs[2]
    view = {k: flat[k][:n * D].reshape(n, D) for k in ("what", "tmp")}
    view["L"] = flat["L"][:B * n].reshape(B, n)
    view.update({k: flat[k][:n].reshape(n, 1) for k in ("norm", "denom")})
    return view


def _normalize_into(x, buf, eps=1e-12):
    """l2_normalize_forward(x) computed in buf's arrays (the same operations,
    so the same bits); -> (what, denom, unclamped)."""
    np.multiply(x, x, out=buf["tmp"])
    np.sum(buf["tmp"], axis=-1, keepdims=True, out=buf["norm"])
    np.sqrt(buf["norm"], out=buf["norm"])
    unclamped = buf["norm"] >= eps
    np.maximum(buf["norm"], eps, out=buf["denom"])
    np.divide(x, buf["denom"], out=buf["what"])
    return buf["what"], buf["denom"], unclamped


def _forward_block_into(Zt, w, E, a, c, inspect):
    """``_forward_block`` in this thread's reused buffers (NumPy only); the
    exponentials are written straight into E's columns."""
    buf = _buffers(Zt.shape[0], c - a, w.shape[1], w.dtype)
    what, _, _ = _normalize_into(w[a:c], buf)
    L = np.matmul(Zt, what.T, out=buf["L"])                          # (B, c-a) logits, / tau
    m = np.max(L, axis=1)
    seen = inspect(L, a, c)
    np.subtract(L, m[:, None], out=L)
    ex = np.exp(L, out=E[:, a:c])
    return m, np.sum(ex, axis=1), seen


def _backward_block_into(E, g, targets, Zt, w, dw, a, c):
    """``_backward_block`` in this thread's reused buffers (NumPy only); dW_hat
    is formed in dw's rows and turned into dW there."""
    buf = _buffers(Zt.shape[0], c - a, w.shape[1], w.dtype)
    dL = np.multiply(E[:, a:c], g, out=buf["L"])
    if targets[0].size:
        scatter_add(dL, targets[:2], targets[2])
    what, denom, unclamped = _normalize_into(w[a:c], buf)
    dZ = dL @ what
    dwhat = np.matmul(dL.T, Zt, out=dw[a:c])                         # (c-a, D)
    # l2_normalize_backward: (dwhat - what <dwhat, what>) / denom
    np.multiply(dwhat, what, out=buf["tmp"])
    dot = np.sum(buf["tmp"], axis=-1, keepdims=True) * unclamped
    np.multiply(what, dot, out=buf["tmp"])
    np.subtract(dwhat, buf["tmp"], out=buf["tmp"])
    np.divide(buf["tmp"], denom, out=dw[a:c])
    return dZ


def cosine_softmax_forward(z, labels, w, comm, num_classes, tau=0.15, targets=None,
                           topk=None, block=None, workspace=None):
    """Sharded cosine-softmax cross-entropy: forward (step table rows 2-5).

    Inputs (this rank):
      z            (b, D) unnormalized features of the local batch
      labels       (b,) int, global instance ids of the local batch
      w            (N_r, D) this rank's shard of W (``shard_range``)
      comm         communicator (``SelfComm`` or ``MPIComm``)
      num_classes  N
      tau          temperature > 0
      targets      None (one-hot) or sparse target rows (ids (B, T), weights
                   (B, T)) of the GLOBAL batch, host arrays, the label first
                   (``check_targets``; ``method.targets.target_entries``)
      topk         None, or a tuple like (1, 5): also return the fraction of the
                   global batch whose label ranks in the top k (ties: the lower
                   class id ranks first, like argmax)
      block        classes per block (None: BLOCK of z's device; any value gives
                   the same loss up to rounding)
      workspace    None, or a (B, N_r) array of z's dtype for the buffer E
                   (reused across steps: a fresh buffer, 1.3 GB at B = 256
                   and N_r = 1.28M in float32, costs its page faults every
                   time)
    Outputs (identical on every rank):
      loss    0-d array, the mean over the global batch B
      acc     {} or {k: fraction} for topk (host floats)
      cache   for cosine_softmax_backward: "E" (B, N_r) = exp(l - m_k) with
              "m_blocks" (n_blocks, B) the row maxima m_k of each block k
              of classes, "M" and "S" the global row maxima and sums of
              exp(l - M) of the B rows (log-sum-exp = M + log S);
              ``shard_softmax(cache)`` gives the probabilities
    """
    xp = get_array_module(z)
    P, r = comm.size, comm.rank
    lo, hi = shard_range(num_classes, P, r)
    if z.ndim != 2 or w.ndim != 2 or z.shape[1] != w.shape[1]:
        raise ValueError(f"z (b, D) and w (N_r, D) must share D, got {z.shape} and {w.shape}")
    if w.shape[0] != hi - lo:
        raise ValueError(f"rank {r} of {P} owns rows [{lo}, {hi}) of N = {num_classes}: "
                         f"w must have {hi - lo} rows, got {w.shape[0]}")
    if w.dtype != z.dtype:
        raise ValueError(f"z and w must have one dtype, got {z.dtype} and {w.dtype}")
    if labels.shape != (z.shape[0],) or np.dtype(labels.dtype).kind not in "iu":
        raise ValueError(f"labels must be integer instance ids of shape ({z.shape[0]},), "
                         f"got {labels.dtype} of shape {labels.shape}")
    if not 0 < tau < float("inf"):
        raise ValueError(f"tau must be > 0 and finite, got {tau}")
    block = _block_size(block, z)

    # 1 (end): normalize the local features.
    zhat, zcache = l2_normalize_forward(z)                           # (b, D)
    # 2: every rank needs every feature and label.
    Z = comm.all_gather(zhat)                                        # (B, D), shapes checked
    Y = to_numpy(comm.all_gather(xp.asarray(labels, dtype=xp.int64), check=False))  # (B,)
    B = Z.shape[0]
    # Checked after the gather, so every rank raises the same error together.
    if Y.min() < 0 or Y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) (the instance ids), "
                         f"got values in [{Y.min()}, {Y.max()}]")
    ids, weights = check_targets(targets, Y, num_classes)
    # The target entries that fall in this shard, sorted by class (for block
    # lookups): t_rows indexes the global batch, t_cols the shard's classes;
    # t_own marks the labels' own entries (ids[:, 0]).
    b_idx = np.broadcast_to(np.arange(B)[:, None], ids.shape)
    own = np.broadcast_to(np.arange(ids.shape[1]) == 0, ids.shape)
    mine = (ids >= lo) & (ids < hi)
    order = np.argsort(ids[mine], kind="stable")
    t_cols = (ids[mine] - lo)[order]                                 # classes in the shard
    t_rows, t_wts, t_own = b_idx[mine][order], weights[mine][order], own[mine][order]

    Zt = Z * (1.0 / tau)                                             # (B, D): 1/tau folded in once
    want_acc = bool(topk)
    if want_acc:
        # 2b (top-k only): every rank needs the labels' logits to pick its
        # candidates while each block is in cache (topk.py).
        guess = comm.all_reduce(label_logit_guess(Zt, w, Y, lo, hi), "sum")  # (B,)
        slack = label_logit_slack(Zt)                                # (B,)
        kmax = max(int(k) for k in topk)

    def inspect(L, a, c):
        """The block's target logits (in t_cols order) and top-k candidates."""
        e = _block_entries(t_cols, a, c)
        t = L[xp.asarray(t_rows[e]), xp.asarray(t_cols[e] - a)]
        return t, (topk_candidates(L, lo + a, guess, slack, kmax) if want_acc else None)

    # 3: this rank's classes, one block at a time: E = exp(l - m_k) (B, N_r).
    E = workspace                                                    # the one B x N_r buffer
    if E is None or E.shape != (B, hi - lo) or E.dtype != z.dtype:
        E = xp.empty((B, hi - lo), dtype=z.dtype)
    forward_block = (_forward_block_into if _reuse_buffers(xp) else _forward_block)
    parts = parallel_map(lambda ab: forward_block(Zt, w, E, *ab, inspect),
                         row_blocks(hi - lo, block), serial=xp is not np)
    m_blocks = xp.stack([m for m, _, _ in parts])                    # (n_blocks, B)
    m_loc = m_blocks.max(axis=0)                                     # (B,) this shard's max
    s_loc = sum(s * xp.exp(m - m_loc) for m, s, _ in parts)          # (B,), in block order
    t_logits = xp.concatenate([t for _, _, (t, _) in parts])         # (entries,) t_cols order

    # 4: the global row max, the shift that keeps every exp <= 1.
    M = comm.all_reduce(m_loc, "max")                                # (B,)
    # 5: sum of exp over all shards, and the target logit sum_j y_bj l_bj.
    rows_d = xp.asarray(t_rows)
    t_loc = xp.zeros(B, dtype=z.dtype)
    scatter_add(t_loc, rows_d, xp.asarray(t_wts, dtype=z.dtype) * t_logits)
    msg = [s_loc * xp.exp(m_loc - M), t_loc]
    smoothed = ids.shape[1] > 1
    if want_acc and smoothed:
        # Accuracy needs the label's own logit; with one-hot targets it is t.
        l_loc = xp.zeros(B, dtype=z.dtype)
        l_loc[rows_d[xp.asarray(t_own)]] = t_logits[xp.asarray(t_own)]
        msg.append(l_loc)
    total = comm.all_reduce(xp.concatenate(msg), "sum")              # (2B,) or (3B,)
    S, T = total[:B], total[B:2 * B]
    # log softmax of the target: sum_j y_j (l_j - M - log S) = T - M - log S.
    loss = xp.mean(M + xp.log(S) - T)

    acc = {}
    if want_acc:
        l_label = total[2 * B:] if smoothed else T                   # (B,)
        acc = topk_accuracy([cand for _, _, (_, cand) in parts], l_label, Y, topk, comm)

    cache = {"E": E, "m_blocks": m_blocks, "M": M, "S": S, "Zt": Zt, "w": w,
             "zcache": zcache, "targets": (t_rows, t_cols, t_wts), "tau": tau,
             "block": block, "comm": comm}
    return xp.asarray(loss, dtype=z.dtype), acc, cache


def shard_softmax(cache):
    """(B, N_r) this shard's columns of the softmax of the last forward's logits,
    exp(l_bj - M_b) / S_b, from its cache (a new array; for inspection)."""
    E, m_blocks = cache["E"], cache["m_blocks"]
    xp = get_array_module(E)
    scale = xp.exp(m_blocks - cache["M"]) / cache["S"]                # (n_blocks, B)
    p = xp.empty_like(E)
    for k, (a, c) in enumerate(row_blocks(E.shape[1], cache["block"])):
        p[:, a:c] = E[:, a:c] * scale[k][:, None]
    return p


def cosine_softmax_backward(dout, cache, dw_out=None):
    """Gradients of cosine_softmax_forward (step table rows 6-7).

    Inputs:  dout, the scalar upstream gradient of the loss (1.0 normally);
             cache from forward (not modified); dw_out: None or an (N_r, D)
             array to write dW_r into.
    Outputs: dz (b, D), the gradient of this rank's local features;
             dw (N_r, D), the gradient of this rank's shard.

      dlogits_bj = dout (softmax_bj - y_bj) / B               (local block)
                 = E_bj exp(m_k - M_b) dout / (B S_b) - dout y_bj / B
      dW_hat_r   = dlogits_r^T Z_hat / tau,  dW_r = normalize backward
      dZ_hat     = reduce_scatter( sum over shards of dlogits_r W_hat_r / tau )
      dz         = normalize backward of dZ_hat
    The softmax takes one multiply: forward's exp(l - m_k) is in E, and one
    exp per block and row rescales it to the global max.
    Gradient scale: this is the gradient of the *global* mean loss; summing
    the replicated parameters' gradients over ranks (never averaging) gives
    the 1-rank gradient.
    """
    E, m_blocks, M, S, Zt, w = (cache[k] for k in ("E", "m_blocks", "M", "S", "Zt", "w"))
    xp = get_array_module(E)
    if getattr(dout, "size", 1) != 1:
        raise ValueError(f"cosine_softmax_backward: dout must be a scalar, got shape "
                         f"{dout.shape}")
    dw = xp.empty_like(w) if dw_out is None else dw_out
    if dw.shape != w.shape or dw.dtype != w.dtype:
        raise ValueError(f"dw_out must be {w.dtype} of shape {w.shape}, "
                         f"got {dw.dtype} of shape {dw.shape}")
    B = E.shape[0]
    scale = float(to_numpy(dout)) / B                                # d loss / d (row term)
    inv_tau = 1.0 / cache["tau"]
    t_rows, t_cols, t_wts = cache["targets"]
    # g[k] (B, 1): block k's exp(l - m_k) -> dout softmax / B.
    g = (xp.exp(m_blocks - M) * (scale / S))[:, :, None]            # (n_blocks, B, 1)

    backward_block = (_backward_block_into if _reuse_buffers(xp) else _backward_block)

    def block_gradients(k_ab):
        k, (a, c) = k_ab
        e = _block_entries(t_cols, a, c)                             # targets in this block
        targets = (xp.asarray(t_rows[e]), xp.asarray(t_cols[e] - a),
                   xp.asarray(-t_wts[e] * scale, dtype=E.dtype))     # - dout y / B
        return backward_block(E, g[k], targets, Zt, w, dw, a, c)

    # Each block's (B, D) part is added as soon as it and those before it are
    # done (block order: the same bits on any number of threads).
    dZ = parallel_sum(block_gradients, enumerate(row_blocks(E.shape[1], cache["block"])),
                      serial=xp is not np)
    dZ *= inv_tau                                                    # (B, D), this shard's part
    # 7: the adjoint of step 2's all_gather.
    dzhat = cache["comm"].reduce_scatter(dZ)                        # (b, D)
    dz = l2_normalize_backward(dzhat, cache["zcache"])               # (b, D)
    return dz, dw


class CosineClassifier:
    """This rank's shard of the N-way cosine classifier, and its gradient.

    Collective to build: the ranks first check that they all bring the same
    N, D and tau (``agreement.check_agree``: one Allgather of 3 int64),
    else every rank raises ``DisagreementError`` (a ValueError) naming them.

    Attributes:
      weight  (N_r, D) rows [lo, hi) of W (``shard_range``), on the device
      grad    (N_r, D) written (not accumulated) by each ``backward``
      lo, hi  the global rows this rank owns
      cache   the last forward's cache, until ``backward`` or ``discard``

    The optimizer of the shard is the caller's, e.g.
    ``SGD(clf.weight.ravel(), clf.grad.ravel(), ...)``: W_r is local, nothing
    about it is communicated. ``write_rows`` and ``normalized_blocks`` are
    what the contrastive prior and the neighbour search use; both keep
    ``weight`` the same array (the optimizer holds a view of it).
    """

    def __init__(self, num_classes, dim, comm, tau=0.15, dtype=None, device=None, seed=0,
                 block=None):
        self.num_classes, self.dim, self.comm = int(num_classes), int(dim), comm
        if not 0 < tau < float("inf"):
            raise ValueError(f"tau must be > 0 and finite, got {tau}")
        self.tau, self.block = tau, block
        # every rank must shard the same W: with another N on one rank, rows
        # would belong to no rank (or two) and the loss would be silently wrong
        check_agree(comm, "CosineClassifier", [self.num_classes, self.dim,
                                               np.float64(tau).view(np.int64)],
                    lambda row: f"N = {row[0]}, D = {row[1]}, "
                                f"tau = {np.int64(row[2]).view(np.float64):g}",
                    "every rank must build the classifier with the same N (the training "
                    "set's size), D and tau")
        self.lo, self.hi = shard_range(num_classes, comm.size, comm.rank)
        dtype = resolve_dtype(dtype)
        self.weight = asarray(init_shard(num_classes, dim, self.lo, self.hi, seed, dtype),
                              device=device)
        self.grad = xp_for(device).zeros_like(self.weight)
        self.workspace = None  # the (B, N_r) buffer E of exp(l - m_k), kept across steps
        self.cache = None

    def forward(self, z, labels, targets=None, topk=None):
        """Local z (b, D), labels (b,) -> (loss, acc); see cosine_softmax_forward."""
        loss, acc, self.cache = cosine_softmax_forward(
            z, labels, self.weight, self.comm, self.num_classes, self.tau, targets, topk,
            self.block, self.workspace)
        self.workspace = self.cache["E"]
        return loss, acc

    def row_max(self):
        """(B,) max_j logit_bj of each row of the last forward's global batch."""
        return self.cache["M"]

    def logsumexp(self):
        """(B,) log sum_j exp(logit_bj) of each row of the last forward's global batch."""
        xp = get_array_module(self.cache["M"])
        return self.cache["M"] + xp.log(self.cache["S"])

    def backward(self, dout=1.0):
        """-> dz (b, D); writes this shard's gradient into ``self.grad``."""
        dz, _ = cosine_softmax_backward(dout, self.cache, dw_out=self.grad)
        self.cache = None
        return dz

    def discard(self):
        """Forget the last forward (a step that will not be taken): frees its cache."""
        self.cache = None

    def write_rows(self, ids, rows):
        """In place: W[ids] = rows, for global row ids this rank owns.

        ids: (n,) int, each in [lo, hi); rows: (n, D). Writes into
        ``weight`` itself (no new array), so views held elsewhere stay valid.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and (ids.min() < self.lo or ids.max() >= self.hi)):
            raise ValueError(f"write_rows: rank {self.comm.rank} owns rows [{self.lo}, "
                             f"{self.hi}); got ids in [{ids.min()}, {ids.max()}]")
        if rows.shape != (ids.shape[0], self.dim):
            raise ValueError(f"write_rows: rows must have shape ({ids.shape[0]}, {self.dim}), "
                             f"got {rows.shape}")
        xp = get_array_module(self.weight)
        self.weight[xp.asarray(ids - self.lo)] = xp.asarray(rows, dtype=self.weight.dtype)

    def normalized_blocks(self, block=None):
        """Yield (a, c, w_hat) for consecutive blocks of this rank's rows.

        a, c: GLOBAL row ids [a, c); w_hat (c - a, D): those rows of W,
        L2-normalized (a new array; ``weight`` is not modified).
        """
        block = _block_size(block if block is not None else self.block, self.weight)
        for a, c in row_blocks(self.hi - self.lo, block):
            what, _ = l2_normalize_forward(self.weight[a:c])
            yield self.lo + a, self.lo + c, what
