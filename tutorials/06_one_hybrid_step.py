# %% [markdown]
# # 06 · Walk one hybrid-parallel training step, collective by collective
#
# **You will learn** what happens, and in which order, when P ranks take one
# training step of an N-way instance classifier: the encoder runs data
# parallel on each rank's local batch, the classifier runs model parallel on
# each rank's rows of W, and six collectives glue the two together. At each
# one you will see the shapes that go in and come out and the bytes it moved,
# next to docs/design.md's formula. At the end, the step on 3 ranks gives the
# numbers of the step in 1 process.
#
# **You need** refimpl (`make test` installs it, with mpi4py and Open MPI).
# Run `python tutorials/06_one_hybrid_step.py` (one process that computes
# what 3 ranks compute), then
# `mpirun -np 3 python tutorials/06_one_hybrid_step.py` (3 real ranks; from
# the venv: `.venv/bin/mpirun -np 3 .venv/bin/python ...`, as root add
# `--allow-run-as-root`). Every rank prints the loss and gradient norms that
# the single process prints.
#
# ## The step
#
# Notation: N classes (instances), D feature dimension, global batch B, P
# ranks, local batch $b = B/P$, rank r owns the rows
# $C_r = [\lfloor rN/P \rfloor, \lfloor (r+1)N/P \rfloor)$ of W, $N_r = |C_r|$.
#
# $$\hat z_b = \frac{z_b}{\lVert z_b \rVert},\qquad
#   \hat w_j = \frac{w_j}{\lVert w_j \rVert},\qquad
#   l_{bj} = \frac{\langle \hat z_b, \hat w_j \rangle}{\tau},\qquad
#   L = \frac{1}{B}\sum_{b=1}^{B}\Big(\log \sum_{j=1}^{N} e^{l_{bj}} - l_{b,y_b}\Big)$$
#
# | # | what | collective | bytes per rank (f = bytes per float) |
# |---|---|---|---|
# | 1 | encoder + head on the local batch: $z$ $(b, D)$ | - | - |
# | 2 | gather features and labels: $Z$ $(B, D)$, $Y$ $(B)$ | all-gather | $B D f + 8B$ received |
# | 3 | local logits $Z \hat W_r^\top / \tau$ $(B, N_r)$ | - | - |
# | 4 | row maxima $M_b$ over all shards | all-reduce MAX | $B f$ |
# | 5 | $\sum_j e^{l_{bj} - M_b}$ and the target logit over all shards | all-reduce SUM | $2 B f$ |
# | 6 | $\partial L/\partial l = (\mathrm{softmax} - y)/B$; $dW_r$ local; partial $dZ$ | - | - |
# | 7 | sum the partial $dZ$, each rank keeps its b rows | reduce-scatter SUM | $B D f$ sent |
# | 8 | backward through normalize, head, encoder | - | - |
# | 9 | sum the encoder + head gradients (G parameters) | all-reduce SUM | $G f$ |
# | 10 | SGD: replicated parameters everywhere, $W_r$ locally | - | - |
# | 11 | "local" BatchNorm: rank 0's running statistics (Q values) | broadcast | $Q f$ |
#
# Nothing in this table grows with N: the classifier's rows never move.

# %%
import numpy as np

from refimpl.backend import rng
from refimpl.models import build_model
from refimpl.optim.sgd import SGD
from refimpl.parallel import (CosineClassifier, SelfComm, allreduce_gradients,
                              set_batchnorm_mode, shard_range, world_comm)
from refimpl.train.step import train_step, update

world = world_comm("06_one_hybrid_step.py")   # MPIComm under mpirun, else SelfComm
P, r = world.size, world.rank
RANKS = 3                                     # the step is the one 3 ranks take
BN = "local"                                  # BatchNorm across ranks: "local" or "sync"
assert BN == "sync" or RANKS % P == 0, f"run alone or under mpirun -np {RANKS}, not -np {P}"


def say(*args):
    """Rank 0 speaks for everyone (the other ranks compute the same things)."""
    if r == 0:
        print(*args, flush=True)


