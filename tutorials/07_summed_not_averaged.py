# %% [markdown]
# # 07 · Sum the gradients, do not average them: refimpl's scale vs DDP's and Partial FC's
#
# **You will learn** refimpl's gradient-scale convention (the loss is the
# mean over the *global* batch, each rank's backward gives the gradient of
# its share of that mean, and the ranks **sum**), the two other conventions
# you will meet (PyTorch DDP; Partial FC, the model-parallel classifier of
# insightface's arcface_torch), why all three reach the same gradient, and
# what happens when two of them are mixed: every gradient is off by exactly
# a factor P. This is the first thing to map when you use refimpl as the
# oracle of your own implementation.
#
# **You need** refimpl. Run `python tutorials/07_summed_not_averaged.py`. It
# runs P = 4 ranks as a loop in one process, so that every rank's gradient
# can be printed next to the others'.
#
# ## The equations
#
# Global batch of B rows, P ranks, $b = B/P$ rows each, $R_r$ the rows of
# rank r, $\ell_i$ the loss of row i, $\theta$ the replicated encoder + head:
#
# $$L = \frac{1}{B}\sum_{i=1}^{B} \ell_i
#    = \sum_{r=1}^{P} \underbrace{\frac{1}{B}\sum_{i \in R_r} \ell_i}
#      _{L_r\ \text{(rank r's share)}},
#   \qquad
#   \nabla_\theta L = \sum_r \nabla_\theta L_r \quad\text{(refimpl: SUM)}$$
#
# DDP: each rank's loss is the mean over its *own* rows,
# $L^{\mathrm{DDP}}_r = \frac{1}{b}\sum_{i \in R_r}\ell_i = P\,L_r$, and the
# gradients are averaged:
#
# $$\frac{1}{P}\sum_r \nabla_\theta L^{\mathrm{DDP}}_r
#   = \frac{1}{P}\sum_r P\,\nabla_\theta L_r = \nabla_\theta L .$$
#
# Partial FC: the loss on every rank is the global mean L (its distributed
# cross-entropy divides by the gathered batch size), the backward of its
# feature all-gather sums the feature gradients over the ranks and then
# multiplies them by the world size (`grad_out *= len(grad_list)` in
# `AllGatherFunc.backward` of insightface's
# `recognition/arcface_torch/partial_fc_v2.py`: "cooperate with distributed
# loss function"), so the encoder's gradient on
# rank r is $P\,\nabla_\theta L_r$, and DDP, which wraps the encoder, averages
# it back to $\nabla_\theta L$. The classifier's shard is not under DDP: its
# gradient is that of L, as in refimpl.

# %%
import numpy as np

from refimpl.backend import rng
from refimpl.models import build_model
from refimpl.oracle import scaled_error
from refimpl.parallel import SelfComm, cosine_softmax_backward, cosine_softmax_forward

P, N, D, B, tau = 4, 50, 16, 16, 0.15
b = B // P
g = rng(0, "tutorial 07")
images = g.standard_normal((B, 3, 16, 16))            # the global batch, float64
labels = g.permutation(N)[:B]                         # (B,) instance ids
W = g.standard_normal((N, D))                         # the whole classifier, (N, D)
net = build_model("resnet18", stem="cifar", width=2, head_hidden=8, dim=D,
                  dtype=np.float64, seed=0)
one = SelfComm()                                      # the ranks are a loop below
rows = [slice(r * b, (r + 1) * b) for r in range(P)]


def encoder_gradient(x, dz):
    """Rank-local backward: forward x (BatchNorm on this rank's rows), backward dz."""
    net.store.zero_grad()
    net.forward(x, train=True)                        # (b, D); its caches for backward
    net.backward(dz)
    return net.store.grad.copy()                      # (G,)


# Every rank's features, each rank's BatchNorm on its own b rows ("local" BN).
z = np.concatenate([net.forward(images[s], train=True) for s in rows])  # (B, D)
print(f"P = {P} ranks, global batch B = {B}, b = {b} rows per rank, N = {N} classes, "
      f"G = {net.store.data.size} encoder + head parameters")

# %% [markdown]
# ## refimpl: each rank the gradient of its share of the global mean, then SUM
#
# The classifier's loss is the mean over the B rows of the global batch, so
# its feature gradient $dz$ already carries the $1/B$. Rank r back-propagates
# its own b rows of $dz$: that is $\nabla_\theta L_r$. The all-reduce adds them.

# %%
loss, _, cache = cosine_softmax_forward(z, labels, W, one, N, tau)   # global mean
dz, dW = cosine_softmax_backward(1.0, cache)                         # (B, D), (N, D)
g_refimpl = [encoder_gradient(images[s], dz[s]) for s in rows]       # each rank's (G,)
summed = np.sum(g_refimpl, axis=0)                                   # all_reduce SUM
print(f"global mean loss {float(loss):.6f}")
for r in range(P):
    print(f"  rank {r}: |grad L_r| = {np.linalg.norm(g_refimpl[r]):.6f}")
print(f"refimpl, summed:          |grad L| = {np.linalg.norm(summed):.12f}")

# %% [markdown]
# ## DDP: each rank the gradient of its own mean, then AVERAGE
#
# In DDP every rank holds the whole classifier and its loss is
# `F.cross_entropy` over its own b rows: a mean over b, not B. Here that is
# `cosine_softmax_forward` on the rank's rows alone and the whole W. Its
# feature gradient is P times refimpl's, so each rank's gradient is too, and
# the average brings it back.

