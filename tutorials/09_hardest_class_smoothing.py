# %% [markdown]
# # 09 · Smooth the labels over the hardest classes: find them across shards, see what they do
#
# **You will learn** how refimpl finds, for every class, the K classes whose
# rows of W are most similar to its own when W is split over P ranks (the
# shards travel once around a ring and each rank keeps a running top-K),
# what the smoothed target of one instance looks like, and what the
# smoothing does to the gradient of its neighbours' rows: a weaker push, or
# even a pull, where plain instance classification pushes every other class
# away.
#
# **You need** refimpl. Run `python tutorials/09_hardest_class_smoothing.py`,
# then `mpirun -np 3 python tutorials/09_hardest_class_smoothing.py` (from
# the venv: `.venv/bin/mpirun -np 3 .venv/bin/python ...`; as root add
# `--allow-run-as-root`): the ring then runs between 3 real ranks, and
# every rank prints the neighbour table and the losses of the single process.
#
# ## The equations
#
# For class i, its hardest classes are the K others whose rows are nearest
# in cosine (ties: the lower id first), and its target spreads $\alpha$ over
# them:
#
# $$N_K(i) = \underset{j \ne i}{\operatorname{top-}K}\ \langle \hat w_i, \hat w_j \rangle,
#   \qquad
#   y_i = (1 - \alpha)\, e_i + \frac{\alpha}{K} \sum_{j \in N_K(i)} e_j .$$
#
# The gradient of the cross-entropy with respect to the logit of class j is
# $p_j - y_{ij}$ (divided by B). One-hot: $p_j > 0$ for every $j \ne i$,
# so every other row is pushed away from the instance's feature. Smoothed:
# for a neighbour the push shrinks to $p_j - \alpha/K$, and turns into a pull
# where $p_j < \alpha/K$.

# %%
import numpy as np

from refimpl.backend import rng
from refimpl.layers.normalize import l2_normalize_forward
from refimpl.method import dense_hardest_neighbours, hardest_neighbours, target_entries
from refimpl.parallel import (CosineClassifier, SelfComm, cosine_softmax_backward,
                              cosine_softmax_forward, shard_range, shard_softmax, world_comm)

world = world_comm("09_hardest_class_smoothing.py")   # MPIComm under mpirun, else SelfComm


def say(*args):
    """Rank 0 speaks for everyone."""
    if world.rank == 0:
        print(*args, flush=True)


N, D, K, tau, alpha, P = 12, 3, 3, 0.15, 0.2, 3    # P: the ring drawn below
g = rng(5, "tutorial 09")
W = np.round(g.standard_normal((N, D)), 1)         # the whole classifier, small enough to print
What, _ = l2_normalize_forward(W)                  # (N, D) unit rows
say("W, and the rank that owns each row when 3 ranks share it:")
for i in range(N):
    owner = next(q for q in range(P) if shard_range(N, P, q)[0] <= i < shard_range(N, P, q)[1])
    say(f"  class {i:2d}: w = {W[i]}  rank {owner}")

# %% [markdown]
# ## The ring, by hand
#
# Rank r keeps its own normalized rows. In step s of the ring it holds the
# rows of rank $(r - s) \bmod P$ (its own first), scores its rows against
# them (an $N_r \times N_s$ tile of cosines, its own class excluded), and
# merges the tile into its running top-K, ordered by similarity, then id.
# Then every rank passes the shard it holds to rank $r + 1$ and receives the
# one of rank $r - 1$. After P steps every rank has seen every shard once;
# nobody ever held the $N \times N$ matrix or more than two shards.
#
# Here the 3 ranks are a loop in one process, so that rank 0's running top-K
# can be printed after each step.


# %%
def merge(best_sim, best_id, tile, tile_ids, k):
    """Per row, the k best of (current best, new tile): similarity descending, id ascending."""
    sims = np.concatenate([best_sim, tile], axis=1)                      # (R, k + C)
    ids = np.concatenate([best_id, np.broadcast_to(tile_ids, tile.shape)], axis=1)
    order = np.lexsort((ids, -sims), axis=1)[:, :k]                      # (R, k)
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