N, D, B, tau = 37, 16, 12, 0.15
b = B // P
g = rng(0, "tutorial 06")
images = g.standard_normal((B, 3, 16, 16))    # the global batch, (B, 3, 16, 16), float64
labels = g.permutation(N)[:B]                 # its instance ids (= classes), (B,)
mine = slice(r * b, (r + 1) * b)              # this rank's local batch
say(f"N = {N} classes, D = {D}, global batch B = {B}, P = {P} rank(s), b = {b} per rank")
shown = RANKS if P == 1 else P                # the split this run stands for
for q in range(shown):
    lo, hi = shard_range(N, shown, q)
    say(f"  with {shown} ranks, rank {q} owns classes [{lo:2d}, {hi:2d}) ({hi - lo} rows) and "
        f"images {q * B // shown}..{(q + 1) * B // shown - 1} of the batch"
        + (" (here all in one process)" if P == 1 else ""))

# %% [markdown]
# ## A communicator that tells what it does
#
# Every collective in refimpl goes through the communicator (`SelfComm` in
# one process, `MPIComm` under mpirun), and its `counters` count the bytes of
# each buffer handed to MPI and received back. `Tap` wraps it and records,
# for each call, the shapes in and out and the bytes that call moved. It is
# instrumentation only: it passes every call through unchanged.


# %%
class Tap:
    """A communicator that logs each collective: name, shape in, shape out, bytes."""

    def __init__(self, comm):
        self.comm, self.log, self.shown, self.stages = comm, [], 0, {}

    def __getattr__(self, name):             # rank, size, counters, barrier, ...
        return getattr(self.comm, name)

    def _call(self, name, x, *args, **kwargs):
        before = {k: (c["sent"], c["received"]) for k, c in self.comm.counters.items()}
        out = getattr(self.comm, name)(x, *args, **kwargs)
        moved = {k: (c["sent"] - before.get(k, (0, 0))[0], c["received"] - before.get(k, (0, 0))[1])
                 for k, c in self.comm.counters.items()
                 if (c["sent"], c["received"]) != before.get(k, (0, 0)) or k not in before}
        self.log.append((name, tuple(x.shape), tuple(out.shape), str(x.dtype), moved))
        return out

    def all_gather(self, x, check=True):
        return self._call("all_gather", x, check=check)

    def reduce_scatter(self, x):
        return self._call("reduce_scatter", x)

    def all_reduce(self, x, op="sum", inplace=False):
        return self._call("all_reduce", x, op, inplace)

    def bcast(self, x, root=0):
        return self._call("bcast", x, root)

    def show(self, stage):
        """Print the calls logged since the last show; keep them as ``stages[stage]``."""
        self.stages[stage], self.shown = self.log[self.shown:], len(self.log)
        for name, shape_in, shape_out, dtype, moved in self.stages[stage]:
            for key, (sent, received) in moved.items():
                what = key if key != "shape_check" else "shape_check (not payload)"
                say(f"    {what:26s} {str(shape_in):10s} -> {str(shape_out):10s} {dtype:8s}"
                    f" sent {sent:6d} B, received {received:6d} B")
        if not self.stages[stage]:
            say("    (no collective)")


def make_step(comm):
    """A fresh network, this rank's classifier shard and both optimizers, float64."""
    net = build_model("resnet18", stem="cifar", width=2, head_hidden=8, dim=D,
                      dtype=np.float64, seed=0)
    set_batchnorm_mode(net, comm, BN)         # "local": per-rank statistics, like DDP
    if BN == "local":
        net.bn.groups = RANKS // comm.size    # 1 process: normalize in 3 groups of b = 4
    clf = CosineClassifier(N, D, comm, tau=tau, dtype=np.float64, seed=0)
    net_opt = SGD(net.store.data, net.store.grad, lr=0.1, momentum=0.9, weight_decay=5e-4)
    clf_opt = SGD(clf.weight.ravel(), clf.grad.ravel(), lr=0.1, momentum=0.9,
                  weight_decay=5e-4)
    return net, clf, net_opt, clf_opt


comm = Tap(world)
net, clf, net_opt, clf_opt = make_step(comm)
G, Q = net.store.data.size, net.store.buffer_data.size
f = 8                                         # float64: 8 bytes per value
say(f"ResNet-18 (width 2) + head: G = {G} replicated parameters, Q = {Q} BatchNorm "
    f"buffer values; this rank's shard of W: rows [{clf.lo}, {clf.hi}), {clf.weight.shape}")

# %% [markdown]
# ## 1 · Encoder and head on the local batch (data parallel)
#
# Each rank runs the whole network on its own b images. No collective: with
# "local" BatchNorm each rank normalizes with its own batch's statistics. (One
# process computing the 3-rank step normalizes its 12 images in 3 groups of
# 4: `net.bn.groups = 3`.)

