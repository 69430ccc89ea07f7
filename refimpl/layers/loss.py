"""Softmax cross-entropy with hard (integer) or soft (probability) targets.

Contract: ``softmax_cross_entropy_forward`` / ``_backward`` match
``torch.nn.functional.cross_entropy(logits, target)`` with the default
``reduction="mean"``, for both kinds of target it accepts:

- int labels (B,): loss = mean_b [ -log softmax(logits)_b,target_b ];
- soft targets (B, C), rows of probabilities (the smoothed labels of the
  hardest classes): loss = mean_b [ -sum_j y_bj log softmax(logits)_bj ].

Both are averaged over the B rows (PyTorch's "mean" for probability targets
also divides by B). The loss is a 0-d array of logits' dtype (not a Python
float: no device sync on CuPy; ``float(loss)`` when you need one).

Bad input (wrong shapes, labels outside [0, C), soft targets that are negative
or whose rows do not sum to 1) raises ValueError. These checks read the target
on the host once per call (a device sync on CuPy).
"""
import numpy as np

from refimpl.backend import asarray, device_of, get_array_module


def _check_target(logits, target):
    """Validate (logits, target); return the target on logits' device.

    Int labels come back as they are (moved to the device if needed), soft
    targets cast to logits' dtype.
    """
    xp = get_array_module(logits)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"cross_entropy: logits must be (B, C) with B, C >= 1, "
                         f"got shape {logits.shape}")
    B, C = logits.shape
    if not hasattr(target, "dtype"):
        raise ValueError(f"cross_entropy: target must be an array, got {type(target).__name__}")
    # Labels often come from the host (the data loader): one copy to the device.
    target = asarray(target, device=device_of(logits))
    kind = np.dtype(target.dtype).kind
    if kind in "iu":
        if target.shape != (B,):
            raise ValueError(f"cross_entropy: int labels must have shape ({B},), "
                             f"got {target.shape}")
        if bool(xp.any((target < 0) | (target >= C))):
            lo, hi = int(xp.min(target)), int(xp.max(target))
            raise ValueError(f"cross_entropy: labels must lie in [0, {C}), "
                             f"got values in [{lo}, {hi}]")
        return target
    if kind != "f":
        raise ValueError(f"cross_entropy: target must be int labels (B,) or float "
                         f"probabilities (B, C), got dtype {target.dtype}")
    if target.shape != (B, C):
        raise ValueError(f"cross_entropy: soft targets must have shape ({B}, {C}) "
                         f"like the logits, got {target.shape}")
    y = target.astype(logits.dtype, copy=False)
    # Written as "not all >= 0" so that NaN fails too.
    if not bool(xp.all(y >= 0)):
        raise ValueError("cross_entropy: soft targets must be non-negative")
    # sqrt(machine eps): 3.5e-4 in float32, 1.5e-8 in float64.
    tol = float(np.sqrt(np.finfo(y.dtype).eps))
    row_sum = xp.sum(y, axis=1)                              # (B,)
    if not bool(xp.all(xp.abs(row_sum - 1) <= tol)):
        worst = float(xp.max(xp.abs(row_sum - 1)))
        raise ValueError(f"cross_entropy: soft target rows must sum to 1 (tolerance "
                         f"{tol:.1e}); the worst row is off by {worst:.3e}")
    return y


def softmax_cross_entropy_forward(logits, target):
    """Mean cross-entropy between softmax(logits) and the targets.

    Inputs:
      logits  (B, C) floating
      target  (B,) int labels in [0, C), or (B, C) probabilities
              (non-negative, rows summing to 1 within sqrt(eps) of the dtype)
    Outputs:
      loss   0-d array, dtype of logits
      cache  for softmax_cross_entropy_backward

    log p_bj = l_bj - m_b - log sum_k exp(l_bk - m_b),  m_b = max_k l_bk
    loss = -(1 / B) sum_b sum_j y_bj log p_bj   (y = one-hot of the label)
    """
    xp = get_array_module(logits)
    y = _check_target(logits, target)  # (B,) labels or (B, C) probabilities
    B = logits.shape[0]
    # Subtracting the row max makes every exp <= 1: no overflow, and the
    # largest term is exactly 1 so the sum cannot underflow to 0.
    shifted = logits - xp.max(logits, axis=1, keepdims=True)          # (B, C)
    logp = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))  # (B, C)
    if y.ndim == 1:
        picked = logp[xp.arange(B), y]                                # (B,)
        loss = -xp.sum(picked) / B
    else:
        loss = -xp.sum(y * logp) / B
    # NumPy reductions give a scalar, CuPy a 0-d array: make both a 0-d array.
    loss = xp.asarray(loss, dtype=logits.dtype)
    cache = (xp.exp(logp), y)
    return loss, cache


def softmax_cross_entropy_backward(dout, cache):
    """Gradient of softmax_cross_entropy_forward.

    Inputs:  dout, the scalar upstream gradient of the loss (1.0 normally; a
             Python number or an array with one element); cache from forward.
    Outputs: dlogits (B, C) = dout * (softmax(logits) - y) / B.
    """
    probs, target = cache
    xp = get_array_module(probs)
    B = probs.shape[0]
    if getattr(dout, "size", 1) != 1:
        raise ValueError(f"cross_entropy: dout must be a scalar, got shape {dout.shape}")
    # A 0-d float64 array would promote float32 probs: cast it first.
    scale = xp.asarray(dout, dtype=probs.dtype).reshape(()) / B
    if target.ndim == 1:
        # probs - one_hot(target), on a copy (the cached probs stay intact).
        diff = probs.copy()                                           # (B, C)
        diff[xp.arange(B), target] -= 1
    else:
        diff = probs - target                                         # (B, C)
    dlogits = diff * scale                                            # (B, C)
    return dlogits
