"""Batch normalization, forward and backward, in PyTorch's convention.

Contract: ``batchnorm_forward`` / ``batchnorm_backward`` reproduce
``torch.nn.functional.batch_norm`` (and ``BatchNorm1d`` / ``BatchNorm2d``) for
inputs ``x`` of shape (N, C) or (N, C, H, W) (any (N, C, *) works): one mean
and one variance per channel C, taken over every other axis.

Conventions (where frameworks differ):

- train mode normalizes with the **biased** batch variance (divide by the
  count), but updates the running variance with the **unbiased** one
  (divide by count - 1), like PyTorch; TensorFlow/Keras store the biased one;
- ``new = (1 - momentum) * old + momentum * batch`` (PyTorch's momentum; Keras'
  ``momentum`` is PyTorch's ``1 - momentum``);
- eps is added to the variance inside the square root;
- eval mode normalizes with the running statistics and returns them unchanged;
- running statistics are returned as new arrays, never written into the
  caller's arrays (the layer holds no state).

Synchronized BatchNorm: with ``allreduce`` (a callable ``v -> sum of v over the
ranks of the BatchNorm group``) the statistics are those of the union of the
local batches of all ranks. Forward makes exactly one call, on
``[sum d (C), sum d^2 (C), count (1)]`` with ``d = x - running_mean`` (a shift
shared by all ranks, for float32 accuracy); backward makes exactly one call, on
``[sum dout (C), sum dout * xhat (C)]``. The returned dgamma/dbeta are the
*local* sums (this rank's share); summing them over ranks is the job of the
gradient all-reduce, like every other replicated parameter.

Threads (``threads.set_num_threads``): every statistic is per channel, so a
large layer is cut into one slice of channels per thread and each thread
runs the same operations on its channels, writing into shared outputs; the
bits are those of one thread (``_channel_chunks``).

The fast path works in chunked, in-place passes; ``batchnorm_forward_naive`` /
``batchnorm_backward_naive`` (end of file) are the same equations in plain
NumPy over the whole array, and what the fast path is tested against.
"""
from refimpl.backend import get_array_module
from refimpl.threads import THREAD_MIN_ELEMENTS, even_slices, num_workers, parallel_map


def _check_shape(x):
    """ValueError unless x is (N, C) or (N, C, H, W) (any (N, C, *))."""
    if x.ndim < 2:
        raise ValueError(f"batchnorm: x must be (N, C) or (N, C, H, W), got shape {x.shape}")


def _channel_chunks(x):
    """Slices of the channel axis, one per refimpl thread (``threads``).

    Every statistic is per channel, so each thread can run the whole layer
    on its own channels: the same operations on the same values, hence the
    same bits as one thread (a channel's sums do not depend on which other
    channels share the array; the tests check it). One slice, the whole
    axis, when serial, on a GPU, or for a small layer.
    """
    C = x.shape[1]
    return even_slices(C, min(num_workers(x), C) if x.size >= THREAD_MIN_ELEMENTS else 1)


# How the passes are laid out. Channels c of an (N, C, H, W) array are an
# (N, c*H*W) view, ``_rows``: each image's c channels are one contiguous run.
# Every elementwise pass works on that view with its per-channel constants
# repeated over the pixels (``_per_pixel``, a (1, c*H*W) row), so NumPy's
# inner loop runs over the whole run, not over one H*W map at a time: for
# the 4x4 maps of ResNet's last stage, where an inner loop of 16 elements
# is mostly call overhead, that is much faster than broadcasting a
# (1, C, 1, 1) array. The per-channel sums go the same way: over N first
# (row-by-row accumulation, vectorized), then over each channel's pixels.

def _rows(a, c):
    """Channels c of an (N, C, ...) array as an (N, c*H*W) view."""
    return a[:, c].reshape(a.shape[0], -1)


def _per_pixel(v, c, pixels):
    """Per-channel values v[c] (C,) repeated over each channel's pixels: (1, c*pixels)."""
    xp = get_array_module(v)
    return xp.repeat(v[c], pixels).reshape(1, -1)


def _channel_sum(rows, pixels):
    """Per-channel sum of an (N, c*pixels) view: (c,)."""
    return rows.sum(axis=0).reshape(-1, pixels).sum(axis=1)


def _channel_dot(a, b, pixels):
    """Per-channel sum of a * b, two (N, c*pixels) views, with no a * b temporary: (c,)."""
    xp = get_array_module(a)
    return xp.einsum("nk,nk->k", a, b).reshape(-1, pixels).sum(axis=1)


def _check_param(name, p, C):
    """ValueError unless p is a 1-D array of length C."""
    if p is None or p.shape != (C,):
        shape = None if p is None else p.shape
        raise ValueError(f"batchnorm: {name} must have shape ({C},), got {shape}")