# %%
g_ddp, dW_ddp, losses_ddp = [], [], []
for r, s in enumerate(rows):
    loss_r, _, cache_r = cosine_softmax_forward(z[s], labels[s], W, one, N, tau)  # own mean
    dz_r, dW_r = cosine_softmax_backward(1.0, cache_r)
    g_ddp.append(encoder_gradient(images[s], dz_r))
    dW_ddp.append(dW_r)
    losses_ddp.append(float(loss_r))
    print(f"  rank {r}: loss over its own {b} rows {float(loss_r):.6f}, "
          f"|grad| = {np.linalg.norm(g_ddp[r]):.6f} "
          f"= {np.linalg.norm(g_ddp[r]) / np.linalg.norm(g_refimpl[r]):.12f} x refimpl's")
averaged = np.mean(g_ddp, axis=0)                                    # DDP's all-reduce AVG
mean_of_means = np.mean(losses_ddp)
print(f"the mean of the {P} own-row losses, {mean_of_means:.6f}, is the global mean loss "
      f"(equal batches)")
err_ddp = scaled_error(averaged, summed)
err_ddp_W = scaled_error(np.mean(dW_ddp, axis=0), dW)
print(f"DDP, averaged:            |grad L| = {np.linalg.norm(averaged):.12f}  "
      f"(vs refimpl {err_ddp:.1e}; W's gradient, averaged too: {err_ddp_W:.1e})")

# %% [markdown]
# ## Partial FC: the global mean, times P in the all-gather's backward, then AVERAGE
#
# Every rank computes the global mean loss over its shard of classes; the
# sum over the shards of the feature gradient is refimpl's reduce-scatter,
# giving $dz$ of the global mean for the rank's rows. The all-gather's
# backward then multiplies by P, and DDP averages the encoder's gradients.

# %%
g_pfc = [encoder_gradient(images[s], P * dz[s]) for s in rows]      # grad_out *= P
pfc = np.mean(g_pfc, axis=0)                                         # DDP's AVG
err_pfc = scaled_error(pfc, summed)
print(f"Partial FC, x P then averaged: |grad L| = {np.linalg.norm(pfc):.12f}  "
      f"(vs refimpl {err_pfc:.1e})")

# %% [markdown]
# ## Mixing two conventions: the factor P
#
# Each convention is right on its own. The bug is taking one side's
# per-rank gradients and the other side's reduction: refimpl's shares
# averaged (as if they were DDP's), or DDP's (or Partial FC's scaled)
# gradients summed (as if they were refimpl's).

# %%
mixes = {
    "refimpl's shares, averaged": np.mean(g_refimpl, axis=0),
    "DDP's own-mean gradients, summed": np.sum(g_ddp, axis=0),
    "Partial FC's x P gradients, summed": np.sum(g_pfc, axis=0),
}
factors = {}
for name, wrong in mixes.items():
    factors[name] = np.linalg.norm(wrong) / np.linalg.norm(summed)
    direction = scaled_error(wrong / factors[name], summed)
    print(f"{name:36s} = {factors[name]:.12f} x the right gradient "
          f"(same direction: {direction:.1e})")

# %% [markdown]
# A factor P on the gradient is not a harmless learning-rate change: SGD's
# weight decay term $wd\cdot\theta$ and momentum are not scaled with it, so
# the trajectory differs, and a run on P ranks no longer equals a run on 1.
#
# ## How to compare your implementation with refimpl
#
# | your implementation | per-rank gradient, before the all-reduce | after it |
# |---|---|---|
# | refimpl | $\nabla L_r$ | SUM: $\nabla L$ |
# | DDP, replicated classifier | $P\,\nabla L_r$ (divide by P to compare) | AVG: $\nabla L$ |
# | Partial FC, encoder | $P\,\nabla L_r$ (all-gather backward; divide by P) | AVG: $\nabla L$ |
# | Partial FC, classifier shard | $\nabla_{W_r} L$, as refimpl's | none |
#
# The feature gradient follows the same rule: refimpl's `dz` of a rank is
# the gradient of the global mean, DDP's and Partial FC's are P times it.
# Compare the reduced gradients (or the updated weights) and the two sides
# must agree to float rounding; a clean factor of P (or 1/P) in
# `refimpl.oracle.scaled_error`'s report means a convention, not a bug in
# a layer.

# %%
# the same gradient summed over ranks in other orders, scaled by powers of 2 (exact)
assert err_ddp < 1e-12 and err_ddp_W < 1e-12 and err_pfc < 1e-12
assert abs(mean_of_means - float(loss)) < 1e-12
for r in range(P):  # P x the same numbers: norms of ~100 terms, a few roundings apart
    assert abs(np.linalg.norm(g_ddp[r]) / np.linalg.norm(g_refimpl[r]) - P) < 1e-9
assert abs(factors["refimpl's shares, averaged"] - 1 / P) < 1e-12
assert abs(factors["DDP's own-mean gradients, summed"] - P) < 1e-12
assert abs(factors["Partial FC's x P gradients, summed"] - P) < 1e-12
print(f"all three conventions give the same gradient; mixing two is off by exactly "
      f"P = {P} or 1/P")

# %% [markdown]
# ## Try on your own
#
# - Set P = 1: all conventions coincide and no mix can be caught. This is why
#   the parallel tests of refimpl run P = 2, 3, 4 with a negative control
#   that averages instead of summing (`tests/mpi_worker.py`, `AveragingComm`).
# - Give the ranks different numbers of rows (b_r): DDP's average of
#   own-row means is then no longer the global mean at all, while refimpl's
#   sum of shares still is. (refimpl refuses uneven local batches: B must be
#   divisible by P.)
# - In `tutorials/04_oracle_for_your_pytorch_block.py`, multiply the PyTorch
#   loss by P: every gradient's error jumps to exactly P - 1.