# %%
net.store.zero_grad()
z = net.forward(images[mine], train=True)     # (b, D), unnormalized
say(f"1   x {images[mine].shape} -> z {z.shape}")
comm.show("1")

# %% [markdown]
# ## 2-5 · The classifier's forward (model parallel)
#
# Rank r needs every feature of the global batch, because its rows $C_r$
# score all of them: an **all-gather** of $\hat z$ and one of the labels
# (under P > 1, a 72-byte all-gather of shapes runs first so that a rank
# with a wrong batch size fails with a message instead of a hang; it is not
# payload). Then the local logits, a $(B, N_r)$ block that never leaves the
# rank, and two small **all-reduces** for the softmax's denominator:
#
# $$M_b = \max_r \max_{j \in C_r} l_{bj},\qquad
#   S_b = \sum_r \sum_{j \in C_r} e^{l_{bj} - M_b},\qquad
#   T_b = \sum_r \sum_{j \in C_r} y_{bj}\, l_{bj},\qquad
#   L = \frac{1}{B}\sum_b \left(M_b + \log S_b - T_b\right)$$
#
# $S$ and $T$ travel in one message of $2B$ values.

# %%
loss, _ = clf.forward(z, labels[mine])        # all_gather, local logits, MAX, SUM
say(f"2-5 z {z.shape} -> local logits, kept as exp(l - m) {clf.cache['E'].shape} "
    f"(B x N_r) -> loss {float(loss):.12f}")
comm.show("2-5")

# %% [markdown]
# ## 6-7 · The classifier's backward
#
# With the softmax $p_{bj} = e^{l_{bj} - M_b}/S_b$, each rank forms its own
# columns of $\partial L / \partial l = (p - y)/B$. Its shard's gradient
# $dW_r$ needs nothing from the others. The gradient of $\hat Z$ is a sum
# over *all* classes, so each rank holds a partial sum
# $\frac{1}{\tau}\,\frac{\partial L}{\partial l_{:,C_r}} \hat W_r$ for all B rows;
# a **reduce-scatter** adds the P partial sums and leaves each rank the b
# rows of its own batch. It is the adjoint of step 2's all-gather.

# %%
dz = clf.backward()                           # dW_r into clf.grad; reduce_scatter
say(f"6-7 dW_r {clf.grad.shape} (local), dz {dz.shape} (the local batch's rows)")
comm.show("6-7")

# %% [markdown]
# ## 8-9 · Back through the network, then one all-reduce of all its gradients
#
# The network's backward is local. Its gradients live in one flat buffer of G
# values, summed over the ranks in **one all-reduce**. Summed, not averaged:
# each rank's backward already gives the gradient of its share of the
# *global* mean loss (tutorial 07 is about this).

# %%
net.backward(dz)                              # accumulates into net.store.grad, (G,)
allreduce_gradients(net.store.grad, comm)     # SUM over the ranks, in place
grad_norm = float(np.linalg.norm(net.store.grad))
say(f"8-9 dz {dz.shape} -> gradients of the encoder + head {net.store.grad.shape}")
comm.show("8-9")

# %% [markdown]
# ## 10-11 · The update
#
# SGD moves the replicated parameters identically on every rank and the
# shard $W_r$ locally. With "local" BatchNorm the ranks saw different batches,
# so their running statistics differ: rank 0's are **broadcast** (DDP's
# `broadcast_buffers`).

# %%
dW_sq = float(np.sum(clf.grad ** 2))          # this shard's |dW_r|^2, before the update
update(net, comm, net_opt, clf_opt)
say(f"10-11 SGD on {G} replicated values and {clf.weight.size} values of W_r; "
    f"BatchNorm statistics {net.store.buffer_data.shape}")
comm.show("10-11")

# %% [markdown]
# ## The bytes against the formula
#
# Summed over the step, per collective, next to docs/design.md's table (here
# $f = 8$: the step runs in float64). The counters count what each rank hands
# to MPI and gets back (the payload), not what the MPI algorithm puts on the
# wire.

# %%
def moved(calls, key, received=False):
    """Bytes sent (or received) by the calls of kind ``key`` in a list of logged calls."""
    return sum(m[key][received] for *_, m in calls if key in m)