def batchnorm_forward(x, gamma, beta, running_mean, running_var, train=True,
                      momentum=0.1, eps=1e-5, allreduce=None):
    """Batch normalization over every axis but the channel axis 1.

    Inputs:
      x            (N, C) or (N, C, H, W)
      gamma, beta  (C,) scale and shift
      running_mean, running_var  (C,) running statistics (read, never written);
                   in train mode either may be None (nothing is tracked)
      train        True: batch statistics; False: running statistics
      momentum     weight of the batch statistics in the running average
      eps          added to the variance
      allreduce    None (local statistics) or a callable v -> sum of v over the
                   ranks of the BatchNorm group (synchronized BN, train only)
    Outputs:
      out                shaped like x, dtype of x
      cache              for batchnorm_backward
      new_running_mean   (C,) new array (train) or running_mean itself (eval)
      new_running_var    (C,) new array (train) or running_var itself (eval)

    With m = count of values per channel (N*H*W, summed over ranks if synced):
      mean = sum(x) / m
      var  = sum((x - mean)^2) / m                       (local: two passes)
           = sum(d^2) / m - (sum(d) / m)^2, d = x - running_mean
                                                         (synced: one allreduce)
      xhat = (x - mean) / sqrt(var + eps)
      out  = gamma * xhat + beta
      new_running_mean = (1 - momentum) * running_mean + momentum * mean
      new_running_var  = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    Eval: xhat = (x - running_mean) / sqrt(running_var + eps).

    Readable twin (the same equations, plain NumPy): ``batchnorm_forward_naive``.
    """
    xp = get_array_module(x)
    _check_shape(x)
    x = xp.ascontiguousarray(x)  # _rows needs each image's channels in one run
    N, C = x.shape[:2]
    _check_param("gamma", gamma, C)
    _check_param("beta", beta, C)
    pixels = x.size // (N * C) if x.size else 1  # H*W (1 for an (N, C) input)
    local_count = N * pixels                     # values per channel, a host integer
    chunks = _channel_chunks(x)
    xc = xp.empty(x.shape, dtype=x.dtype)   # x - mean, kept for backward
    out = xp.empty(x.shape, dtype=x.dtype)

    if not train:
        if running_mean is None or running_var is None:
            raise ValueError("batchnorm: eval mode needs running_mean and running_var")
        _check_param("running_mean", running_mean, C)
        _check_param("running_var", running_var, C)
        # Cast to x's dtype so a float64 running stat cannot promote a float32 x.
        mean = running_mean.astype(x.dtype, copy=False)  # (C,)
        inv_std = 1.0 / xp.sqrt(running_var.astype(x.dtype, copy=False) + eps)  # (C,)
        _normalize(x, xc, out, mean, inv_std, gamma, beta, chunks, pixels)
        cache = {"train": False, "xc": xc, "gamma": gamma, "inv_std": inv_std,
                 "pixels": pixels}
        return out, cache, running_mean, running_var

    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is not None:
            _check_param(name, stat, C)
    if allreduce is None:
        if local_count <= 1:
            raise ValueError(f"batchnorm: train mode needs more than 1 value per "
                             f"channel, got input shape {x.shape}")
        count = local_count
        # Two passes (mean, then variance of the centered values) like PyTorch
        # CPU: sum(x^2)/m - mean^2 loses digits when |mean| >> std.

        def centre(c):                                       # channels c
            m = _channel_sum(_rows(x, c), pixels) / count    # (c,)
            xp.subtract(_rows(x, c), _per_pixel(m, slice(None), pixels), out=_rows(xc, c))
            return m, _channel_dot(_rows(xc, c), _rows(xc, c), pixels) / count  # biased var

        parts = parallel_map(centre, chunks)
        mean = xp.concatenate([m for m, _ in parts])         # (C,)
        var = xp.concatenate([v for _, v in parts])          # (C,)
        centred = True
    else:
        # One message per forward: per-channel sum, sum of squares, and the
        # count (a float; exact in float32 up to 2**24 values per channel).
        # The sums are of x - shift, with a shift every rank shares: the
        # running mean (replicated, and identical on all ranks under sync BN).
        # E[d^2] - E[d]^2 loses about log10((mean - shift)^2 / var) digits,
        # so without the shift a float32 channel with mean 30 and std 0.05
        # keeps none; once the running mean has caught up it loses ~none.
        shift = xp.zeros(C, dtype=x.dtype) if running_mean is None else \
            running_mean.astype(x.dtype, copy=False)         # (C,)

        def sums(c):                                         # channels c: sum d, sum d^2
            d = _rows(x, c) - _per_pixel(shift, c, pixels)   # (N, c*H*W)
            return _channel_sum(d, pixels), _channel_dot(d, d, pixels)

        parts = parallel_map(sums, chunks)
        stats = xp.concatenate([p[0] for p in parts] + [p[1] for p in parts] +
                               [xp.full((1,), local_count, dtype=x.dtype)])  # (2C + 1,)
        total = allreduce(stats)
        if total is None or total.shape != (2 * C + 1,):
            raise ValueError(f"batchnorm: allreduce must return shape ({2 * C + 1},), "
                             f"got {None if total is None else total.shape}")
        count = total[2 * C]  # 0-d array: the global count
        # The global count is >= the local one, so only a tiny local batch
        # needs the (device-synchronizing) look at the global count.
        if local_count <= 1 and float(count) <= 1:
            raise ValueError("batchnorm: synchronized train mode needs more than 1 "
                             "value per channel over all ranks")
        mean_d = total[:C] / count                           # (C,): E[x - shift]
        # E[d^2] - E[d]^2 can round to a tiny negative number; a variance is >= 0.
        var = xp.maximum(total[C:2 * C] / count - mean_d ** 2, 0)  # biased
        mean = mean_d + shift                                # (C,)
        centred = False

    inv_std = 1.0 / xp.sqrt(var + eps)                       # (C,)
    _normalize(x, xc, out, mean, inv_std, gamma, beta, chunks, pixels, centred)

    new_mean = new_var = None
    if running_mean is not None:
        new_mean = ((1 - momentum) * running_mean + momentum * mean
                    ).astype(running_mean.dtype, copy=False)
    if running_var is not None:
        # The running variance is unbiased (PyTorch), the normalization is not.
        unbiased = var * (count / (count - 1))
        new_var = ((1 - momentum) * running_var + momentum * unbiased
                   ).astype(running_var.dtype, copy=False)

    cache = {"train": True, "xc": xc, "gamma": gamma, "inv_std": inv_std,
             "pixels": pixels, "count": count, "allreduce": allreduce}
    return out, cache, new_mean, new_var


