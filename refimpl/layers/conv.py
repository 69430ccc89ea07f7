"""2-D convolution without bias: im2col + one GEMM, and a loop-based twin.

Contract:

    out, cache = conv2d_forward(x, w, stride=1, pad=0)
    dx, dw     = conv2d_backward(dout, cache)

x (N, C, H, W), w (F, C, HH, WW), out (N, F, H', W') with

    H' = (H + 2*pad - HH) // stride + 1,   W' = (W + 2*pad - WW) // stride + 1
    out[n, f, i, j] = sum_{c, kh, kw} w[f, c, kh, kw] * xpad[n, c, i*stride + kh, j*stride + kw]

where xpad is x zero-padded by ``pad`` on each side of H and W. There is no
bias: every convolution in a ResNet is followed by BatchNorm, whose beta plays
that role (torchvision builds them with ``bias=False``). This is PyTorch's
``F.conv2d`` (a cross-correlation), any kernel size, stride and padding.
Inputs may be non-contiguous; outputs are C-contiguous and keep x's dtype.

How the fast path is laid out (the choices that decide its speed on a CPU;
benchmarks/bench_conv.py measures them against PyTorch):

* The batch is processed a few images at a time (``_images_per_chunk``): the
  column matrix of a 3x3 conv is 9x its input, and built for a whole batch it
  makes a round trip through DRAM that costs as much as half the GEMM. A
  chunk's columns (about COLS_BYTES) are still in the cache when the GEMM
  reads them. Backward rebuilds them the same way, so the cache keeps only
  x and w (not 9x x).
* A chunk is copied once into *channel-major* order (C, n, Hp, Wp), padded.
  Every im2col slice is then a plain strided copy whose inner rows are image
  rows, the column matrix is (C*HH*WW, n*H'*W'), and one GEMM
  ``w (F, C*HH*WW) @ cols`` serves the chunk; its (F, n, H', W') result goes
  into out[n0:n1] (N, F, H', W') by one block copy. Maps of at most 16x16
  outputs use *pixel-major* order (C, Hp, Wp, n) instead, whose tap copies
  move runs of W'*n floats rather than W' (``_pixel_major`` says why and
  what it measured); the GEMM is the same, its columns ordered (i, j, n).
* im2col is HH*WW shifted-slice copies (never fancy indexing), and col2im is
  HH*WW shifted-slice additions (never ``np.add.at``).
* 1x1 convolutions need no im2col: the column matrix is the (strided) input
  itself in channel-major order.
* Backward of a stride-1 convolution with F <= C computes dx as a forward
  convolution of dout with the flipped, transposed kernel (an im2col copy
  and a GEMM, faster than the GEMM-then-col2im route); the other cases use
  col2im.
* Threads (``threads.set_num_threads``): the batch is cut into one
  contiguous *shard* of images per thread, and each thread runs the chunk
  loop above on its own shard, with single-threaded BLAS (``backend``'s
  docstring says why that beats a multi-threaded GEMM here). out and dx
  rows of different shards are disjoint, so they are written in place; dw
  is a sum over all images, so each shard returns its own partial dw and
  the partials are added in shard order: for a fixed thread count the
  result is the same to the bit on every run. With one thread there is one
  shard and the code path is the serial one.

``conv2d_forward_naive`` / ``conv2d_backward_naive`` loop over output
positions with the equation above written out; the tests check the fast path
against them.
"""
import numpy as np

from refimpl.backend import get_array_module
from refimpl.threads import num_workers, parallel_map, parallel_sum
from refimpl.layers.window import output_size
from refimpl.layers.winograd import winograd_conv_into, winograd_weights

# Column-matrix bytes per chunk of images: small enough to stay in the cache
# between im2col and the GEMM with every thread holding its own chunk.
# Alternating in one process (2 threads, ResNet-18 CIFAR step): 2 MiB beat
# 4 MiB by 5% at width 16 / batch 128 and 4.5% at width 64 / batch 64.
COLS_BYTES = 2 << 20
MIN_COLUMNS = 1024     # but at least this many output pixels (GEMM columns) per chunk


