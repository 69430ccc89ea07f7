# %% [markdown]
# # 05 · Split an N-way softmax over P ranks with two small all-reduces
#
# **You will learn** how refimpl computes the cross-entropy of an N-way
# classifier whose rows are spread over P ranks, without any rank ever
# holding all N logits: one all-reduce of the row maxima, one of the sums of
# exponentials (and the target logit), and, in backward, one reduce-scatter
# of the feature gradient. This is rows 2-7 of docs/design.md's step table.
#
# **You need** refimpl (`make test` installs it). Run
# `python tutorials/05_sharded_softmax.py`; with MPI, also
# `mpirun -np 4 python tutorials/05_sharded_softmax.py`: every rank prints
# the same loss as the single process.
#
# ## The equations
#
# With logits l_bj = <z_hat_b, w_hat_j> / tau and rank r owning the classes
# C_r = [floor(rN/P), floor((r+1)N/P)):
#
#     m_b^r = max_{j in C_r} l_bj              local max          (B,)
#     M_b   = max_r m_b^r                      all_reduce MAX     (B,)
#     S_b   = sum_r sum_{j in C_r} exp(l_bj - M_b)   all_reduce SUM   (B,)
#     T_b   = sum_r sum_{j in C_r} y_bj l_bj         (same message)    (B,)
#     loss  = (1/B) sum_b (M_b + log S_b - T_b)
#
# Subtracting M_b keeps every exponential <= 1 (no overflow), and it is the
# same number on every rank, so the shards' sums can simply be added.

# %%
import numpy as np

from refimpl.layers.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from refimpl.layers.normalize import l2_normalize_forward
from refimpl.oracle import dense_cosine_softmax, scaled_error
from refimpl.parallel import (cosine_softmax_backward, cosine_softmax_forward, shard_range,
                              world_comm)

N, D, B, tau = 37, 8, 12, 0.15
g = np.random.default_rng(0)
W = g.standard_normal((N, D))                  # the whole classifier, (N, D)
labels = g.integers(0, N, B)                   # instance ids of the global batch, (B,)
z = W[labels] + g.standard_normal((B, D))      # features near their own rows, (B, D)

zhat, _ = l2_normalize_forward(z)              # (B, D)
what, _ = l2_normalize_forward(W)              # (N, D)
dense_logits = zhat @ what.T / tau             # (B, N): what no rank may hold at scale
dense_loss, dense_cache = softmax_cross_entropy_forward(dense_logits, labels)
print(f"dense loss over all {N} classes: {float(dense_loss):.15f}")

# %% [markdown]
# ## Forward, shard by shard
#
# Here the P "ranks" are a loop in one process, so that every number can be
# printed. Rank r only ever touches its own rows W[lo:hi].

# %%
P = 4
parts = []
for r in range(P):
    lo, hi = shard_range(N, P, r)
    logits_r = dense_logits[:, lo:hi]          # (B, N_r): what rank r computes
    parts.append((lo, hi, logits_r))
    print(f"rank {r}: classes [{lo:2d}, {hi:2d}), logits {logits_r.shape}")

M = np.max([l_r.max(axis=1) for _, _, l_r in parts], axis=0)               # all_reduce MAX
S = np.sum([np.exp(l_r - M[:, None]).sum(axis=1) for _, _, l_r in parts], axis=0)  # SUM
T = np.zeros(B)
for lo, hi, l_r in parts:                      # the owner of each label adds its logit
    own = (labels >= lo) & (labels < hi)
    T[own] += l_r[own, labels[own] - lo]
sharded_loss = np.mean(M + np.log(S) - T)
err = abs(sharded_loss - float(dense_loss)) / float(dense_loss)
print(f"sharded loss:                   {sharded_loss:.15f}  (relative error {err:.1e})")
assert err < 1e-14  # S: 37 positive terms in 4 parts, 2 gamma_37 = 8.2e-15; log(S) ~ 1

# %% [markdown]
# ## Backward: local on each shard, then one reduce-scatter
#
# The gradient of the mean loss with respect to the logits is
# (softmax - y) / B. Every rank can form its own columns of it from M and S
# alone. Its rows' gradient W_r needs nothing else. The gradient of z_hat is
# a sum over all classes, so each rank has a *partial* sum,
# dlogits_r @ W_hat_r / tau, and the ranks add them up: a reduce-scatter,
# which leaves each rank the b rows of its own local batch. (It is the
# adjoint of the all-gather that brought every rank all B features.)