def _normalize(x, xc, out, mean, inv_std, gamma, beta, chunks, pixels, centred=False):
    """out = gamma * (x - mean) * inv_std + beta, writing xc = x - mean unless ``centred``.

    In place: every full-size temporary is a fresh allocation (page faults)
    and a pass over memory, and this runs ~20 times a step. xhat is never
    stored: out = xc * (gamma * inv_std) + beta, and backward folds inv_std
    into its per-channel constants.
    """
    xp = get_array_module(x)
    k = gamma.astype(x.dtype, copy=False) * inv_std          # (C,) gamma / sqrt(var + eps)
    b = beta.astype(x.dtype, copy=False)

    def normalize(c):                                        # channels c of xc, out
        if not centred:
            xp.subtract(_rows(x, c), _per_pixel(mean, c, pixels), out=_rows(xc, c))
        xp.multiply(_rows(xc, c), _per_pixel(k, c, pixels), out=_rows(out, c))
        _rows(out, c)[...] += _per_pixel(b, c, pixels)

    parallel_map(normalize, chunks)


def batchnorm_backward(dout, cache):
    """Gradients of batchnorm_forward.

    Inputs:  dout shaped like x; cache from batchnorm_forward.
    Outputs: dx (like x), dgamma (C,), dbeta (C,).

      dbeta  = sum(dout)                 over all axes but C (local batch)
      dgamma = sum(dout * xhat)
    Train mode (statistics depend on x), with m the (global) count and S1, S2
    the (global, if synced) sums of dout and dout * xhat:
      dx = gamma / sqrt(var + eps) * (dout - S1 / m - xhat * S2 / m)
    Eval mode (x-affine): dx = gamma / sqrt(running_var + eps) * dout.

    Readable twin: ``batchnorm_backward_naive``.
    """
    xp = get_array_module(dout)
    xc, gamma, inv_std, pixels = cache["xc"], cache["gamma"], cache["inv_std"], cache["pixels"]
    C = gamma.shape[0]
    dout = xp.ascontiguousarray(dout)

    chunks = _channel_chunks(dout)
    parts = parallel_map(lambda c: (_channel_sum(_rows(dout, c), pixels),
                                    _channel_dot(_rows(dout, c), _rows(xc, c), pixels)), chunks)
    dbeta = xp.concatenate([p[0] for p in parts])            # (C,)
    # sum(dout * xhat) = sum(dout * (x - mean)) / sqrt(var + eps)
    dgamma = xp.concatenate([p[1] for p in parts]) * inv_std  # (C,)
    scale = gamma.astype(dout.dtype, copy=False) * inv_std   # (C,) gamma / sqrt(var + eps)
    dx = xp.empty(dout.shape, dtype=dout.dtype)
    if not cache["train"]:
        parallel_map(lambda c: xp.multiply(_rows(dout, c), _per_pixel(scale, c, pixels),
                                           out=_rows(dx, c)), chunks)
        return dx, dgamma, dbeta

    allreduce = cache["allreduce"]
    if allreduce is None:
        sum_dout, sum_dout_xhat = dbeta, dgamma
    else:
        # The mean and variance mixed every rank's x, so dx needs every rank's
        # sums: one message, [sum dout, sum dout * xhat].
        total = allreduce(xp.concatenate([dbeta, dgamma]))   # (2C,)
        if total is None or total.shape != (2 * C,):
            raise ValueError(f"batchnorm: allreduce must return shape ({2 * C},), "
                             f"got {None if total is None else total.shape}")
        sum_dout, sum_dout_xhat = total[:C], total[C:]
    count = cache["count"]
    # Remove the components of dout that the mean and variance absorb. One
    # full-size allocation, the rest in place (each fresh (N, C, H, W) array
    # costs page faults and a pass over memory; this runs ~20 times a step).
    # xhat * S2/m = xc * (inv_std * S2/m): xhat is never formed.
    s2 = inv_std * (sum_dout_xhat / count)                   # (C,)
    s1 = sum_dout / count                                    # (C,)

    def input_gradient(c):                                   # channels c of dx
        d = _rows(dx, c)                                     # (N, c*H*W) view of dx
        xp.multiply(_rows(xc, c), _per_pixel(s2, c, pixels), out=d)  # xhat * S2/m
        xp.subtract(_rows(dout, c), d, out=d)                # dout - xhat * S2/m
        d -= _per_pixel(s1, c, pixels)                       #      - S1/m
        d *= _per_pixel(scale, c, pixels)

    parallel_map(input_gradient, chunks)
    return dx, dgamma, dbeta


