"""Sliding-window arithmetic shared by convolution and max pooling.

    H' = (H + 2*pad - HH) // stride + 1,   W' = (W + 2*pad - WW) // stride + 1

``output_size`` checks the arguments first, so an impossible window is a
named ValueError rather than a ZeroDivisionError or a broadcasting error deep
inside the layer. (The loop-based ``_naive`` twins write the formula out
themselves, so that they stay independent of the fast paths.)
"""
from refimpl.checks import check_int


def output_size(layer, H, W, HH, WW, stride, pad):
    """(H', W') of a HH x WW window sliding over an H x W input padded by ``pad``.

    layer: the layer's name for error messages. kernel sides and stride must
    be ints >= 1, pad an int >= 0, and the window must fit the padded input.
    """
    for name, value, low in (("kernel", HH, 1), ("kernel", WW, 1), ("stride", stride, 1),
                             ("pad", pad, 0)):
        check_int(f"{layer}: {name}", value, minimum=low)
    if H + 2 * pad < HH or W + 2 * pad < WW:
        raise ValueError(f"{layer}: kernel {HH}x{WW} larger than padded input "
                         f"{H + 2 * pad}x{W + 2 * pad}")
    return (H + 2 * pad - HH) // stride + 1, (W + 2 * pad - WW) // stride + 1
