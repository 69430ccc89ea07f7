"""ReLU, forward and backward.

Contract: ``relu_forward`` / ``relu_backward`` match ``torch.relu``, including
its choice of subgradient at the kink: the gradient at x == 0 is 0.

Threads (``threads.set_num_threads``): a large array is cut into one
contiguous run of elements per thread (``threads.elementwise_slices``); an
elementwise result does not depend on the cut, so the bits are those of one
thread. ``relu_forward_naive`` / ``relu_backward_naive`` are the same two
equations on the whole array, and what the fast path is tested against.
"""
from refimpl.backend import get_array_module
from refimpl.threads import elementwise_slices, parallel_map


def relu_forward(x, out=None):
    """out = max(x, 0), elementwise.

    Inputs:  x any shape; out: None (a new array) or an array like x to
             write into, x itself included (in place: the caller's block
             owns x and needs it no more).
    Outputs: out like x (same dtype); cache for relu_backward.

    Readable twin: ``relu_forward_naive``.
    """
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x)
    if out is None:
        out = xp.empty(x.shape, dtype=x.dtype)
    elif out.shape != x.shape or not out.flags.c_contiguous:
        raise ValueError(f"relu: out must be a C-contiguous array of shape {x.shape}")
    # The mask is all backward needs, at one byte per element instead of x's four or eight.
    mask = xp.empty(x.shape, dtype=bool)
    x1, out1, mask1 = x.reshape(-1), out.reshape(-1), mask.reshape(-1)

    def run(s):                                  # elements s
        # A Python 0 is a "weak" scalar: float32 stays float32.
        xp.maximum(x1[s], 0, out=out1[s])
        xp.greater(out1[s], 0, out=mask1[s])

    parallel_map(run, elementwise_slices(x))
    return out, mask


def relu_backward(dout, cache):
    """dx = dout * [x > 0].

    Inputs:  dout like x; cache from relu_forward.
    Outputs: dx like x (dtype of dout).

    Readable twin: ``relu_backward_naive``.
    """
    xp = get_array_module(dout)
    mask = cache
    dout = xp.ascontiguousarray(dout)
    # A new array (multiplying by a bool keeps dout's dtype); dout is not touched.
    dx = xp.empty(dout.shape, dtype=dout.dtype)
    d1, m1, dx1 = dout.reshape(-1), mask.reshape(-1), dx.reshape(-1)
    parallel_map(lambda s: xp.multiply(d1[s], m1[s], out=dx1[s]), elementwise_slices(dout))
    return dx


# ------------------------------------------------------------ readable twins

def relu_forward_naive(x):
    """Readable twin of ``relu_forward``: out = max(x, 0); cache = x."""
    xp = get_array_module(x)
    return xp.maximum(x, 0), x


def relu_backward_naive(dout, cache):
    """Readable twin of ``relu_backward``: dx = dout * [x > 0] (0 at the kink)."""
    x = cache
    return dout * (x > 0)