# %%
dense_dlogits = softmax_cross_entropy_backward(1.0, dense_cache)       # (B, N)
dzhat = np.zeros((B, D))
for lo, hi, l_r in parts:
    dl_r = np.exp(l_r - M[:, None]) / S[:, None]                       # softmax, (B, N_r)
    own = (labels >= lo) & (labels < hi)
    dl_r[np.nonzero(own)[0], labels[own] - lo] -= 1                    # - y
    dl_r /= B
    # p / B with p <= 1, B = 12: S's 8.2e-15 and a few roundings, / 12: 7e-16
    assert np.allclose(dl_r, dense_dlogits[:, lo:hi], rtol=0, atol=1e-15)
    dzhat += dl_r @ what[lo:hi] / tau                                  # partial sums
err_dz = np.abs(dzhat - dense_dlogits @ what / tau).max()
print(f"sum of the shards' partial dz_hat vs dense: max difference {err_dz:.1e}")
assert err_dz < 1e-14  # 37 terms of total <= 2 / (B tau) = 1.1 in 4 parts: 2 gamma_37 * 1.1

# %% [markdown]
# ## The real thing: refimpl.parallel with a communicator
#
# `cosine_softmax_forward` does all of the above (and the normalizations)
# with real collectives. In one process the communicator is `SelfComm`;
# under `mpirun` it is `MPIComm(MPI.COMM_WORLD)` and each rank passes only its
# local batch and its own rows. The counters show the bytes of each
# collective, which do not depend on N. `refimpl.oracle.dense_cosine_softmax`
# is the same classifier computed densely in one process, from the layers:
# the reference every rank checks its gradients against.

# %%
comm = world_comm("05_sharded_softmax.py")   # MPIComm under mpirun, else SelfComm
b = B // comm.size
lo, hi = shard_range(N, comm.size, comm.rank)
rows = slice(comm.rank * b, (comm.rank + 1) * b)
loss, acc, cache = cosine_softmax_forward(z[rows], labels[rows], W[lo:hi], comm, N, tau,
                                          topk=(1, 5))
dz, dW = cosine_softmax_backward(1.0, cache)
ref_loss, ref_dz, ref_dW, _ = dense_cosine_softmax(z, labels, W, tau)
err_grads = max(scaled_error(dz, ref_dz[rows]), scaled_error(dW, ref_dW[lo:hi]))
print(f"rank {comm.rank} of {comm.size}: loss {float(loss):.15f}, top-1 {acc[1]:.3f}, "
      f"top-5 {acc[5]:.3f}, dz {dz.shape}, dW {dW.shape}, gradient error {err_grads:.1e}")
for op, c in comm.counters.items():
    print(f"  {op:15s} calls {c['calls']}  sent {c['sent']:5d} B  received {c['received']:5d} B")
# the classifier's blocks and the layers: sums of <= 37 terms in another order (~1e-14;
# tests/tolerances.py's LAYER64)
assert abs(float(loss) - float(dense_loss)) / float(dense_loss) < 1e-12
assert abs(ref_loss - float(dense_loss)) < 1e-12 and err_grads < 1e-12
assert comm.counters["all_gather"]["received"] == B * D * 8 + B * 8  # float64 features + labels

# %% [markdown]
# ## Try on your own
#
# - Run it under `mpirun -np 3` (uneven shards of 12, 12 and 13 classes): the
#   loss is the same to the last digits.
# - Make tau tiny (0.01) and the arrays float32: the logits reach 100 and
#   exp(100) = 2.7e43 overflows float32 (largest 3.4e38); the shift by M is
#   what keeps every exponential <= 1 and the loss finite.
# - Pass smoothed targets, `targets=refimpl.method.target_entries(labels, N,
#   neighbours, alpha=0.2)` with a neighbour table `neighbours` (N, K): T_b
#   becomes a weighted sum of K + 1 logits that may live on different ranks;
#   the same SUM all-reduce collects it.
