"""Bilinear resampling, written once: align_corners=False, clamped to a box.

Contract. Resizing the box ``[start, start + length)`` of an axis to S
samples, output sample o reads the source coordinate

    c_o = start + (o + 0.5) (length / S) - 0.5          (align_corners=False)

clamped to ``[start, start + length - 1]``, from its two taps
``i0 = floor(c_o)`` and ``i1 = min(i0 + 1, start + length - 1)`` with weights
``1 - f`` and ``f``, ``f = c_o - i0``:

    out[o] = (1 - f_o) x[i0_o] + f_o x[i1_o]

This is PyTorch's ``F.interpolate(mode="bilinear", align_corners=False,
antialias=False)`` of the box alone (the same formula for c_o, the same
clamp): no pixel outside the box contributes, even at its edges, and a
downscale is not low-pass filtered. For an upscale it is also Pillow's
BILINEAR filter (a triangle whose window is cut at the image edge and
renormalized: the same clamp), except that Pillow rounds to 8 bits after
each of its two passes.

``bilinear_taps`` computes (i0, i1, f), the only place this maths is written.
Bilinear resampling is separable, so a 2-D resize applies the taps along
the rows, then along the columns. Two ways to apply them:

    bilinear_matrices(start, length, out_size, in_size, flip=None, dtype, device)
        -> (n, S, in_size): the taps as dense matrices R with two non-zero
        weights a row, one box per image of a batch; ``out = Ry @ x @ Rx^T``
        as batched matmuls (augment's random crops: BLAS beats a gather there)
    resize(img, out_h, out_w) -> a whole 2-D or 3-D host array, resized by
        gathering the two taps (each output is exactly the two-term sum above)

Users: ``refimpl.data.augment`` (random resized crop, on the device),
``refimpl.data.synthetic`` (background noise), ``data_tools.clutter`` and
``data_tools.digits`` (8 x 8 digits to the canvas).
"""
import numpy as np

from refimpl.backend import asarray, xp_for
from refimpl.checks import check_int


def bilinear_taps(start, length, out_size, in_size, flip=None):
    """The two taps and the weight of every output sample of n boxes (module docstring).

    start, length: int (n,) host arrays, box b is ``[start_b, start_b + length_b)``
    within ``[0, in_size)``. out_size: S. flip: None or bool (n,); a flipped
    box reads its samples in reverse order (sample o takes the coordinate of
    sample S - 1 - o), i.e. the resized box mirrored.
    Returns host arrays i0, i1 int64 (n, S) and f float64 (n, S) in [0, 1);
    at a clamped edge i0 == i1 and f == 0.
    """
    start = np.asarray(start, dtype=np.int64)
    length = np.asarray(length, dtype=np.int64)
    out_size = check_int("out_size", out_size)
    in_size = check_int("in_size", in_size)
    if start.ndim != 1 or length.shape != start.shape:
        raise ValueError(f"start and length must be 1-d of the same length, got shapes "
                         f"{start.shape} and {length.shape}")
    outside = (start < 0) | (length < 1) | (start + length > in_size)
    if outside.any():
        b = int(np.argmax(outside))
        raise ValueError(f"box {b} [{start[b]}, {start[b] + length[b]}) is empty or outside "
                         f"[0, {in_size})")
    o = np.arange(out_size, dtype=np.float64) + 0.5
    c = start[:, None] + o[None, :] * (length[:, None] / out_size) - 0.5   # (n, S)
    if flip is not None:
        flip = np.asarray(flip, dtype=bool)
        if flip.shape != start.shape:
            raise ValueError(f"flip must be bool ({start.shape[0]},), got shape {flip.shape}")
        c = np.where(flip[:, None], c[:, ::-1], c)
    last = (start + length - 1)[:, None]                                   # (n, 1)
    c = np.clip(c, start[:, None], last)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, last)
    return i0, i1, c - i0


def bilinear_matrices(start, length, out_size, in_size, flip=None, dtype=np.float64,
                      device="cpu"):
    """Bilinear sampling matrices of n boxes: (n, out_size, in_size) of ``dtype`` on ``device``.

    start, length, out_size, in_size, flip: as ``bilinear_taps``. dtype:
    float32 or float64. device: 'cpu' or 'gpu' (where the matrices are built).
    Row o of matrix b holds ``1 - f`` at column i0 and ``f`` at column i1; at
    a clamped edge it holds a single 1. ``f`` is rounded to ``dtype`` before
    ``1 - f`` is formed (on the device), so a row sums to 1 in ``dtype`` too.
    """
    i0, i1, f = bilinear_taps(start, length, out_size, in_size, flip)      # (n, S) each
    xp = xp_for(device)
    n = i0.shape[0]
    i0, i1 = asarray(i0, device=device), asarray(i1, device=device)
    f = asarray(f, device=device, dtype=dtype)
    m = xp.zeros((n, out_size, in_size), dtype=dtype)                      # (n, S, in_size)
    b, o = xp.arange(n)[:, None], xp.arange(out_size)[None, :]
    # each (b, o) appears once per assignment, so `+=` through a fancy index is
    # safe; at the clamped edge i0 == i1 and f == 0, and the row still sums to 1
    m[b, o, i0] = 1 - f
    m[b, o, i1] += f
    return m


def resize(img, out_h, out_w):
    """Bilinear resize of a whole host image: (h, w[, c]) -> (out_h, out_w[, c]).

    Rows first, then columns, each output the two-term sum
    ``(1 - f) x[i0] + f x[i1]`` of ``bilinear_taps`` (the whole axis is the
    box). Computed in the image's dtype if it is float32 or float64, else
    (e.g. uint8) in float64, with ``f`` rounded to that dtype first; the
    result is neither rounded nor clipped.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"img must be (h, w) or (h, w, c) with h, w >= 1, got shape {img.shape}")
    out_h, out_w = check_int("out_h", out_h), check_int("out_w", out_w)
    dtype = img.dtype if img.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    x = img.astype(dtype, copy=False)
    h, w = x.shape[:2]
    i0, i1, f = (t[0] for t in bilinear_taps([0], [h], out_h, h))         # (out_h,) each
    f = f.astype(dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    x = x[i0] * (1 - f) + x[i1] * f                                        # (out_h, w[, c])
    i0, i1, f = (t[0] for t in bilinear_taps([0], [w], out_w, w))         # (out_w,) each
    f = f.astype(dtype).reshape((1, -1) + (1,) * (x.ndim - 2))
    return x[:, i0] * (1 - f) + x[:, i1] * f                               # (out_h, out_w[, c])
