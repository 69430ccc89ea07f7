"""Layers as forward/backward function pairs with a cache (cs231n style).

    out, cache = <layer>_forward(x, ...)
    dx, ...    = <layer>_backward(dout, cache)

Backward returns the gradients of the forward's differentiable arguments, in
their order, and never mutates ``dout`` or the cached inputs.

In the order a training step meets them:

    conv.py        2-D convolution (im2col, plus a loop-based twin for tests)
    im2col.py      the convolution's column matrix (im2col) and its adjoint (col2im)
    winograd.py    Winograd F(2x2, 3x3): conv's path for small 3x3 maps
    batchnorm.py   BatchNorm for (N, C) and (N, C, H, W), PyTorch's convention (plus a
                   readable twin: the docstring's equations over the whole array)
    relu.py        ReLU (plus a readable twin)
    pool.py        max pool (the ImageNet stem) and global average pool (a loop-based twin)
    linear.py      fully connected, with or without bias
    normalize.py   row-wise L2 normalization (F.normalize)
    window.py      the sliding-window output size shared by conv and pool

and one a training step never calls:

    loss.py        dense softmax cross-entropy with hard or soft targets: the
                   reference that the sharded loss of ``parallel/classifier.py``
                   is checked against (``oracle/dense.py``), and the loss of
                   small supervised models (tutorials, benchmarks)
"""