# The two layouts of the GEMM's columns, as permutations of (N, C, H, W):
# channel-major (C, N, H, W) and pixel-major (C, H, W, N). Both put the
# channels first (the GEMM's K = C*HH*WW rows); they differ in what the
# columns are ordered by, hence in how long the contiguous runs of an im2col
# tap copy are: W' elements channel-major, W'*N pixel-major (stride 1).
_PERM = {False: (1, 0, 2, 3), True: (1, 2, 3, 0)}
PIXEL_MAJOR_MAX_PIXELS = 256  # maps of at most 16x16 outputs use pixel-major columns
WINOGRAD_MAX_PIXELS = 64      # and 3x3 stride-1 pad-1 ones of 8x8 and less, Winograd (CPU)
WINOGRAD_DTYPES = (np.float32,)  # float64 (the oracle's dtype) keeps the direct sums
DW_FROM_DX_COLUMNS = True     # backward: dw from the columns dx's convolution built
                              # (False: dw's own im2col, the twin the tests compare)


def _pixel_major(Ho, Wo, HH, WW):
    """Whether a convolution with H' x W' outputs and an HH x WW kernel uses
    pixel-major columns.

    Why: a channel-major tap copy moves runs of W' floats, which for the 8x8
    and 4x4 maps of ResNet's last stages is too short for a copy to run at
    memory speed (2.7 ns per float at 4x4 against 0.5 at 32x32, 1 thread);
    pixel-major runs are W' * N long. Measured per chunk of images (1
    thread): im2col 1.6 -> 0.8 ms at 8x8 (C = 64) and 3.3 -> 1.5 ms at 4x4
    (C = 128), 0.88 -> 0.65 ms at 16x16; no gain at 32x32, where the
    transposing copies into and out of pixel-major order cost more. 1x1
    kernels need no im2col and keep channel-major.
    """
    return HH * WW > 1 and Ho * Wo <= PIXEL_MAJOR_MAX_PIXELS


def _winograd(x, H, W, HH, WW, stride, ph, pw):
    """Whether a convolution of x with H x W outputs runs as Winograd
    F(2x2, 3x3) (``winograd.py``): 3x3, stride 1, pad 1, on the CPU, maps of
    at most WINOGRAD_MAX_PIXELS outputs.

    Measured per chunk of images against im2col + GEMM (forward, float32, 1
    thread): 1.6x faster at 8x8 (C = 64) and 4x4 (C = 128), 1.15-1.6x at
    16x16 (C = 32-128), slower at 32x32, where the transforms' passes over
    large maps cost more than the multiplications saved. In the whole
    ResNet-18 CIFAR step (2 threads, alternating in one process) maps up to
    8x8 gave 4.34 -> 3.99 s at width 64 / batch 64 and 0.888 -> 0.862 s at
    width 16 / batch 128; adding the 16x16 maps gained nothing more (the
    weight transform, the pixel-major copies and the memory traffic of 2
    threads ate it). The GPU keeps im2col: there the multiplications are
    cheap and the passes not. So does float64, the dtype refimpl is an
    oracle in: Winograd's transforms add and subtract inputs before the
    products, which moves the rounding of an ill-conditioned sum (a BatchNorm
    bias gradient of the golden trace) by up to 2e-10 relative, and the
    golden trace and the P-rank tests hold float64 to 1e-12.
    """
    return (HH == WW == 3 and stride == 1 and ph == pw == 1 and H * W <= WINOGRAD_MAX_PIXELS
            and get_array_module(x) is np and x.dtype in WINOGRAD_DTYPES)


def _gemm_columns(a, pixel_major):
    """(N, C, H, W) -> (C, N*H*W) in the layout's column order, one copy."""
    xp = get_array_module(a)
    return xp.ascontiguousarray(a.transpose(_PERM[pixel_major])).reshape(a.shape[1], -1)


