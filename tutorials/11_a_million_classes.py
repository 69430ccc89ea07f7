# %% [markdown]
# # 11 · Fit a million-way classifier on one machine: the formula, then one real step
#
# **You will learn** what a 1,281,167-way classifier (one class per ImageNet-1k
# training image) costs in memory and communication, first from docs/design.md's
# formula (`refimpl-train --dry-run`), then by taking one real step of it,
# forward, backward and SGD, in one process, and measuring its time and peak
# memory against the formula.
#
# **You need** refimpl and about 3.5 GB of free memory. Run
# `python tutorials/11_a_million_classes.py` (about 20 s on 2 cores). One
# process, float32.
#
# ## The formula
#
# N classes, D feature dimension, global batch B, P ranks, f = 4 bytes per
# float32, rank r owns $N_r \approx N/P$ rows:
#
# $$\text{classifier memory per rank} = \underbrace{3\, N_r D f}_{W_r,\ dW_r,\ \text{momentum}}
#   + \underbrace{B\, N_r f}_{\text{logits}},\qquad
#   \text{bytes per step} = \underbrace{B D f + 8B}_{\text{all-gather}}
#   + \underbrace{B f}_{\text{MAX}} + \underbrace{2 B f}_{\text{SUM}}
#   + \underbrace{B D f}_{\text{reduce-scatter}} + \underbrace{G f}_{\text{gradients}} .$$
#
# Memory falls as 1/P; the bytes per step do not depend on N at all (the
# rows of W never move, only features and their gradients). The work of the
# step is three GEMMs of $2 B N D$ floating-point operations each (logits,
# $dW$, $dZ$) and $B N$ exponentials: the buffer keeps each block's
# $e^{l - m_k}$ ($m_k$ its row maxima), so backward's softmax is a multiply.

# %%
import os
import subprocess
import sys
import time

import numpy as np

from refimpl import threads
from refimpl.optim.sgd import SGD
from refimpl.parallel import CosineClassifier, SelfComm
from refimpl.sysinfo import peak_memory_mb, reset_peak_memory
from refimpl.train.config import load_config
from refimpl.train.dry_run import cost

N, D, B, tau = 1_281_167, 128, 256, 0.15
f = 4                                           # float32
MiB = 2 ** 20
SPEC = [f"train=synthetic:n={N},size=8", f"batch_size={B}", f"dim={D}", "dtype=float32"]

# %% [markdown]
# ## The dry run
#
# `refimpl-train CONFIG --dry-run` prints what every part of a run costs on
# each rank and whether it fits this machine, without training. The
# training set here is generated on the fly (`synthetic:n=1281167`: no files,
# any instance computed when read), so the dry run needs nothing on disk.

# %%
dry = subprocess.run([sys.executable, "-m", "refimpl.train", *SPEC, "--dry-run"],
                     capture_output=True, text=True, timeout=300)
assert dry.returncode == 0, dry.stderr[-3000:]
print(" ".join(["refimpl-train", *SPEC, "--dry-run"]))
print(dry.stdout)

# %% [markdown]
# The same formula (`refimpl.train.dry_run.cost`) for more ranks: the
# classifier's share shrinks as 1/P, the bytes per step stay. (The gradient
# all-reduce of the ResNet-18's G parameters is by far the largest message;
# the classifier's collectives are a few hundred KB.)

# %%
cfg = load_config(None, SPEC)
print(f"{'P':>3s} {'W_r, dW_r, momentum':>20s} {'logits B x N_r':>15s} {'rank total':>11s} "
      f"{'classifier bytes/step':>22s} {'all bytes/step':>15s}")
for P in (8, 64):
    memory, moved, _ = cost(cfg, N, P, 0, 8)
    shard = next(v for k, v in memory.items() if k.startswith("classifier shard"))
    logits = next(v for k, v in memory.items() if k.startswith("exp buffer"))
    classifier_bytes = sum(s for k, (s, _) in moved.items()
                           if "gradients" not in k and "BN" not in k)
    print(f"{P:3d} {shard / MiB:16,.1f} MiB {logits / MiB:11,.1f} MiB "
          f"{sum(memory.values()) / MiB:7,.0f} MiB "
          f"{classifier_bytes:18,d} B {sum(s for s, _ in moved.values()):13,d} B")

# %% [markdown]
# ## One real step at N = 1,281,167
#
# The classifier alone, as `benchmarks/bench_classifier.py` measures it: a
# `CosineClassifier` holding all N rows (P = 1), features z of a global batch
# of B = 256, forward, backward (to z and to W) and an SGD update of W with
# momentum. Peak memory is the peak resident set of this process
# (`/proc/self/status`, VmHWM), reset just before the classifier is built, so
# it counts everything the step needs: W, its gradient and momentum, the
# logits, and every temporary.


