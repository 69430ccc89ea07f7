"""Max pooling (the ImageNet stem) and global average pooling (before the head).

Contract:

    out, cache = maxpool2d_forward(x, kernel=3, stride=2, pad=1)
    dx         = maxpool2d_backward(dout, cache)
    out, cache = global_avgpool_forward(x)      # (N, C, H, W) -> (N, C)
    dx         = global_avgpool_backward(dout, cache)

Max pooling follows PyTorch's ``F.max_pool2d``:

    H' = (H + 2*pad - kernel) // stride + 1   (W' alike; no ceil_mode)
    out[n, c, i, j] = max_{kh, kw} xpad[n, c, i*stride + kh, j*stride + kw]

where the padding acts as -inf (it never wins), and in backward the whole of
dout[n, c, i, j] goes to ONE input pixel: on ties, the first maximum of the
window in row-major (kh, then kw) order, which is PyTorch's CPU rule. A NaN
always wins, as in PyTorch (``val > max || isnan(val)``): the output is NaN
and the gradient goes to the window's last NaN. Pixels shared by
overlapping windows sum the gradients they receive.

The fast path takes the running maximum over the kernel*kernel shifted,
strided slices of the padded input, remembering which tap won (an int8 per
output); backward adds dout back through the same slices. The ``_naive``
twins loop over output pixels with ``argmax`` and are what the fast path is
tested against. Outputs keep x's dtype.
"""
from refimpl.backend import get_array_module
from refimpl.layers.window import output_size


def maxpool2d_forward(x, kernel=3, stride=2, pad=1):
    """Max pooling, PyTorch's ``F.max_pool2d(x, kernel, stride, pad)``.

    Inputs:
      x: (N, C, H, W); kernel, stride, pad: ints (same for H and W),
         pad <= kernel // 2 as in PyTorch.
    Returns:
      out: (N, C, H', W'), H' = (H + 2*pad - kernel) // stride + 1,
           out[n,c,i,j] = max_{kh,kw} xpad[n, c, i*stride+kh, j*stride+kw], padding = -inf.
      cache: (x shape, argtap (N, C, H', W') int8 = kh*kernel + kw of the
             first maximum in row-major window order, kernel, stride, pad).
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    Ho, Wo = output_size("maxpool2d", H, W, kernel, kernel, stride, pad)
    if pad > kernel // 2:
        raise ValueError(f"maxpool2d: pad {pad} must be <= kernel // 2 = {kernel // 2}")
    xpad = xp.full((N, C, H + 2 * pad, W + 2 * pad), -xp.inf, dtype=x.dtype)  # (N, C, Hp, Wp)
    xpad[:, :, pad:pad + H, pad:pad + W] = x
    s = stride
    out = xpad[:, :, 0:s * Ho:s, 0:s * Wo:s].copy()  # tap (0, 0): (N, C, H', W')
    argtap = xp.zeros((N, C, Ho, Wo), dtype=xp.int8)
    for kh in range(kernel):
        for kw in range(kernel):
            if kh == 0 and kw == 0:
                continue
            tap = xpad[:, :, kh:kh + s * Ho:s, kw:kw + s * Wo:s]  # (N, C, H', W')
            # strictly greater: on a tie the earlier tap (row-major) keeps the
            # max; a NaN tap always takes over (PyTorch's rule), so NaN propagates
            better = (tap > out) | xp.isnan(tap)
            out = xp.where(better, tap, out)
            argtap = xp.where(better, xp.int8(kh * kernel + kw), argtap)
    return out, (x.shape, argtap, kernel, stride, pad)


def maxpool2d_backward(dout, cache):
    """Gradient of ``maxpool2d_forward``.

    Inputs: dout (N, C, H', W'), cache from the forward.
    Returns: dx (N, C, H, W): each dout[n,c,i,j] added to the pixel that was
             its window's (first) maximum.
    """
    xp = get_array_module(dout)
    x_shape, argtap, kernel, stride, pad = cache
    N, C, H, W = x_shape
    _, _, Ho, Wo = dout.shape
    s = stride
    dxpad = xp.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=dout.dtype)  # (N, C, Hp, Wp)
    for kh in range(kernel):
        for kw in range(kernel):
            won = argtap == kh * kernel + kw  # (N, C, H', W')
            # overlapping windows (stride < kernel) share pixels: accumulate
            dxpad[:, :, kh:kh + s * Ho:s, kw:kw + s * Wo:s] += dout * won
    return dxpad[:, :, pad:pad + H, pad:pad + W].copy()  # (N, C, H, W)


def maxpool2d_forward_naive(x, kernel=3, stride=2, pad=1):
    """Loop-based twin of ``maxpool2d_forward``; cache = (xpad, kernel, stride, pad)."""
    xp = get_array_module(x)
    N, C, H, W = x.shape
    Ho = (H + 2 * pad - kernel) // stride + 1
    Wo = (W + 2 * pad - kernel) // stride + 1
    xpad = xp.full((N, C, H + 2 * pad, W + 2 * pad), -xp.inf, dtype=x.dtype)
    xpad[:, :, pad:pad + H, pad:pad + W] = x
    out = xp.empty((N, C, Ho, Wo), dtype=x.dtype)
    for i in range(Ho):
        for j in range(Wo):
            window = xpad[:, :, i * stride:i * stride + kernel, j * stride:j * stride + kernel]
            out[:, :, i, j] = window.max(axis=(2, 3))
    return out, (xpad, kernel, stride, pad)


def maxpool2d_backward_naive(dout, cache):
    """Loop-based twin of ``maxpool2d_backward``: first maximum per window (last NaN if any)."""
    xp = get_array_module(dout)
    xpad, kernel, stride, pad = cache
    N, C, Hp, Wp = xpad.shape
    _, _, Ho, Wo = dout.shape
    dxpad = xp.zeros(xpad.shape, dtype=dout.dtype)
    for n in range(N):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    hs, ws = i * stride, j * stride
                    window = xpad[n, c, hs:hs + kernel, ws:ws + kernel]
                    nan = xp.flatnonzero(xp.isnan(window))
                    # argmax of the row-major flattening = the first maximum
                    k = int(nan[-1]) if nan.size else int(xp.argmax(window))
                    kh, kw = divmod(k, kernel)
                    dxpad[n, c, hs + kh, ws + kw] += dout[n, c, i, j]
    return dxpad[:, :, pad:Hp - pad, pad:Wp - pad]


def global_avgpool_forward(x):
    """Global average pooling (``adaptive_avg_pool2d(x, 1)`` flattened).

    Inputs: x (N, C, H, W). Returns: out (N, C), out[n,c] = mean_{h,w} x[n,c,h,w];
    cache = x's shape (backward needs nothing else).
    """
    xp = get_array_module(x)
    out = xp.mean(x, axis=(2, 3))  # (N, C)
    return out, x.shape


def global_avgpool_backward(dout, cache):
    """Gradient of ``global_avgpool_forward``: dx[n,c,h,w] = dout[n,c] / (H*W)."""
    xp = get_array_module(dout)
    N, C, H, W = cache
    dx = xp.empty((N, C, H, W), dtype=dout.dtype)
    dx[...] = (dout / (H * W))[:, :, None, None]  # broadcast, written into a fresh array
    return dx