# ------------------------------------------------------------ readable twins
# The equations of batchnorm_forward / batchnorm_backward's docstrings, in
# plain NumPy over the whole array: no channel chunks, nothing in place, no
# synchronized mode (its statistics are those of the union of the ranks'
# batches, which tests/test_batchnorm.py checks against one full batch).
# tests/test_batchnorm.py tests the fast path against these.

def batchnorm_forward_naive(x, gamma, beta, running_mean, running_var, train=True,
                            momentum=0.1, eps=1e-5):
    """Readable twin of ``batchnorm_forward`` (local statistics only).

    The same arguments (no ``allreduce``) and the same returns: out, cache (for
    ``batchnorm_backward_naive``), new_running_mean, new_running_var.
    """
    xp = get_array_module(x)
    _check_shape(x)
    C = x.shape[1]
    axes = (0,) + tuple(range(2, x.ndim))     # every axis but the channel axis
    per_channel = (1, C) + (1,) * (x.ndim - 2)  # (C,) -> (1, C) or (1, C, 1, 1)
    m = x.size // C                           # values per channel: N*H*W
    if train:
        mean = x.mean(axis=axes)                                   # (C,)
        var = ((x - mean.reshape(per_channel)) ** 2).mean(axis=axes)  # (C,) biased
    else:
        mean, var = running_mean, running_var                      # (C,)
    std = xp.sqrt(var + eps)                                       # (C,)
    xhat = (x - mean.reshape(per_channel)) / std.reshape(per_channel)  # like x
    out = gamma.reshape(per_channel) * xhat + beta.reshape(per_channel)

    new_mean, new_var = running_mean, running_var  # eval: returned unchanged
    if train and running_mean is not None:
        new_mean = (1 - momentum) * running_mean + momentum * mean
    if train and running_var is not None:
        # the running variance is the unbiased one (PyTorch); xhat used the biased one
        new_var = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    cache = {"train": train, "xhat": xhat, "gamma": gamma, "std": std, "count": m}
    return out, cache, new_mean, new_var


def batchnorm_backward_naive(dout, cache):
    """Readable twin of ``batchnorm_backward``: dx (like x), dgamma (C,), dbeta (C,)."""
    xhat, gamma, std, m = cache["xhat"], cache["gamma"], cache["std"], cache["count"]
    C = gamma.shape[0]
    axes = (0,) + tuple(range(2, dout.ndim))
    per_channel = (1, C) + (1,) * (dout.ndim - 2)
    dbeta = dout.sum(axis=axes)                                    # (C,) S1
    dgamma = (dout * xhat).sum(axis=axes)                          # (C,) S2
    scale = (gamma / std).reshape(per_channel)                     # gamma / sqrt(var + eps)
    if not cache["train"]:
        return scale * dout, dgamma, dbeta                         # x-affine: no statistic moves
    # the mean absorbs S1 / m of dout, the variance xhat * S2 / m
    dx = scale * (dout - dbeta.reshape(per_channel) / m
                  - xhat * dgamma.reshape(per_channel) / m)
    return dx, dgamma, dbeta