shards = [shard_range(N, P, q) for q in range(P)]
best = [(np.full((hi - lo, K), -np.inf), np.full((hi - lo, K), N)) for lo, hi in shards]
for step in range(P):
    say(f"ring step {step}: " + ", ".join(
        "rank {} holds rows [{}, {})".format(q, *shards[(q - step) % P]) for q in range(P)))
    for q, (lo, hi) in enumerate(shards):
        s_lo, s_hi = shards[(q - step) % P]                              # the travelling shard
        tile = What[lo:hi] @ What[s_lo:s_hi].T                           # (N_q, N_s) cosines
        cols = np.arange(s_lo, s_hi)
        tile[np.arange(lo, hi)[:, None] == cols[None, :]] = -np.inf      # j != i
        best[q] = merge(*best[q], tile, cols, K)
    for row in range(shards[0][1] - shards[0][0]):
        sims, ids = best[0][0][row], best[0][1][row]
        say(f"    rank 0, class {row}: running top-{K} " + "  ".join(
            f"{j}({s:+.3f})" if np.isfinite(s) else "-" for j, s in zip(ids, sims)))
by_hand = np.concatenate([ids for _, ids in best])                       # (N, K)
dense = dense_hardest_neighbours(W, K)                                   # the N x N reference
say(f"the ring by hand equals the dense N x N top-{K}: {np.array_equal(by_hand, dense)}")
assert np.array_equal(by_hand, dense)

# %% [markdown]
# ## The real thing: `hardest_neighbours`
#
# `refimpl.method.hardest_neighbours(clf, comm, K)` runs the same ring with
# `comm.ring_shift` (one `Sendrecv` per step) on a sharded
# `CosineClassifier`, in tiles of bounded size, and finally gathers the
# $N \times K$ table on every rank (`all_gather_v`: the step needs the rows
# of its batch's labels, which any rank may own). Under `mpirun -np 3` the
# ring is real: 2 shifts, each sending the shard a rank holds; alone there is
# no ring to walk and only the final gather runs.

# %%
clf = CosineClassifier(N, D, world, tau=tau, dtype=np.float64)
clf.write_rows(np.arange(clf.lo, clf.hi), W[clf.lo:clf.hi])              # this rank's rows
table = hardest_neighbours(clf, world, K)                                # (N, K) on every rank
for op, c in world.counters.items():
    say(f"  {op:13s} calls {c['calls']}  sent {c['sent']:4d} B  received {c['received']:4d} B")
say(f"{world.size} rank(s): the table equals the dense one: {np.array_equal(table, dense)}")
assert np.array_equal(table, dense)
say("N_K(i) for every class i:")
for i in range(N):
    say(f"  class {i:2d}: {table[i].tolist()}  cosines "
        + " ".join(f"{What[i] @ What[j]:+.3f}" for j in table[i]))

# %% [markdown]
# ## The soft target of one instance
#
# `target_entries` writes the targets of a batch as sparse rows, the
# instance's own class first: $K + 1$ ids and weights, not an N-vector.

# %%
i = 5
ids, weights = target_entries(np.array([i]), N, table, alpha=alpha)      # (1, K+1) each
say(f"instance {i}: target ids {ids[0].tolist()}, weights {weights[0].round(4).tolist()} "
    f"(sum {weights.sum():.1f}); one-hot: ids [{i}], weights [1.0]")

# %% [markdown]
# ## What the smoothing does to the neighbours' rows
#
# Take a feature of instance i near its own row (as after the contrastive
# prior, seen through an augmentation: $z = w_i + $ a little noise) and one
# step's gradient of W with one-hot and with smoothed targets. SGD moves row
# j by $-\eta\, dW_j$; its component along $\hat z$ says whether row j moves
# toward the instance (> 0) or away.

# %%
z = W[i:i + 1] + 0.1 * rng(0, "tutorial 09 z").standard_normal((1, D))  # (1, D)
zhat = z[0] / np.linalg.norm(z)
rows_of_interest = [i] + table[i].tolist()
moves, dlogits = {}, {}
for name, a in (("one-hot", 0.0), ("smoothed", alpha)):
    targets = target_entries(np.array([i]), N, table, alpha=a)
    loss, _, cache = cosine_softmax_forward(z, np.array([i]), W, SelfComm(), N, tau,
                                            targets=targets)
    _, dW = cosine_softmax_backward(1.0, cache)                          # (N, D)
    p = shard_softmax(cache)[0]                                          # softmax, (N,)
    y = np.zeros(N)
    y[targets[0][0]] = targets[1][0]
    dlogits[name] = p - y                                                # B = 1
    moves[name] = -dW @ zhat                                             # (N,) toward z > 0
    say(f"{name}: loss {float(loss):.4f}")
