"""Row-wise L2 normalization, forward and backward.

Contract: ``l2_normalize_forward`` / ``l2_normalize_backward`` match
``torch.nn.functional.normalize(x, p=2, dim=-1, eps=eps)``, clamped branch
included: the norm is clamped from below at eps, so a zero row maps to zero
and its gradient is ``dout / eps``. At ``||x|| == eps`` exactly the gradient is
the unclamped one, like ``clamp_min``'s backward in PyTorch.

Used for the features (z_hat = z / ||z||) and for the classifier rows
(w_hat_j = w_j / ||w_j||).
"""
from refimpl.backend import get_array_module


def l2_normalize_forward(x, eps=1e-12):
    """out = x / max(||x||, eps), over the last axis.

    Inputs:  x (..., D), any leading shape (usually (N, D)); eps >= 0.
    Outputs: out like x; cache for l2_normalize_backward.
    """
    xp = get_array_module(x)
    if x.ndim < 1:
        raise ValueError("l2_normalize: x must have at least one axis")
    if not eps >= 0:
        raise ValueError(f"l2_normalize: eps must be >= 0, got {eps}")
    norm = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))   # (..., 1)
    unclamped = norm >= eps                                  # (..., 1) bool
    # eps as a weak Python scalar keeps the dtype of x.
    denom = xp.maximum(norm, eps)                            # (..., 1)
    out = x / denom                                          # (..., D)
    cache = (out, denom, unclamped)
    return out, cache


def l2_normalize_backward(dout, cache):
    """Gradient of l2_normalize_forward.

    Inputs:  dout like x; cache from l2_normalize_forward.
    Outputs: dx like x.

    With y = x / ||x|| (unclamped row): dx = (dout - y * <dout, y>) / ||x||,
    the projection of dout orthogonal to y, scaled by 1 / ||x||.
    Clamped row (||x|| < eps, denominator is the constant eps): dx = dout / eps.
    """
    xp = get_array_module(dout)
    out, denom, unclamped = cache
    # The radial term exists only where the denominator depends on x.
    dot = xp.sum(dout * out, axis=-1, keepdims=True) * unclamped   # (..., 1)
    dx = (dout - out * dot) / denom                                 # (..., D)
    return dx
