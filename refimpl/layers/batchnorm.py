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
"""
import numpy as np

from refimpl.backend import get_array_module
from refimpl.threads import num_workers, parallel_map

# Below this many elements BatchNorm runs in the calling thread: handing a
# small layer to the pool costs more than the pass itself.
THREAD_MIN_ELEMENTS = 1 << 18


def _channel_axes(x):
    """The reduction axes (all but C) and the broadcast shape (1, C, 1, ...)."""
    if x.ndim < 2:
        raise ValueError(f"batchnorm: x must be (N, C) or (N, C, H, W), got shape {x.shape}")
    axes = (0,) + tuple(range(2, x.ndim))
    bshape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    return axes, bshape


def _channel_chunks(x):
    """Slices of the channel axis, one per refimpl thread (``threads``).

    Every statistic is per channel, so each thread can run the whole layer
    on its own channels: the same operations on the same values, hence the
    same bits as one thread (a channel's sums do not depend on which other
    channels share the array; the tests check it). One slice, the whole
    axis, when serial, on a GPU, or for a small layer.
    """
    C = x.shape[1]
    n = min(num_workers(x), C) if x.size >= THREAD_MIN_ELEMENTS else 1
    bounds = np.linspace(0, C, n + 1).astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _per_chunk(fn, chunks):
    """fn(c) for each channel slice c, on refimpl's threads; results in order."""
    return parallel_map(fn, chunks) if len(chunks) > 1 else [fn(chunks[0])]


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
    """
    xp = get_array_module(x)
    axes, bshape = _channel_axes(x)
    C = x.shape[1]
    _check_param("gamma", gamma, C)
    _check_param("beta", beta, C)
    local_count = x.size // C  # N*H*W, a host integer

    if not train:
        if running_mean is None or running_var is None:
            raise ValueError("batchnorm: eval mode needs running_mean and running_var")
        _check_param("running_mean", running_mean, C)
        _check_param("running_var", running_var, C)
        # Cast to x's dtype so a float64 running stat cannot promote a float32 x.
        mean = running_mean.astype(x.dtype, copy=False).reshape(bshape)  # (1, C, 1, 1)
        var = running_var.astype(x.dtype, copy=False).reshape(bshape)
        inv_std = 1.0 / xp.sqrt(var + eps)                   # (1, C, 1, 1)
        xhat, out = xp.empty_like(x), xp.empty_like(x)
        g, b = gamma.reshape(bshape), beta.reshape(bshape)

        def normalize(c):                                    # channels c of xhat, out
            xp.multiply(x[:, c] - mean[:, c], inv_std[:, c], out=xhat[:, c])
            xp.add(g[:, c] * xhat[:, c], b[:, c], out=out[:, c])

        _per_chunk(normalize, _channel_chunks(x))
        cache = {"train": False, "xhat": xhat, "gamma": gamma, "inv_std": inv_std,
                 "axes": axes, "bshape": bshape}
        return out, cache, running_mean, running_var

    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is not None:
            _check_param(name, stat, C)
    chunks = _channel_chunks(x)
    if allreduce is None:
        if local_count <= 1:
            raise ValueError(f"batchnorm: train mode needs more than 1 value per "
                             f"channel, got input shape {x.shape}")
        count = local_count
        # Two passes (mean, then variance of the centered values) like PyTorch
        # CPU: sum(x^2)/m - mean^2 loses digits when |mean| >> std.
        xc = xp.empty_like(x)                                # x - mean; becomes xhat below

        def centre(c):                                       # channels c
            m = xp.mean(x[:, c], axis=axes, keepdims=True)   # (1, c, 1, 1)
            xp.subtract(x[:, c], m, out=xc[:, c])
            return m, xp.mean(xp.square(xc[:, c]), axis=axes, keepdims=True)  # biased var

        parts = _per_chunk(centre, chunks)
        mean = xp.concatenate([m for m, _ in parts], axis=1)  # (1, C, 1, 1)
        var = xp.concatenate([v for _, v in parts], axis=1)
    else:
        # One message per forward: per-channel sum, sum of squares, and the
        # count (a float; exact in float32 up to 2**24 values per channel).
        # The sums are of x - shift, with a shift every rank shares: the
        # running mean (replicated, and identical on all ranks under sync BN).
        # E[d^2] - E[d]^2 loses about log10((mean - shift)^2 / var) digits,
        # so without the shift a float32 channel with mean 30 and std 0.05
        # keeps none; once the running mean has caught up it loses ~none.
        shift = xp.zeros(bshape, dtype=x.dtype) if running_mean is None else \
            running_mean.astype(x.dtype, copy=False).reshape(bshape)  # (1, C, 1, 1)

        def sums(c):                                         # channels c: sum d, sum d^2
            d = x[:, c] - shift[:, c]
            return xp.sum(d, axis=axes), xp.sum(xp.square(d), axis=axes)

        parts = _per_chunk(sums, chunks)
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
        mean_d = (total[:C] / count).reshape(bshape)         # (1, C, 1, 1): E[x - shift]
        # E[d^2] - E[d]^2 can round to a tiny negative number; a variance is >= 0.
        var = xp.maximum(total[C:2 * C].reshape(bshape) / count - mean_d ** 2, 0)  # biased
        mean = mean_d + shift                                # (1, C, 1, 1)
        xc = None

    inv_std = 1.0 / xp.sqrt(var + eps)                       # (1, C, 1, 1)
    # In place from here on: every full-size temporary is a fresh allocation
    # (page faults) and a pass over memory, and this layer runs ~20 times a step.
    xhat = xp.empty_like(x) if xc is None else xc
    out = xp.empty_like(x)
    g, b = gamma.reshape(bshape), beta.reshape(bshape)

    def normalize(c):                                        # channels c of xhat, out
        if xc is None:
            xp.subtract(x[:, c], mean[:, c], out=xhat[:, c])
        xhat[:, c] *= inv_std[:, c]                          # like x
        xp.multiply(xhat[:, c], g[:, c], out=out[:, c])
        out[:, c] += b[:, c]

    _per_chunk(normalize, chunks)

    new_mean = new_var = None
    if running_mean is not None:
        new_mean = ((1 - momentum) * running_mean + momentum * mean.reshape(C)
                    ).astype(running_mean.dtype, copy=False)
    if running_var is not None:
        # The running variance is unbiased (PyTorch), the normalization is not.
        unbiased = var.reshape(C) * (count / (count - 1))
        new_var = ((1 - momentum) * running_var + momentum * unbiased
                   ).astype(running_var.dtype, copy=False)

    cache = {"train": True, "xhat": xhat, "gamma": gamma, "inv_std": inv_std,
             "axes": axes, "bshape": bshape, "count": count, "allreduce": allreduce}
    return out, cache, new_mean, new_var


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
    """
    xp = get_array_module(dout)
    xhat, gamma, inv_std = cache["xhat"], cache["gamma"], cache["inv_std"]
    axes, bshape = cache["axes"], cache["bshape"]
    C = gamma.shape[0]

    chunks = _channel_chunks(dout)
    parts = _per_chunk(lambda c: (xp.sum(dout[:, c], axis=axes),
                                  xp.sum(dout[:, c] * xhat[:, c], axis=axes)), chunks)
    dbeta = xp.concatenate([p[0] for p in parts])            # (C,)
    dgamma = xp.concatenate([p[1] for p in parts])           # (C,)
    scale = gamma.reshape(bshape) * inv_std                  # (1, C, 1, 1)
    dx = xp.empty_like(dout)
    if not cache["train"]:
        _per_chunk(lambda c: xp.multiply(dout[:, c], scale[:, c], out=dx[:, c]), chunks)
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
    s2 = sum_dout_xhat.reshape(bshape) / count               # (1, C, 1, 1)
    s1 = sum_dout.reshape(bshape) / count

    def input_gradient(c):                                   # channels c of dx
        xp.multiply(xhat[:, c], s2[:, c], out=dx[:, c])      # xhat * S2/m
        xp.subtract(dout[:, c], dx[:, c], out=dx[:, c])      # dout - xhat * S2/m
        dx[:, c] -= s1[:, c]                                 #      - S1/m
        dx[:, c] *= scale[:, c]

    _per_chunk(input_gradient, chunks)
    return dx, dgamma, dbeta
