# %% [markdown]
# # 01 · Derive BatchNorm's backward and check it
#
# **You will learn** why BatchNorm's input gradient has three terms, how
# they fold into one line of NumPy (refimpl's `batchnorm_backward` computes
# that line in a few in-place passes), how to check any backward against
# centered finite differences, and why the check must use a *random* upstream
# gradient.
#
# **You need** NumPy and refimpl (`make test` installs both). Run it with
# `python tutorials/01_batchnorm_backward.py`.
#
# ## The equation
#
# For one channel with m values x_1..x_m (N*H*W of them in a conv net):
#
#     mean = (1/m) Σ x_i
#     var  = (1/m) Σ (x_i - mean)^2          (biased: PyTorch normalizes with it)
#     xhat = (x - mean) / sqrt(var + eps)
#     out  = gamma * xhat + beta

# %%
import numpy as np

from refimpl.layers.batchnorm import batchnorm_backward, batchnorm_forward

rng = np.random.default_rng(0)
N, C, H, W = 4, 3, 5, 5
x = rng.standard_normal((N, C, H, W)) * 2.0 + 0.5    # (N, C, H, W), float64
gamma = rng.standard_normal(C)                       # (C,) non-trivial scale
beta = rng.standard_normal(C)                        # (C,)
running_mean, running_var = np.zeros(C), np.ones(C)

out, cache, new_mean, new_var = batchnorm_forward(x, gamma, beta, running_mean,
                                                  running_var, train=True)
print("out", out.shape, "per-channel mean of out:", out.mean(axis=(0, 2, 3)).round(6))
print("(equals beta:", beta.round(6), ")")

# %% [markdown]
# ## The backward, derived
#
# x reaches the loss three ways: directly through xhat, through the mean, and
# through the variance. Summing the three paths (S1 = Σ dout, S2 = Σ dout·xhat
# over the channel's m values) gives
#
#     dx = gamma / sqrt(var + eps) * (dout - S1/m - xhat * S2/m)
#
# The two subtracted terms remove exactly the parts of dout that a shift of
# all x (absorbed by the mean) and a scaling of all x (absorbed by the
# variance) would produce. Consequence: if dout is the *same* for every value,
# dx is exactly zero. That is why a gradient check with `out.sum()` (an
# all-ones upstream gradient) proves nothing for BatchNorm.

# %%
dout = rng.standard_normal(out.shape)                # random upstream gradient
dx, dgamma, dbeta = batchnorm_backward(dout, cache)
dx_ones, _, _ = batchnorm_backward(np.ones_like(out), cache)
print("max |dx| with an all-ones upstream gradient:", float(np.abs(dx_ones).max()))
assert np.abs(dx_ones).max() < 1e-12  # 0 up to the rounding of the batch means: ~1e-15

# %% [markdown]
# ## The backward in one line
#
# With the channel's sums written as means over every axis but C, the
# formula above is one line of NumPy. refimpl's `batchnorm_backward`
# computes the same line, split into in-place passes over slices of channels
# (fewer full-size temporaries, and threads); the two agree to rounding.

# %%
axes = (0, 2, 3)                                     # every axis but C
mean = x.mean(axis=axes, keepdims=True)              # (1, C, 1, 1)
inv_std = 1 / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)   # biased variance, eps 1e-5
xhat = (x - mean) * inv_std                          # (N, C, H, W)
g = gamma.reshape(1, C, 1, 1)

dx_line = g * inv_std * (dout - dout.mean(axis=axes, keepdims=True)
                         - xhat * (dout * xhat).mean(axis=axes, keepdims=True))

err_line = float(np.abs(dx_line - dx).max() / np.abs(dx).max())
print(f"one line vs refimpl's batchnorm_backward: max relative error {err_line:.2e}")
# the same sums of m = 100 terms in another order: one layer two ways,
# 2 m^1.5 u = 2.2e-13 (tests/tolerances.py, LAYER64 = 1e-12)
assert err_line < 1e-12

# %% [markdown]
# ## The check: centered finite differences of sum(out * dout)
#
# For each element x_i: (f(x + h e_i) - f(x - h e_i)) / 2h with
# f(x) = Σ out(x) · dout. In float64 with h = 1e-6 the error is O(h^2) plus
# rounding, so agreement to ~1e-8 relative means the derivation is right.

# %%
def loss_fn(x_):
    out_, _, _, _ = batchnorm_forward(x_, gamma, beta, running_mean, running_var)
    return float(np.sum(out_ * dout))


h = 1e-6
dx_num = np.zeros_like(x)
for i in np.ndindex(x.shape):
    old = x[i]
    x[i] = old + h
    fp = loss_fn(x)
    x[i] = old - h
    fm = loss_fn(x)
    x[i] = old
    dx_num[i] = (fp - fm) / (2 * h)

err = float(np.abs(dx - dx_num).max() / np.abs(dx_num).max())
print(f"dx vs finite differences: max relative error {err:.2e}")
# h = 1e-6: each f carries ~20 u F of rounding, F = Σ|out·dout| = 168 max|dx| here, so
# 20 u F / h / max|dx| = 3.7e-7 (tests/tolerances.py, fd_bound); the truncation h^2 is 1e-12
assert err < 4e-7

# %% [markdown]
# ## PyTorch's running variance is unbiased
#
# The running variance that BatchNorm stores for evaluation uses m / (m - 1),
# although the normalization above used the biased variance. An oracle user
# comparing against another framework must map this (Keras stores the biased
# one, and its momentum is PyTorch's 1 - momentum).

# %%
m = N * H * W
batch_var = x.var(axis=(0, 2, 3))                    # biased
expected = 0.9 * 1.0 + 0.1 * batch_var * m / (m - 1)
print("running_var:", new_var.round(6), " expected:", expected.round(6))
assert np.allclose(new_var, expected, rtol=1e-12, atol=0)  # m = 100 values: 2 gamma_100 = 2e-14

# %% [markdown]
# ## Try on your own
#
# - Replace `dout` by `np.ones_like(out)` in the finite-difference check: it
#   still "passes", with dx == 0 on both sides. A check that cannot fail.
# - Pass `allreduce=lambda v: v` to both calls: synchronized BatchNorm with a
#   single rank. What changes, and what stays within 1e-12?
