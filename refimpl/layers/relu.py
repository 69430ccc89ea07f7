"""ReLU, forward and backward.

Contract: ``relu_forward`` / ``relu_backward`` match ``torch.relu``, including
its choice of subgradient at the kink: the gradient at x == 0 is 0.
"""
from refimpl.backend import get_array_module


def relu_forward(x):
    """out = max(x, 0), elementwise.

    Inputs:  x any shape.
    Outputs: out like x (same dtype); cache for relu_backward.
    """
    xp = get_array_module(x)
    # A Python 0 is a "weak" scalar: float32 stays float32.
    out = xp.maximum(x, 0)
    # The mask is all backward needs, at one byte per element instead of x's four or eight.
    cache = out > 0
    return out, cache


def relu_backward(dout, cache):
    """dx = dout * [x > 0].

    Inputs:  dout like x; cache from relu_forward.
    Outputs: dx like x (dtype of dout).
    """
    mask = cache
    # A new array (multiplying by a bool keeps dout's dtype); dout is not touched.
    dx = dout * mask
    return dx