def _padded(x, ph, pw, pixel_major):
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


def _unpadded(xpad, ph, pw, H, W, pixel_major):
    """The inverse of ``_padded``: an (N, C, H, W) view of the interior."""
    if pixel_major:
        return xpad[:, ph:ph + H, pw:pw + W, :].transpose(3, 0, 1, 2)
    return xpad[:, :, ph:ph + H, pw:pw + W].transpose(1, 0, 2, 3)


def _tap(xpad, kh, kw, s, Ho, Wo, pixel_major):
    """The input pixels kernel tap (kh, kw) meets, one per output pixel:
    a view (C, N, H', W') or (C, H', W', N) of a padded input."""
    rows, cols = slice(kh, kh + s * Ho, s), slice(kw, kw + s * Wo, s)
    return xpad[:, rows, cols, :] if pixel_major else xpad[:, :, rows, cols]


def _im2col(xpad, HH, WW, stride, Ho, Wo, pixel_major=False):
    """Columns of a padded input (``_padded``).

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


def _col2im(dcols, xpad_shape, HH, WW, stride, Ho, Wo, pixel_major=False):
    """Adjoint of ``_im2col``: sum each column entry back onto its input pixel.

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


def _columns(x, HH, WW, stride, ph, pw, pixel_major=False):
    """im2col of an (N, C, H, W) input: (cols (C*HH*WW, N*H'*W'), H', W')."""
    N, C, H, W = x.shape
    Ho = (H + 2 * ph - HH) // stride + 1
    Wo = (W + 2 * pw - WW) // stride + 1
    if HH == 1 and WW == 1 and ph == 0 and pw == 0:
        # 1x1: the columns are the input itself, subsampled
        xs = x[:, :, ::stride, ::stride][:, :, :Ho, :Wo]  # (N, C, H', W')
        return _gemm_columns(xs, pixel_major), Ho, Wo
    xpad = _padded(x, ph, pw, pixel_major)
    return _im2col(xpad, HH, WW, stride, Ho, Wo, pixel_major), Ho, Wo


def _from_columns(out, N, Ho, Wo, pixel_major):
    """A GEMM result (F, N*H'*W') in the layout's column order -> an (N, F, H', W') view."""
    F = out.shape[0]
    if pixel_major:
        return out.reshape(F, Ho, Wo, N).transpose(3, 0, 1, 2)
    return out.reshape(F, N, Ho, Wo).transpose(1, 0, 2, 3)


