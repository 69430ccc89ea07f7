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
benchmarks/bench_conv.py measures them against PyTorch, docs/benchmarks.md
has the figures):

* The batch is processed a few images at a time (``_images_per_chunk``): the
  column matrix of a 3x3 conv is 9x its input, and built for a whole batch it
  makes a round trip through DRAM that costs as much as half the GEMM. A
  chunk's columns (about COLS_BYTES) are still in the cache when the GEMM
  reads them. Backward rebuilds them the same way, so the cache keeps only
  x and w (not 9x x).
* A chunk's column matrix (``im2col.py``: (C*HH*WW, n*H'*W'), channel-major
  or, for maps of at most 16x16 outputs, pixel-major, as ``_pixel_major``
  says why) feeds one GEMM ``w (F, C*HH*WW) @ cols``; its result goes into
  out[n0:n1] (N, F, H', W') by one block copy. Small 3x3 maps of float32 on
  the CPU use Winograd instead (``_winograd``, ``winograd.py``).
* Backward, chunk by chunk (the ``_dx_*`` and ``_dw_*`` functions each say
  when they are taken and why): a stride-1 convolution with F <= C computes
  dx as a forward convolution of dout with the flipped, transposed kernel,
  by Winograd on the maps ``_winograd`` takes, else by an im2col of dout
  whose columns serve dw too; every other case computes dw from x's own
  im2col and dx by col2im.
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
from refimpl.layers.im2col import col2im, columns, from_columns, gemm_columns, unpadded
from refimpl.layers.window import output_size
from refimpl.layers.winograd import winograd_conv_into, winograd_weights