st = comm.stages
formula = {                                   # name: (measured, formula, formula as text)
    "all_gather (received)": (moved(st["2-5"], "all_gather", True), B * D * f + B * 8,
                              "B D f + 8 B"),
    "all_reduce_max": (moved(st["2-5"], "all_reduce_max"), B * f, "B f"),
    "all_reduce_sum (classifier)": (moved(st["2-5"], "all_reduce_sum"), 2 * B * f, "2 B f"),
    "reduce_scatter (sent)": (moved(st["6-7"], "reduce_scatter"), B * D * f, "B D f"),
    "all_reduce_sum (gradients)": (moved(st["8-9"][-1:], "all_reduce_sum"), G * f, "G f"),
    "bcast": (moved(st["10-11"], "bcast") + moved(st["10-11"], "bcast", True),
              Q * f if BN == "local" else 0, "Q f (local BN)"),
}
say(f"{'collective':30s} {'measured':>9s} {'formula':>9s}")
for name, (measured, expected, text) in formula.items():
    say(f"{name:30s} {measured:9d} {expected:9d}   {text}")
    assert measured == expected, name
if P > 1:
    say(f"{'shape_check (not payload)':30s} {moved(st['2-5'], 'shape_check'):9d} {'':>9s}   "
        f"9 int64 per all-gather of z_hat and per shape a collective sees first")
if BN == "sync":
    bn_calls = st["1"] + st["8-9"][:-1]
    say(f"{'sync BatchNorm':30s} {moved(bn_calls, 'all_reduce_sum'):9d} {'':>9s}   "
        f"{len(bn_calls)} all-reduces of 2C + 1 or 2C values (not in the step table)")
total = sum(x["sent"] for k, x in world.counters.items() if k != "shape_check")
say(f"total sent by this rank: {total} B; the classifier's N = {N} rows never moved")

# %% [markdown]
# ## The same step with 1 and with 3 ranks
#
# The loss and the gradient of the replicated parameters are the same
# numbers on every rank. The shard gradients are summed over the ranks with
# one more all-reduce, only to print them (it is not part of the step).
# `train_step` is the library's one-call version of the cells above: on a
# fresh copy it gives exactly the same parameters.

# %%
dW_total, W_total = (float(v) for v in world.all_reduce(
    np.array([dW_sq, float(np.sum(clf.weight ** 2))]), "sum"))
print(f"rank {r} of {P}: loss {float(loss):.15f}, |grad| {grad_norm:.15f}, "
      f"|dW| {np.sqrt(dW_total):.15f}, |W after| {np.sqrt(W_total):.15f}", flush=True)

net2, clf2, net_opt2, clf_opt2 = make_step(world)
loss2, _ = train_step(net2, clf2, images[mine], labels[mine], world, net_opt2, clf_opt2)
assert loss2 == float(loss)  # the same operations in the same process: the same bits
assert np.array_equal(net2.store.data, net.store.data)
assert np.array_equal(clf2.weight, clf.weight)

# One process, the whole batch (BatchNorm in 3 groups, or over all 12 with "sync"):
# what every rank must match.
one = SelfComm()
net1, clf1, net_opt1, clf_opt1 = make_step(one)
loss1, _ = train_step(net1, clf1, images, labels, one, net_opt1, clf_opt1)
err = max(float(np.abs(net1.store.data - net.store.data).max()),
          float(np.abs(clf1.weight[clf.lo:clf.hi] - clf.weight).max()),
          float(np.abs(net1.store.buffer_data - net.store.buffer_data).max()))
print(f"rank {r} of {P}: vs one process on the whole batch: loss {loss1:.15f}, "
      f"max parameter difference {err:.1e}", flush=True)
# one step, P ranks vs 1: sums split over ranks; at most 9e-16 on every BLAS kernel
assert abs(loss1 - float(loss)) <= 1e-12 * abs(loss1) and err < 1e-12

# %% [markdown]
# ## Try on your own
#
# - Run it under `mpirun -np 3`: every rank prints the loss, |grad|, |dW| and
#   |W after| of the single process, to the last digits or nearly (a sum of
#   3 partial sums is rounded differently from one sum).
# - Make N 37,000 instead of 37: the bytes table does not change at all; only
#   the local logits $(B, N_r)$ and the shard grow.
# - Set `BN = "sync"` (synchronized BatchNorm): every BatchNorm adds an
#   all-reduce of $2C + 1$ values in forward and $2C$ in backward to the log,
#   the broadcast of row 11 goes away, and any P that divides B (2, 4, 6, 12)
#   gives the numbers of one process with plain BatchNorm.