def _conv_chunk(x, w, stride, ph, pw):
    """Convolution of a few images as one GEMM: a (N, F, H', W') view (not contiguous)."""
    N, _, H, W = x.shape
    F, C, HH, WW = w.shape
    pm = _pixel_major((H + 2 * ph - HH) // stride + 1, (W + 2 * pw - WW) // stride + 1, HH, WW)
    cols, Ho, Wo = _columns(x, HH, WW, stride, ph, pw, pm)  # (C*HH*WW, N*H'*W')
    return _gemm_conv(w, cols, N, Ho, Wo, pm)


def _gemm_conv(w, cols, N, Ho, Wo, pixel_major):
    """The convolution's GEMM on ready columns: w (F, C, HH, WW) @ cols -> an
    (N, F, H', W') view."""
    F = w.shape[0]
    return _from_columns(w.reshape(F, -1) @ cols, N, Ho, Wo, pixel_major)  # (F, N*H'*W')


def _images_per_chunk(N, C, HH, WW, Ho, Wo, itemsize):
    """How many images to push through im2col + GEMM at a time.

    Why chunks: a 3x3 column matrix is 9x the input; built for the whole
    batch it goes to DRAM and back, and the copy then costs as much as half
    the GEMM. Built for a few images at a time (COLS_BYTES) it is still in
    the cache when the GEMM reads it. At least MIN_COLUMNS output pixels per
    chunk keep each GEMM big enough to run at full speed (small late layers
    get the whole batch at once).
    """
    per_image = C * HH * WW * Ho * Wo * itemsize
    n = max(COLS_BYTES // per_image, -(-MIN_COLUMNS // (Ho * Wo)), 1)
    return int(min(n, N))


def _shards(N, threads):
    """Cut images 0..N-1 into at most ``threads`` contiguous (n0, n1) ranges.

    Contiguous and fixed by (N, threads) alone, so that which images feed
    which partial dw never depends on thread timing.
    """
    size = -(-N // threads)  # ceil(N / threads)
    return [(n0, min(n0 + size, N)) for n0 in range(0, N, size)]


def conv2d_forward(x, w, stride=1, pad=0):
    """Convolution (cross-correlation, no bias), PyTorch's ``F.conv2d``.

    Inputs:
      x: (N, C, H, W); w: (F, C, HH, WW); stride, pad: ints (same for H and W).
    Returns:
      out: (N, F, H', W'), H' = (H + 2*pad - HH) // stride + 1 (W' alike),
           out[n, f, i, j] = sum_{c,kh,kw} w[f,c,kh,kw] xpad[n, c, i*stride+kh, j*stride+kw]
      cache: (x, w, stride, pad). The column matrix is not kept: backward
             rebuilds it chunk by chunk (cheap while it sits in the cache),
             so a layer holds on to its input only, not 9x its input.
    """
    xp = get_array_module(x, w)
    N, C, H, W = x.shape
    F, Cw, HH, WW = w.shape
    if Cw != C:
        raise ValueError(f"conv2d: x has {C} channels but w expects {Cw}")
    if x.dtype != w.dtype:
        raise ValueError(f"conv2d: x is {x.dtype} but w is {w.dtype}")
    Ho, Wo = output_size("conv2d", H, W, HH, WW, stride, pad)
    out = xp.empty((N, F, Ho, Wo), dtype=x.dtype)
    shards = _shards(N, num_workers(x))
    shard_size = shards[0][1]  # the largest; no chunk is bigger, so every thread gets work
    nb = _images_per_chunk(shard_size, C, HH, WW, Ho, Wo, x.dtype.itemsize)

    U = winograd_weights(w) if _winograd(x, Ho, Wo, HH, WW, stride, pad, pad) else None

    def forward_shard(shard):
        # each thread writes only its own rows out[n0:n1]: no locking needed
        for n0 in range(shard[0], shard[1], nb):
            n1 = min(n0 + nb, shard[1])
            if U is not None:
                winograd_conv_into(out[n0:n1], x[n0:n1], U)  # (nb, F, H', W')
            else:
                out[n0:n1] = _conv_chunk(x[n0:n1], w, stride, pad, pad)  # (nb, F, H', W')

    parallel_map(forward_shard, shards)
    return out, (x, w, stride, pad)


def conv2d_backward(dout, cache, need_dx=True):
    """Gradients of ``conv2d_forward``.

    Inputs:
      dout: (N, F, H', W') upstream gradient.
      cache: from conv2d_forward.
      need_dx: False skips dx (returned as None): the first layer's input is
          the image, which needs no gradient (a GEMM and a col2im saved).
    Returns:
      dx: (N, C, H, W), dx[n,c,h,w] = sum_{f,kh,kw} w[f,c,kh,kw] dout[n,f,i,j]
          over the (i, j, kh, kw) with i*stride + kh - pad = h (w alike);
      dw: (F, C, HH, WW), dw[f,c,kh,kw] = sum_{n,i,j} dout[n,f,i,j] xpad[n,c,i*stride+kh,j*stride+kw].
    """
    xp = get_array_module(dout)
    x, w, stride, pad = cache
    N, C, H, W = x.shape
    F, _, HH, WW = w.shape
    _, _, Ho, Wo = dout.shape
    # stride 1: dx is the "full" convolution of dout with the kernel flipped
    # in space and with F and C swapped, padded by HH-1-pad. Its im2col copies
    # F*HH*WW rows where col2im would add C*HH*WW rows, so it pays when F <= C
    # (not for the 3-channel stem).
    dx_as_conv = stride == 1 and pad <= HH - 1 and pad <= WW - 1 and F <= C
    if dx_as_conv:
        w_flip = xp.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])  # (C, F, HH, WW)
        U_flip = (winograd_weights(w_flip) if _winograd(dout, H, W, HH, WW, 1, HH - 1 - pad,
                                                        WW - 1 - pad) else None)
    w_mat = w.reshape(F, C * HH * WW)
    dx = xp.empty((N, C, H, W), dtype=dout.dtype) if need_dx else None
    shards = _shards(N, num_workers(dout))
    shard_size = shards[0][1]  # the largest (the first shard starts at 0)
    nb = _images_per_chunk(shard_size, C, HH, WW, Ho, Wo, dout.dtype.itemsize)

    pm = _pixel_major(Ho, Wo, HH, WW)  # the forward's column layout
    # When dx is that convolution by im2col, its columns serve dw too:
    # cols_d[(f, kh', kw'), (n, h, w)] = dout[n, f, h + kh' - (HH-1-pad), ...]
    # and dw[f, c, kh, kw] = sum_{n,h,w} x[n, c, h, w] dout[n, f, h - kh + pad, ...],
    # so dw[f, c, kh, kw] = (cols_d @ x^T)[(f, HH-1-kh, WW-1-kw), c], x in the
    # columns' order: one copy of x instead of a second im2col (of x). The
    # same products as dw's own im2col, summed over input instead of output
    # pixels. Used with need_dx=False too (cols_d without dx's GEMM, no larger
    # than x's columns as F <= C), so that skipping dx changes no bit of dw.
    # Measured alternating in one process, ResNet-18 CIFAR step, float32:
    # width 16 / batch 128 0.865 -> 0.818 s (2 threads), 1.379 -> 1.309 s
    # (1 thread); width 64 / batch 64 3.86 -> 3.75 s.
    shared = dx_as_conv and U_flip is None and DW_FROM_DX_COLUMNS
    pm_d = _pixel_major(H, W, HH, WW)  # the column layout of dx's convolution (H x W outputs)

    def backward_shard(shard):
        """Writes dx[n0:n1] of the shard's images, returns their part of dw^T
        (or, when ``shared``, of dw flipped: (F*HH*WW, C))."""
        if shared:
            dwf_t = xp.zeros((F * HH * WW, C), dtype=dout.dtype)
            for n0 in range(shard[0], shard[1], nb):
                n1 = min(n0 + nb, shard[1])
                cols_d, _, _ = _columns(dout[n0:n1], HH, WW, 1, HH - 1 - pad, WW - 1 - pad,
                                        pm_d)  # (F*HH*WW, nb*H*W)
                if need_dx:  # dx's convolution on those columns
                    dx[n0:n1] = _gemm_conv(w_flip, cols_d, n1 - n0, H, W, pm_d)  # (nb, C, H, W)
                dwf_t += cols_d @ _gemm_columns(x[n0:n1], pm_d).T  # (F*HH*WW, C)
            return dwf_t
        dw_t = xp.zeros((C * HH * WW, F), dtype=dout.dtype)  # dw transposed, summed over chunks
        for n0 in range(shard[0], shard[1], nb):
            n1 = min(n0 + nb, shard[1])
            cols, _, _ = _columns(x[n0:n1], HH, WW, stride, pad, pad, pm)  # (C*HH*WW, nb*H'*W'), recomputed
            dout_cm = _gemm_columns(dout[n0:n1], pm)  # (F, nb*H'*W'), the same column order
            # dw^T = cols @ dout^T: OpenBLAS runs this orientation faster than
            # dout @ cols^T (the long nb*H'*W' axis is the shared one)
            dw_t += cols @ dout_cm.T  # (C*HH*WW, F)
            if not need_dx:
                continue
            if dx_as_conv and U_flip is not None:
                winograd_conv_into(dx[n0:n1], dout[n0:n1], U_flip)  # (nb, C, H, W)
            elif dx_as_conv:
                dx[n0:n1] = _conv_chunk(dout[n0:n1], w_flip, 1, HH - 1 - pad, WW - 1 - pad)  # (nb, C, H, W)
            else:
                # dcols = w^T @ dout, then scatter the columns back onto the pixels (col2im)
                dcols = w_mat.T @ dout_cm  # (C*HH*WW, nb*H'*W')
                Hp, Wp, n = H + 2 * pad, W + 2 * pad, n1 - n0
                dxpad = _col2im(dcols, (C, Hp, Wp, n) if pm else (C, n, Hp, Wp), HH, WW, stride,
                                Ho, Wo, pm)
                dx[n0:n1] = _unpadded(dxpad, pad, pad, H, W, pm)  # (nb, C, H, W)
        return dw_t

    # one partial dw per shard, added in shard order (not in the order the
    # threads finish): the same bits on every run for a given thread count
    dw_t = parallel_sum(backward_shard, shards)  # (C*HH*WW, F), or (F*HH*WW, C) flipped
    if shared:
        dw = dw_t.reshape(F, HH, WW, C)[:, ::-1, ::-1, :].transpose(0, 3, 1, 2)
        return dx, xp.ascontiguousarray(dw)  # (F, C, HH, WW)
    dw = xp.ascontiguousarray(dw_t.T).reshape(F, C, HH, WW)  # (F, C, HH, WW)
    return dx, dw


def conv2d_forward_naive(x, w, stride=1, pad=0):
    """Loop-based twin of ``conv2d_forward``: one matrix product per output pixel.

    Same inputs, outputs and equation; cache = (xpad, w, stride, pad).
    """
    xp = get_array_module(x, w)
    N, C, H, W = x.shape
    F, _, HH, WW = w.shape
    Ho = (H + 2 * pad - HH) // stride + 1
    Wo = (W + 2 * pad - WW) // stride + 1
    xpad = xp.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=x.dtype)  # (N, C, Hp, Wp)
    xpad[:, :, pad:pad + H, pad:pad + W] = x
    out = xp.zeros((N, F, Ho, Wo), dtype=x.dtype)
    for i in range(Ho):
        for j in range(Wo):
            window = xpad[:, :, i * stride:i * stride + HH, j * stride:j * stride + WW]  # (N, C, HH, WW)
            out[:, :, i, j] = window.reshape(N, -1) @ w.reshape(F, -1).T  # (N, F)
    return out, (xpad, w, stride, pad)


def conv2d_backward_naive(dout, cache):
    """Loop-based twin of ``conv2d_backward``: returns (dx, dw)."""
    xp = get_array_module(dout)
    xpad, w, stride, pad = cache
    N, C, Hp, Wp = xpad.shape
    F, _, HH, WW = w.shape
    _, _, Ho, Wo = dout.shape
    dxpad = xp.zeros_like(xpad)
    dw = xp.zeros_like(w)
    for i in range(Ho):
        for j in range(Wo):
            hs, ws = i * stride, j * stride
            window = xpad[:, :, hs:hs + HH, ws:ws + WW]  # (N, C, HH, WW)
            # each output pixel spreads its gradient over its own input window
            dxpad[:, :, hs:hs + HH, ws:ws + WW] += (dout[:, :, i, j] @ w.reshape(F, -1)).reshape(N, C, HH, WW)
            dw += (dout[:, :, i, j].T @ window.reshape(N, -1)).reshape(F, C, HH, WW)
    dx = dxpad[:, :, pad:Hp - pad, pad:Wp - pad]  # (N, C, H, W)
    return dx, dw