# Column-matrix bytes per chunk of images: small enough to stay in the cache
# between im2col and the GEMM with every thread holding its own chunk (the
# chunk sizes compared: docs/benchmarks.md).
COLS_BYTES = 2 << 20
MIN_COLUMNS = 1024     # but at least this many output pixels (GEMM columns) per chunk

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
    memory speed; pixel-major runs are W' * N long. It pays up to 16x16
    maps; at 32x32 the transposing copies into and out of pixel-major order
    cost more than they save (docs/benchmarks.md). 1x1 kernels need no
    im2col and keep channel-major.
    """
    return HH * WW > 1 and Ho * Wo <= PIXEL_MAJOR_MAX_PIXELS


def _winograd(x, H, W, HH, WW, stride, ph, pw):
    """Whether a convolution of x with H x W outputs runs as Winograd
    F(2x2, 3x3) (``winograd.py``): 3x3, stride 1, pad 1, on the CPU, maps of
    at most WINOGRAD_MAX_PIXELS outputs.

    Why: F(2x2, 3x3) makes 16 products where im2col + GEMM makes 36, which
    wins on small maps; on large ones (32x32) the transforms' passes over the
    maps cost more than the multiplications saved, and in a whole ResNet
    step the 16x16 maps gained nothing more than the 8x8 and smaller ones
    (the weight transform, the pixel-major copies and the memory traffic of
    the threads eat it; figures: docs/benchmarks.md). The GPU keeps im2col:
    there the multiplications are cheap and the passes not. So does float64,
    the dtype refimpl is an oracle in: Winograd's transforms add and subtract
    inputs before the products, which moves the rounding of an
    ill-conditioned sum (a BatchNorm bias gradient of the golden trace) by up
    to 2e-10 relative, and the golden trace and the P-rank tests hold
    float64 to 1e-12.
    """
    return (HH == WW == 3 and stride == 1 and ph == pw == 1 and H * W <= WINOGRAD_MAX_PIXELS
            and get_array_module(x) is np and x.dtype in WINOGRAD_DTYPES)


def _conv_chunk(x, w, stride, ph, pw):
    """Convolution of a few images as one GEMM: a (N, F, H', W') view (not contiguous)."""
    N, _, H, W = x.shape
    F, C, HH, WW = w.shape
    pm = _pixel_major((H + 2 * ph - HH) // stride + 1, (W + 2 * pw - WW) // stride + 1, HH, WW)
    cols, Ho, Wo = columns(x, HH, WW, stride, ph, pw, pm)  # (C*HH*WW, N*H'*W')
    return _gemm_conv(w, cols, N, Ho, Wo, pm)


def _gemm_conv(w, cols, N, Ho, Wo, pixel_major):
    """The convolution's GEMM on ready columns: w (F, C, HH, WW) @ cols -> an
    (N, F, H', W') view."""
    F = w.shape[0]
    return from_columns(w.reshape(F, -1) @ cols, N, Ho, Wo, pixel_major)  # (F, N*H'*W')


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


def _dx_dw_from_dout_columns(dx, x, dout, w_flip, pad, pixel_major):
    """Stride 1, F <= C, no Winograd: dout's im2col serves dx's GEMM and dw (no im2col of x)."""
    C, F, HH, WW = w_flip.shape
    n, _, H, W = x.shape
    # dx is the convolution of dout with w_flip on these columns:
    # cols_d[(f, kh', kw'), (n, h, w)] = dout[n, f, h + kh' - (HH-1-pad), ...]
    # and dw[f, c, kh, kw] = sum_{n,h,w} x[n, c, h, w] dout[n, f, h - kh + pad, ...],
    # so dw[f, c, kh, kw] = (cols_d @ x^T)[(f, HH-1-kh, WW-1-kw), c], x in the
    # columns' order: one copy of x instead of a second im2col (of x). The
    # same products as dw's own im2col, summed over input instead of output
    # pixels. Used with dx None too (cols_d without dx's GEMM, no larger than
    # x's columns as F <= C), so that skipping dx changes no bit of dw.
    cols_d, _, _ = columns(dout, HH, WW, 1, HH - 1 - pad, WW - 1 - pad,
                           pixel_major)  # (F*HH*WW, n*H*W)
    if dx is not None:
        dx[...] = _gemm_conv(w_flip, cols_d, n, H, W, pixel_major)  # (n, C, H, W)
    return cols_d @ gemm_columns(x, pixel_major).T  # (F*HH*WW, C): dw flipped, transposed


def _dw_from_x_columns(x, dout_cm, HH, WW, stride, pad, pixel_major):
    """Every other case: dw^T from x's own im2col, rebuilt in the forward's column layout."""
    cols, _, _ = columns(x, HH, WW, stride, pad, pad, pixel_major)  # (C*HH*WW, n*H'*W')
    # dw^T = cols @ dout^T: OpenBLAS runs this orientation faster than
    # dout @ cols^T (the long n*H'*W' axis is the shared one)
    return cols @ dout_cm.T  # (C*HH*WW, F)


def _dx_by_winograd(dx, dout, U_flip):
    """Stride 1, F <= C on a map ``_winograd`` takes: dx by Winograd, fewer products than im2col."""
    winograd_conv_into(dx, dout, U_flip)  # (n, C, H, W)


def _dx_by_flipped_conv(dx, dout, w_flip, pad):
    """Stride 1, F <= C, DW_FROM_DX_COLUMNS off: dx as a convolution, F*HH*WW rows, not C*HH*WW."""
    _, _, HH, WW = w_flip.shape
    dx[...] = _conv_chunk(dout, w_flip, 1, HH - 1 - pad, WW - 1 - pad)  # (n, C, H, W)


def _dx_by_col2im(dx, dout_cm, w_mat, HH, WW, stride, pad, Ho, Wo, pixel_major):
    """Stride > 1 or F > C (the stem): dx is no cheaper convolution; w^T @ dout, then col2im."""
    n, C, H, W = dx.shape
    # dcols = w^T @ dout, then scatter the columns back onto the pixels (col2im)
    dcols = w_mat.T @ dout_cm  # (C*HH*WW, n*H'*W'); w_mat = w as (F, C*HH*WW)
    Hp, Wp = H + 2 * pad, W + 2 * pad
    dxpad = col2im(dcols, (C, Hp, Wp, n) if pixel_major else (C, n, Hp, Wp), HH, WW, stride,
                   Ho, Wo, pixel_major)
    dx[...] = unpadded(dxpad, pad, pad, H, W, pixel_major)  # (n, C, H, W)


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
    w_flip = U_flip = None
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
    shared = dx_as_conv and U_flip is None and DW_FROM_DX_COLUMNS
    pm_d = _pixel_major(H, W, HH, WW)  # the column layout of dx's convolution (H x W outputs)

    def backward_shard(shard):
        """Writes dx[n0:n1] of the shard's images, returns their part of dw^T
        (or, when ``shared``, of dw flipped: (F*HH*WW, C))."""
        part = xp.zeros((F * HH * WW, C) if shared else (C * HH * WW, F), dtype=dout.dtype)
        for n0 in range(shard[0], shard[1], nb):
            n1 = min(n0 + nb, shard[1])
            dx_chunk = dx[n0:n1] if need_dx else None  # (nb, C, H, W), written in place
            if shared:
                part += _dx_dw_from_dout_columns(dx_chunk, x[n0:n1], dout[n0:n1], w_flip, pad,
                                                 pm_d)
                continue
            dout_cm = gemm_columns(dout[n0:n1], pm)  # (F, nb*H'*W'), the columns' order
            part += _dw_from_x_columns(x[n0:n1], dout_cm, HH, WW, stride, pad, pm)
            if dx_chunk is None:
                continue
            if U_flip is not None:
                _dx_by_winograd(dx_chunk, dout[n0:n1], U_flip)
            elif dx_as_conv:
                _dx_by_flipped_conv(dx_chunk, dout[n0:n1], w_flip, pad)
            else:
                _dx_by_col2im(dx_chunk, dout_cm, w_mat, HH, WW, stride, pad, Ho, Wo, pm)
        return part

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
