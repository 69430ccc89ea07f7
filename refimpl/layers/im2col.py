"""The column matrix of a convolution: im2col, and its adjoint col2im.

Contract. For a kernel HH x WW, a stride and a padding, ``columns(x, ...)``
turns an (N, C, H, W) input into the matrix

    cols[(c, kh, kw), (n, i, j)] = xpad[n, c, i*stride + kh, j*stride + kw]     (C*HH*WW, N*H'*W')

so that a convolution is one GEMM, ``w.reshape(F, -1) @ cols`` (``conv.py``),
and ``from_columns`` gives that (F, N*H'*W') product back as an
(N, F, H', W') view; ``col2im`` is the adjoint of ``im2col``: it sums every
column entry back onto the input pixel it came from.

Two column orders, as permutations of (N, C, H, W); the caller chooses one
(``conv._pixel_major``) and uses it on both sides of the GEMM:

* *channel-major* (C, N, H, W): a padded chunk is copied once into
  (C, n, Hp, Wp); every im2col tap copy is then a plain strided copy whose
  contiguous runs are image rows (W' elements).
* *pixel-major* (C, H, W, N): the padded input is (C, Hp, Wp, n), the
  columns are ordered (i, j, n), and a tap copy moves runs of W'*n elements
  (stride 1): longer runs where W' is short.

Both put the channels first (the GEMM's K = C*HH*WW rows). im2col is HH*WW
shifted-slice copies (never fancy indexing) and col2im HH*WW shifted-slice
additions (never ``np.add.at``). A 1x1 convolution without padding needs no
im2col: its columns are the (strided) input itself in the column order.
"""
from refimpl.backend import get_array_module

# (N, C, H, W) -> the column order: channel-major (C, N, H, W) or pixel-major (C, H, W, N)
_PERM = {False: (1, 0, 2, 3), True: (1, 2, 3, 0)}


def gemm_columns(a, pixel_major):
    """(N, C, H, W) -> (C, N*H*W) in the layout's column order, one copy."""
    xp = get_array_module(a)
    return xp.ascontiguousarray(a.transpose(_PERM[pixel_major])).reshape(a.shape[1], -1)


def padded(x, ph, pw, pixel_major):
    """(N, C, H, W) -> zero-padded (C, N, Hp, Wp) or, pixel-major, (C, Hp, Wp, N); one copy."""
    xp = get_array_module(x)
    N, C, H, W = x.shape
    Hp, Wp = H + 2 * ph, W + 2 * pw
    if pixel_major:
        xpad = xp.zeros((C, Hp, Wp, N), dtype=x.dtype)
        xpad[:, ph:ph + H, pw:pw + W, :] = x.transpose(1, 2, 3, 0)
    else:
        xpad = xp.zeros((C, N, Hp, Wp), dtype=x.dtype)
        xpad[:, :, ph:ph + H, pw:pw + W] = x.transpose(1, 0, 2, 3)
    return xpad


def unpadded(xpad, ph, pw, H, W, pixel_major):
    """The inverse of ``padded``: an (N, C, H, W) view of the interior."""
    if pixel_major:
        return xpad[:, ph:ph + H, pw:pw + W, :].transpose(3, 0, 1, 2)
    return xpad[:, :, ph:ph + H, pw:pw + W].transpose(1, 0, 2, 3)


def _tap(xpad, kh, kw, s, Ho, Wo, pixel_major):
    """The input pixels kernel tap (kh, kw) meets, one per output pixel:
    a view (C, N, H', W') or (C, H', W', N) of a padded input."""
    rows, cols = slice(kh, kh + s * Ho, s), slice(kw, kw + s * Wo, s)
    return xpad[:, rows, cols, :] if pixel_major else xpad[:, :, rows, cols]


def im2col(xpad, HH, WW, stride, Ho, Wo, pixel_major=False):
    """Columns of a padded input (``padded``).

    xpad (C, N, Hp, Wp) -> cols (C*HH*WW, N*Ho*Wo) with
    cols[(c, kh, kw), (n, i, j)] = xpad[c, n, i*stride + kh, j*stride + kw];
    pixel-major, xpad (C, Hp, Wp, N) and the columns ordered (i, j, n).
    """
    xp = get_array_module(xpad)
    C = xpad.shape[0]
    N = xpad.shape[3] if pixel_major else xpad.shape[1]
    taps = (Ho, Wo, N) if pixel_major else (N, Ho, Wo)
    cols = xp.empty((C, HH, WW) + taps, dtype=xpad.dtype)
    for kh in range(HH):
        for kw in range(WW):
            # one shifted (and, for stride > 1, subsampled) slice per kernel tap
            cols[:, kh, kw] = _tap(xpad, kh, kw, stride, Ho, Wo, pixel_major)
    return cols.reshape(C * HH * WW, N * Ho * Wo)


def col2im(dcols, xpad_shape, HH, WW, stride, Ho, Wo, pixel_major=False):
    """Adjoint of ``im2col``: sum each column entry back onto its input pixel.

    dcols (C*HH*WW, N*Ho*Wo) -> dxpad of xpad_shape ((C, N, Hp, Wp), or
    (C, Hp, Wp, N) pixel-major).
    """
    xp = get_array_module(dcols)
    C = xpad_shape[0]
    N = xpad_shape[3] if pixel_major else xpad_shape[1]
    taps = (Ho, Wo, N) if pixel_major else (N, Ho, Wo)
    dcols = dcols.reshape((C, HH, WW) + taps)
    dxpad = xp.zeros(xpad_shape, dtype=dcols.dtype)
    for kh in range(HH):
        for kw in range(WW):
            # overlapping windows share pixels: the taps are summed one at a time
            _tap(dxpad, kh, kw, stride, Ho, Wo, pixel_major)[...] += dcols[:, kh, kw]
    return dxpad


def columns(x, HH, WW, stride, ph, pw, pixel_major=False):
    """im2col of an (N, C, H, W) input: (cols (C*HH*WW, N*H'*W'), H', W')."""
    N, C, H, W = x.shape
    Ho = (H + 2 * ph - HH) // stride + 1
    Wo = (W + 2 * pw - WW) // stride + 1
    if HH == 1 and WW == 1 and ph == 0 and pw == 0:
        # 1x1: the columns are the input itself, subsampled
        xs = x[:, :, ::stride, ::stride][:, :, :Ho, :Wo]  # (N, C, H', W')
        return gemm_columns(xs, pixel_major), Ho, Wo
    xpad = padded(x, ph, pw, pixel_major)
    return im2col(xpad, HH, WW, stride, Ho, Wo, pixel_major), Ho, Wo


def from_columns(out, N, Ho, Wo, pixel_major):
    """A GEMM result (F, N*H'*W') in the layout's column order -> an (N, F, H', W') view."""
    F = out.shape[0]
    if pixel_major:
        return out.reshape(F, Ho, Wo, N).transpose(3, 0, 1, 2)
    return out.reshape(F, N, Ho, Wo).transpose(1, 0, 2, 3)