say(f"{'row j':>6s} {'cos(w_j, z)':>11s} {'p_j':>6s} | {'y_j':>5s} {'p_j - y_j':>9s} "
    f"{'move':>7s} (one-hot) | {'y_j':>5s} {'p_j - y_j':>9s} {'move':>7s} (smoothed)")
for j in rows_of_interest + [j for j in range(N) if j not in rows_of_interest][:2]:
    y1, y2 = float(j == i), (1 - alpha if j == i else alpha / K if j in table[i] else 0.0)
    tag = "own" if j == i else "neighbour" if j in table[i] else "other"
    say(f"{j:6d} {What[j] @ zhat:11.3f} {dlogits['one-hot'][j] + y1:6.3f} | {y1:5.3f} "
        f"{dlogits['one-hot'][j]:9.3f} {moves['one-hot'][j]:+7.3f}           | {y2:5.3f} "
        f"{dlogits['smoothed'][j]:9.3f} {moves['smoothed'][j]:+7.3f}  {tag}")

# %% [markdown]
# The own row is pulled less (its target is $1 - \alpha$). The nearest
# neighbour, which the softmax already confuses with the instance
# ($p_j > \alpha/K$), is still pushed away, but less; neighbours with
# $p_j < \alpha/K$ are now pulled toward the instance. Rows outside $N_K(i)$
# move exactly as before. The smoothing thus lets hard, probably similar
# instances stay close instead of being forced apart, which is the premise:
# the nearest rows of W tend to be images of the same kind (the neighbour
# label agreement that refimpl-train logs every epoch measures it).
#
# ## The sharded classifier with smoothed targets
#
# A target row's K + 1 entries may live on different ranks; each rank adds
# the target logits of the entries in its own rows, and the sum rides in the
# same all-reduce as the softmax's denominator. A batch of 3 instances:

# %%
batch = np.array([5, 0, 10])                                             # B = 3
b = batch.size // world.size
local = slice(world.rank * b, (world.rank + 1) * b)
zs = W[batch] + 0.1 * rng(1, "tutorial 09 z").standard_normal((batch.size, D))  # (B, D)
losses = {}
for name, a in (("one-hot", 0.0), ("smoothed", alpha)):
    loss, _ = clf.forward(zs[local], batch[local], target_entries(batch, N, table, alpha=a))
    clf.discard()
    losses[name] = float(loss)
print(f"rank {world.rank} of {world.size}: loss (one-hot) {losses['one-hot']:.15f}, "
      f"loss (smoothed) {losses['smoothed']:.15f}", flush=True)

# %%
near_pushed = [int(j) for j in table[i] if dlogits["smoothed"][j] > 0]
near_pulled = [int(j) for j in table[i] if dlogits["smoothed"][j] < 0]
others = [j for j in range(N) if j != i and j not in table[i]]
assert moves["smoothed"][i] < moves["one-hot"][i]                       # own row pulled less
for j in table[i]:
    assert moves["one-hot"][j] < 0                                      # one-hot pushes all
    assert moves["smoothed"][j] > moves["one-hot"][j]                   # smoothing: less push
for j in near_pulled:
    assert moves["smoothed"][j] > 0                                     # ... or a pull
assert near_pushed and near_pulled                                      # both kinds here
# as before: the same p_j, rounded the same way (a few roundings at most)
assert np.abs(moves["smoothed"][others] - moves["one-hot"][others]).max() < 1e-12
assert losses["smoothed"] > losses["one-hot"]
say(f"neighbours still pushed: {near_pushed}, now pulled: {near_pulled}")

# %% [markdown]
# ## Try on your own
#
# - Set `alpha = 0.5`: how many of the neighbours are pulled now?
# - Lower `tau` to 0.05: the softmax sharpens, $p_j$ of the far neighbours
#   drops below $\alpha/K$, and more of them are pulled.
# - Make N = 100,000 and D = 128 and time `hardest_neighbours` alone and under
#   `mpirun -np 2`: each rank does $2 N^2 D / P$ multiply-adds, and the
#   table is $N K$ int64 on every rank (`neighbours_memory`).
