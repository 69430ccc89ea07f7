"""Fully connected layer, forward and backward, in PyTorch's weight layout.

Contract: ``linear_forward`` / ``linear_backward`` match
``torch.nn.functional.linear``: the weight is stored (D_out, D_in), as in
``nn.Linear.weight`` (cs231n stores it (D_in, D_out) and computes x @ w), and
the bias is optional.
"""
from refimpl.backend import get_array_module


def linear_forward(x, w, b=None):
    """out = x @ w.T + b.

    Inputs:
      x  (N, D_in)
      w  (D_out, D_in)
      b  (D_out,) or None
    Outputs: out (N, D_out); cache for linear_backward.
    """
    xp = get_array_module(x)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: need x (N, D_in) and w (D_out, D_in), "
                         f"got x {x.shape} and w {w.shape}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"linear: b must have shape ({w.shape[0]},), got {b.shape}")
    out = xp.matmul(x, w.T)                                  # (N, D_out)
    if b is not None:
        out = out + b                                        # (N, D_out), broadcast over N
    cache = (x, w, b is not None)
    return out, cache


def linear_backward(dout, cache):
    """Gradients of linear_forward.

    Inputs:  dout (N, D_out); cache from linear_forward.
    Outputs:
      dx  (N, D_in)       = dout @ w
      dw  (D_out, D_in)   = dout.T @ x
      db  (D_out,)        = sum of dout over N, or None when there was no bias
    """
    xp = get_array_module(dout)
    x, w, has_b = cache
    dx = xp.matmul(dout, w)                                  # (N, D_in)
    dw = xp.matmul(dout.T, x)                                # (D_out, D_in)
    db = xp.sum(dout, axis=0) if has_b else None             # (D_out,)
    return dx, dw, db
