# %% [markdown]
# # 02 · Turn a convolution into one matrix product, and its backward into two
#
# **You will learn** how im2col turns a 2-D convolution into a single GEMM,
# why its backward is one GEMM for the weights plus one GEMM and a col2im
# (the adjoint of im2col) for the input, and how refimpl's fast path is
# checked against the plain loop.
#
# **You need** NumPy and refimpl. Run `python tutorials/02_conv_as_matmul.py`.
#
# ## The equation
#
# x (N, C, H, W), w (F, C, HH, WW), zero padding `pad`, stride `s`:
#
#     H' = (H + 2 pad - HH) // s + 1            (W' alike)
#     out[n, f, i, j] = Σ_{c, kh, kw} w[f, c, kh, kw] · xpad[n, c, i·s + kh, j·s + kw]
#
# This is a cross-correlation (no kernel flip), PyTorch's `F.conv2d`.

# %%
import numpy as np

from refimpl.layers.conv import (conv2d_backward, conv2d_backward_naive,
                                 conv2d_forward, conv2d_forward_naive)

rng = np.random.default_rng(0)
N, C, H, W = 2, 3, 5, 5
F, HH, WW, s, pad = 4, 3, 3, 2, 1
x = rng.standard_normal((N, C, H, W))                # float64
w = rng.standard_normal((F, C, HH, WW))
Ho, Wo = (H + 2 * pad - HH) // s + 1, (W + 2 * pad - WW) // s + 1
print(f"x {x.shape}  w {w.shape}  ->  out ({N}, {F}, {Ho}, {Wo})")

# %% [markdown]
# ## im2col: one column per output pixel
#
# Every output pixel (n, i, j) reads one C x HH x WW window. Lay each window
# out as a column and the convolution becomes `w.reshape(F, C*HH*WW) @ cols`.
# Here with plain loops, to see the index map; refimpl builds the same matrix
# with HH*WW strided slice copies instead.

# %%
xpad = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))          # (N, C, H+2p, W+2p)
cols = np.empty((C * HH * WW, N * Ho * Wo))                          # (C*HH*WW, N*H'*W')
for n in range(N):
    for i in range(Ho):
        for j in range(Wo):
            window = xpad[n, :, i * s:i * s + HH, j * s:j * s + WW]  # (C, HH, WW)
            cols[:, (n * Ho + i) * Wo + j] = window.ravel()
out_gemm = (w.reshape(F, -1) @ cols)                                 # (F, N*H'*W')
out_gemm = out_gemm.reshape(F, N, Ho, Wo).transpose(1, 0, 2, 3)      # (N, F, H', W')

out_fast, cache = conv2d_forward(x, w, stride=s, pad=pad)
out_loop, cache_loop = conv2d_forward_naive(x, w, stride=s, pad=pad)
err_gemm = float(np.abs(out_gemm - out_loop).max())
err_fast = float(np.abs(out_fast - out_loop).max())
print(f"cols {cols.shape}: |GEMM - loop| = {err_gemm:.1e}, |refimpl fast - loop| = {err_fast:.1e}")
# 27-term sums of values up to ~14 in another order: 2 * 27 u * sqrt(27) * 14 = 4e-13
assert err_gemm < 1e-12 and err_fast < 1e-12

# %% [markdown]
# ## The backward: two GEMMs and a col2im
#
# With `dout` reshaped to (F, N*H'*W') like the GEMM's output:
#
#     dw    = dout @ cols^T                    -> reshape to (F, C, HH, WW)
#     dcols = w^T @ dout                       (C*HH*WW, N*H'*W')
#     dx    = col2im(dcols)                    add every column entry back onto
#                                              the input pixel it was copied from
#
# col2im must *add*: with stride < kernel the windows overlap, and a pixel
# copied into several columns collects a gradient from each of them.

# %%
dout = rng.standard_normal(out_fast.shape)                           # random upstream gradient
dout_mat = dout.transpose(1, 0, 2, 3).reshape(F, -1)                 # (F, N*H'*W')
dw_gemm = (dout_mat @ cols.T).reshape(w.shape)                       # (F, C, HH, WW)
dcols = w.reshape(F, -1).T @ dout_mat                                # (C*HH*WW, N*H'*W')
dxpad = np.zeros_like(xpad)
for n in range(N):
    for i in range(Ho):
        for j in range(Wo):
            dxpad[n, :, i * s:i * s + HH, j * s:j * s + WW] += \
                dcols[:, (n * Ho + i) * Wo + j].reshape(C, HH, WW)
dx_gemm = dxpad[:, :, pad:pad + H, pad:pad + W]                      # drop the padding

dx_fast, dw_fast = conv2d_backward(dout, cache)
dx_loop, dw_loop = conv2d_backward_naive(dout, cache_loop)
errs = {"dx gemm": np.abs(dx_gemm - dx_loop).max(), "dw gemm": np.abs(dw_gemm - dw_loop).max(),
        "dx fast": np.abs(dx_fast - dx_loop).max(), "dw fast": np.abs(dw_fast - dw_loop).max()}
print("  ".join(f"{k}: {float(v):.1e}" for k, v in errs.items()))
assert max(errs.values()) < 1e-12  # sums of <= 27 terms of values up to ~8, as above

# %% [markdown]
# ## And against finite differences
#
# The loop and the GEMM could share a mistake in the index map, so the last
# word goes to centered differences of sum(out * dout), one weight at a time.

# %%
h = 1e-6
dw_num = np.zeros_like(w)
for idx in np.ndindex(w.shape):
    wp, wm = w.copy(), w.copy()
    wp[idx] += h
    wm[idx] -= h
    fp = np.sum(conv2d_forward(x, wp, s, pad)[0] * dout)
    fm = np.sum(conv2d_forward(x, wm, s, pad)[0] * dout)
    dw_num[idx] = (fp - fm) / (2 * h)
err = float(np.abs(dw_fast - dw_num).max() / np.abs(dw_num).max())
print(f"dw vs finite differences: max relative error {err:.1e}")
# h = 1e-6: rounding ~20 u F / h with F = Σ|out·dout| = 20 max|dw| here: 4.4e-8
# (tests/tolerances.py, fd_bound); the truncation h^2 is 1e-12
assert err < 1e-7

# %% [markdown]
# ## Try on your own
#
# - Set `s = 1`: the windows overlap more; what happens to `cols.shape`?
# - A 1x1 convolution needs no im2col at all: its columns are the input
#   itself. Check `conv2d_forward(x, w1)` with `w1` of shape (F, C, 1, 1)
#   against `np.einsum("fc,nchw->nfhw", w1[:, :, 0, 0], x)`.
# - `benchmarks/bench_conv.py` compares the fast path with PyTorch per layer.
