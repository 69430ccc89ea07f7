"""Centered finite differences: the first oracle of every hand-written backward.

Contract. ``numerical_grad(f, x, dout)`` is d/dx of ``sum(f(x) * dout)`` by

    (f(x + h e_i) - f(x - h e_i)) / (2 h)      for each element i of x,

with a random upstream gradient ``dout``, never ``f(x).sum()``: with an
all-ones upstream gradient BatchNorm's dx is exactly zero and would hide any
bug. Use float64 inputs (h = 1e-6 then leaves about 1e-9 relative error) and
compare with ``compare.rel_error`` or ``check_tensor``.
"""
import numpy as np

from refimpl.backend import to_numpy


def numerical_grad(f, x, dout, h=1e-6):
    """d/dx of sum(f(x) * dout) by centered differences, one element at a time.

    f: a function of x (x is modified in place and restored) returning an
       array shaped like dout, or a scalar when dout is a scalar.
    x: float64 host array; dout: array like f(x), or 1.0 for a scalar f.
    Returns an array like x.
    """
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=["readwrite"])
    while not it.finished:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = np.sum(to_numpy(f(x)) * dout)
        x[i] = old - h
        fm = np.sum(to_numpy(f(x)) * dout)
        x[i] = old
        grad[i] = (fp - fm) / (2 * h)
        it.iternext()
    return grad