# %%
threads.set_num_threads(os.cpu_count() or 1)    # logits in blocks of 4096 classes per thread
g = np.random.default_rng(0)
z = g.standard_normal((B, D)).astype(np.float32)   # the global batch's features, (B, D)
labels = g.integers(0, N, B)                       # their instance ids, (B,)
comm = SelfComm()

start = reset_peak_memory()                     # peak resident memory from here
t0 = time.perf_counter()
clf = CosineClassifier(N, D, comm, tau=tau, dtype=np.float32, seed=0)   # W (N, D), dW
opt = SGD(clf.weight.ravel(), clf.grad.ravel(), lr=0.1, momentum=0.9, weight_decay=1e-4)
t_init = time.perf_counter() - t0

t0 = time.perf_counter()
loss, _ = clf.forward(z, labels)                # gather, logits (B, N), MAX, SUM
dz = clf.backward()                             # dW (N, D), reduce-scatter dz (B, D)
opt.step()                                      # W and its momentum
t_step = time.perf_counter() - t0
measured = peak_memory_mb(start)                # MB since reset_peak_memory

formula = {"W, dW, momentum (3 N D f)": 3 * N * D * f, "logits (B N f)": B * N * f}
flops = 3 * 2 * B * N * D
print(f"N = {N:,} classes, D = {D}, B = {B}, float32, {threads.get_num_threads()} thread(s)")
print(f"initial W drawn in {t_init:.1f} s; one step {t_step:.2f} s for {flops / 1e9:.0f} GFLOP "
      f"in the 3 GEMMs ({flops / t_step / 1e9:.0f} GFLOP/s); loss {float(loss):.5f}, "
      f"log N = {np.log(N):.5f}")
for name, nbytes in formula.items():
    print(f"  formula: {name:28s} {nbytes / MiB:9,.1f} MiB")
print(f"  formula: {'total':28s} {sum(formula.values()) / MiB:9,.1f} MiB")
if measured is not None:
    print(f"  measured peak resident memory  {measured:9,.1f} MiB "
          f"({measured / (sum(formula.values()) / MiB):.3f} x the formula)")
print("bytes this step moved (the same for N = 37 or N = 1,281,167):")
for op, c in comm.counters.items():
    print(f"  {op:15s} sent {c['sent']:8,d} B  received {c['received']:8,d} B")

# %% [markdown]
# The measured peak is the formula plus a few percent: the temporaries of
# one block of 4096 classes per thread, the features, and NumPy itself.
# The time is that of the three GEMMs and the $BN$ exponentials, plus the
# page faults of the first write into the 1.3 GB exp buffer E (later steps
# reuse it). `benchmarks/bench_classifier.py` measures the steady-state
# step (the fastest of several, with an SGD update) against PyTorch on the
# same machine; docs/benchmarks.md has its figures. A busy or slower
# machine takes longer. On P ranks each rank does 1/P of the GEMMs and the
# exponentials.
#
# PyTorch's dense `F.cross_entropy(F.normalize(z) @ F.normalize(W).T / tau, y)`
# holds the logits, their log-softmax and its gradient (each B x N) and a
# normalized copy of W: about twice this peak (docs/benchmarks.md).

# %%
assert np.isfinite(float(loss)) and abs(float(loss) - np.log(N)) < 1.0   # random W: ~log N
assert dz.shape == (B, D) and np.isfinite(clf.weight[:1000]).all()
c = comm.counters
assert c["all_gather"]["received"] == B * D * f + B * 8
assert c["all_reduce_max"]["sent"] == B * f and c["all_reduce_sum"]["sent"] == 2 * B * f
assert c["reduce_scatter"]["sent"] == B * D * f
if measured is not None:
    assert 0.95 < measured / (sum(formula.values()) / MiB) < 1.15
print("the step's bytes match the formula exactly; its peak memory is the formula's within 15%")

# %% [markdown]
# ## Try on your own
#
# - Run the dry run under `mpirun -np 4` (`mpirun -np 4 python -m
#   refimpl.train train=synthetic:n=1281167,size=8 batch_size=256 --dry-run`):
#   the classifier rows per rank are a quarter, the bytes per step the same.
# - `python benchmarks/bench_classifier.py --ranks 1 2` runs this step on 1 and
#   2 ranks next to PyTorch's dense one and prints the ratios.
# - Make B = 1024: the exp buffer E grows to 5 GB, now the largest item;
#   P = 4 ranks bring it back to 1.25 GB each.
