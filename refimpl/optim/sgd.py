"""SGD with momentum, in PyTorch's convention, on flat parameter buffers.

Contract. ``SGD(params, grads, ...)`` updates one flat parameter array from one
flat gradient array of the same shape (``ParamStore.data`` / ``.grad``, or a
classifier shard), in place, with a few vectorized operations per step. With
weight decay wd, momentum mu and learning rate lr, every step is

    d = g + wd * mask * p          (mask: 1 = decay, 0 = no decay; default all 1)
    v = mu * v + d                 (v starts at 0)
    d = d + mu * v   if nesterov   else   d = v
    p = p - lr * d

which is ``torch.optim.SGD(momentum=mu, dampening=0, weight_decay=wd,
nesterov=...)`` exactly: PyTorch's first step sets v = d (a clone), and
mu * 0 + d is the same number. Conventions where frameworks differ: the
learning rate multiplies the velocity (PyTorch), not the gradient inside it
(Sutskever et al. / TensorFlow's ``MomentumOptimizer`` form v = mu v - lr g),
so a learning-rate change takes effect at once and the two forms agree only at
constant lr; weight decay is L2 added to the gradient (coupled, not AdamW's
decoupled form). With momentum 0 there is no velocity.

The velocity ``momentum_buffer`` (same shape and dtype as the parameters) is
public so a checkpoint can save and restore it.
"""
import math

import numpy as np

from refimpl.backend import get_array_module
from refimpl.threads import parallel_map

BLOCK = 1 << 16  # elements per block of the update: 256 KiB of float32 per array


class SGD:
    """In-place SGD over one flat buffer.

    Arguments:
      params, grads  (G,) arrays of G parameters, same shape and dtype (views are fine, as long
                     as they are the arrays the model reads and writes)
      lr             default learning rate (``step(lr=...)`` overrides it)
      momentum       mu >= 0
      weight_decay   wd >= 0
      nesterov       Nesterov momentum (needs momentum > 0)
      decay_mask     None (decay everything) or a (G,) 0/1 array, e.g.
                     ``store.decay_mask(exclude=is_bn_or_bias)``
    """

    def __init__(self, params, grads, lr=0.1, momentum=0.0, weight_decay=0.0,
                 nesterov=False, decay_mask=None):
        if params.ndim != 1:
            raise ValueError(f"SGD: params must be one flat (1-D) buffer, got shape "
                             f"{params.shape} (pass .ravel() of a contiguous array)")
        if params.shape != grads.shape or params.dtype != grads.dtype:
            raise ValueError(f"SGD: params {params.shape} {params.dtype} and grads "
                             f"{grads.shape} {grads.dtype} must match")
        if not all(0 <= v < math.inf for v in (lr, momentum, weight_decay)):
            raise ValueError(f"SGD: lr, momentum, weight_decay must be finite and >= 0, got "
                             f"{lr}, {momentum}, {weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        if decay_mask is not None and decay_mask.shape != params.shape:
            raise ValueError(f"SGD: decay_mask shape {decay_mask.shape} != {params.shape}")
        xp = get_array_module(params)
        self.params, self.grads = params, grads
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.weight_decay = weight_decay
        # wd * mask once, in the params' dtype: per step it is one multiply.
        self.decay = (None if decay_mask is None
                      else (weight_decay * decay_mask).astype(params.dtype))
        self.momentum_buffer = xp.zeros_like(params) if momentum > 0 else None

    def step(self, lr=None):
        """One update of ``params`` in place (grads and their owner untouched).

        Done in blocks of BLOCK elements (on refimpl's threads): each block's
        temporaries stay in cache, and no temporary as large as the
        parameters is ever allocated, which matters for a classifier shard of
        hundreds of MB. Elementwise, so blocking changes no bit.
        """
        lr = self.lr if lr is None else lr
        if not 0 <= lr < math.inf:  # a NaN learning rate would make every parameter NaN
            raise ValueError(f"SGD.step: lr must be finite and >= 0, got {lr}")
        n = self.params.size
        # On a GPU one kernel per operation over the whole buffer is fastest.
        block = BLOCK if get_array_module(self.params) is np else max(n, 1)
        parallel_map(lambda a: self._update(slice(a, min(a + block, n)), lr),
                     range(0, n, block))

    def _update(self, s, lr):
        """The update of elements ``s`` (a slice) of the flat buffers."""
        p, g, mu = self.params[s], self.grads[s], self.momentum
        v = None if self.momentum_buffer is None else self.momentum_buffer[s]
        # d is a new array: the gradient buffer is never modified.
        if self.decay is not None:
            d = g + self.decay[s] * p
        elif self.weight_decay != 0:
            d = g + self.weight_decay * p
        else:
            d = g.copy()
        if v is not None:
            v *= mu
            v += d
            if self.nesterov:
                d += mu * v
            else:
                d = v
        p -= lr * d
