"""Winograd F(2x2, 3x3): a 3x3, stride-1, pad-1 convolution with 2.25x fewer multiplications.

Contract:

    U = winograd_weights(w)              # w (F, C, 3, 3) -> U (16, F, C), once per call
    winograd_conv_into(out, x, U)        # x (n, C, H, W) -> out (n, F, H, W), written in place

out equals ``conv2d_forward(x, w, stride=1, pad=1)`` up to rounding (the
tests check it against the loop-based twin at 1e-12 in float64; in float32
its error is no larger than im2col's). ``conv.py`` uses it for the stride-1
3x3 convolutions of small maps (forward, and backward's dx, which is such a
convolution with the flipped kernel); dw keeps im2col.

The algorithm (Lavin & Gray, 2016). The output is cut into 2x2 tiles; tile
(i, j) needs the 4x4 input patch d at rows 2i..2i+3, columns 2j..2j+3 of the
zero-padded input. In one dimension, two outputs of a 3-tap filter g from
four inputs take 4 multiplications instead of 6:

    y = A^T [ (G g) * (B^T d) ],    B^T = [[1, 0, -1,  0],   G = [[1,    0,   0  ],
                                           [0, 1,  1,  0],        [1/2,  1/2, 1/2],
                                           [0, -1, 1,  0],        [1/2, -1/2, 1/2],
                                           [0, 1,  0, -1]]        [0,    0,   1  ]]
                                   A^T = [[1, 1,  1,  0],
                                          [0, 1, -1, -1]]

and nested in two dimensions, Y = A^T [ (G g G^T) * (B^T d B) ] A, a 2x2 tile
from 16 products instead of 36. Summed over input channels, the 16
elementwise products become 16 matrix products, one per position (a, b) of
the 4x4 transformed tile:

    M[a, b] = U[a, b] (F, C) @ V[a, b] (C, T),   U = G w G^T,  V = B^T d B,

T = n * (H/2) * (W/2) tiles. The transforms are additions only (B and A
hold 0 and +-1), done as whole-array passes over every tile at once; the
16 GEMMs are one batched ``matmul``. Tiles are laid out pixel-major
(C, tile row, tile column, n), like conv.py's pixel-major columns. An odd H
or W gets one more zero row or column of padding, and the surplus output is
dropped.
"""
from refimpl.backend import get_array_module

def _g_rows(k0, k1, k2):
    """G applied along one axis: the 4 rows of G (g0, g1, g2)^T from a 3-tap axis."""
    return (k0, 0.5 * (k0 + k1 + k2), 0.5 * (k0 - k1 + k2), k2)


def winograd_weights(w):
    """U = G w G^T for every (filter, channel): w (F, C, 3, 3) -> (16, F, C), w's dtype.

    Index a*4 + b of the first axis is position (a, b) of the 4x4 tile.
    Written out with G's entries (a few passes over F*C*3 values), not as
    matrix products, which are far slower on these tiny matrices.
    """
    xp = get_array_module(w)
    F, C = w.shape[:2]
    wt = xp.ascontiguousarray(w.transpose(2, 3, 0, 1))               # (3, 3, F, C)
    U = xp.empty((4, 4, F, C), dtype=w.dtype)
    for a, r in enumerate(_g_rows(wt[0], wt[1], wt[2])):             # G w: 4 x (3, F, C)
        for b, v in enumerate(_g_rows(r[0], r[1], r[2])):            # (G w) G^T: (F, C)
            U[a, b] = v
    return U.reshape(16, F, C)


def _input_transform(xpad, th, tw):
    """V = B^T d B of every tile: xpad (C, Hp, Wp, n) -> (16, C, th*tw*n)."""
    xp = get_array_module(xpad)
    C, n = xpad.shape[0], xpad.shape[3]
    # d[k][l]: element (k, l) of every tile's 4x4 patch, (C, th, tw, n) views
    d = [[xpad[:, k:k + 2 * th:2, l:l + 2 * tw:2, :] for l in range(4)] for k in range(4)]
    # rows: t = B^T d, column by column
    t = [[None] * 4 for _ in range(4)]
    for l in range(4):
        t[0][l] = d[0][l] - d[2][l]
        t[1][l] = d[1][l] + d[2][l]
        t[2][l] = d[2][l] - d[1][l]
        t[3][l] = d[1][l] - d[3][l]
    # columns: V = t B, row by row, straight into the GEMMs' operand
    V = xp.empty((4, 4, C, th, tw, n), dtype=xpad.dtype)
    for a in range(4):
        xp.subtract(t[a][0], t[a][2], out=V[a, 0])
        xp.add(t[a][1], t[a][2], out=V[a, 1])
        xp.subtract(t[a][2], t[a][1], out=V[a, 2])
        xp.subtract(t[a][1], t[a][3], out=V[a, 3])
    return V.reshape(16, C, th * tw * n)


def winograd_conv_into(out, x, U):
    """out[...] = conv2d(x, w, stride=1, pad=1), with U = winograd_weights(w).

    x (n, C, H, W); out (n, F, H, W), any strides (a slice of a bigger batch).
    """
    xp = get_array_module(x)
    n, C, H, W = x.shape
    F = U.shape[1]
    th, tw = -(-H // 2), -(-W // 2)                                  # tiles per column, row
    xpad = xp.zeros((C, 2 * th + 2, 2 * tw + 2, n), dtype=x.dtype)   # pixel-major, padded
    xpad[:, 1:1 + H, 1:1 + W, :] = x.transpose(1, 2, 3, 0)
    V = _input_transform(xpad, th, tw)                               # (16, C, T)
    M = xp.matmul(U, V).reshape(4, 4, F, th, tw, n)                  # 16 GEMMs (F, C) @ (C, T)
    # Y = A^T M A: first the rows (s = A^T M), then the columns
    s = (M[0] + M[1] + M[2], M[1] - M[2] - M[3])                     # each (4, F, th, tw, n)
    for i in range(2):
        for j, y in enumerate((s[i][0] + s[i][1] + s[i][2], s[i][1] - s[i][2] - s[i][3])):
            # y: output (2 * tile row + i, 2 * tile column + j) of every tile
            rows, cols = len(range(i, H, 2)), len(range(j, W, 2))
            out[:, :, i::2, j::2] = y[:, :rows, :cols, :].transpose(3, 0, 1, 2)
