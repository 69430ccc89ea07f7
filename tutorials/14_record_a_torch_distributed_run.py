# %% [markdown]
# # 14 · Record a 2-process torch.distributed run rank by rank, and let the hints name the bug
#
# **You will learn** to check a real sharded PyTorch implementation against
# refimpl: every rank of a torch.distributed job (the encoder in
# `DistributedDataParallel`, the classifier's rows split over the ranks)
# records its part of each step through `DistributedTraceWriter`, rank 0
# writes one trace of the global batch, and `refimpl-oracle replay` runs the
# same steps in refimpl. Then seven classic bugs of such a job, each named
# by the first hint of the report. Tutorial 12 did this for one process.
#
# **You need** refimpl and PyTorch (CPU; 2 gloo processes on this machine).
# Run `python tutorials/14_record_a_torch_distributed_run.py` (about 30 s).
#
# docs/oracle.md, "From a torch.distributed job", is the reference.
#
# ## The implementation
#
# `refimpl/oracle/torch_distributed_steps.py` is the step written the way a
# PyTorch user writes it at scale (plain torch, no refimpl code), on rank r
# of P with b = B / P images and the classifier rows W_r = W[lo:hi]
# (Partial FC's split: the first N mod P ranks get one row more):
#
#     z   = DDP(net)(x_r)                          (b, D)
#     Z   = AllGather(z)                           (B, D)   backward: all-reduced, my rows, x P
#     l   = normalize(Z) @ normalize(W_r).T / tau  (B, n_r) my classes' logits
#     m   = all_reduce MAX (max_j l)               (B,)     the softmax's max ...
#     s   = AllReduceSum(sum_j exp(l - m))         (B,)     ... and sum over ALL classes
#     loss = mean_b(lse_b - sum_j y_bj l_bj)       the global mean, on every rank
#
# Each rank makes the writer with its own objects and calls it like the
# one-process writer, with its own local batch:
#
#     writer = DistributedTraceWriter(out, ddp_model, opt, W_r, (lo, hi),
#                                     {"tau": 0.15, "alpha": 0.2, "K": 3, "bn": "local",
#                                      "neighbours": "initial_weight"},
#                                     gradients="averaged")
#     writer.begin_step(my_ids, neighbours=table[my_ids])
#     writer.log(loss=loss, z_hat=z_hat, row_max=m, logsumexp=lse)   # B rows: rank 0's
#     loss.backward(); opt.step()                # collective: rank 0 writes the step
#
# `gradients="averaged"` is the gradient-scale convention, the first thing
# to map: DDP averages the network's gradients over the ranks, so each
# rank's dz is P x the global-mean loss's (the all-gather's x P), and the
# writer records dz / P, refimpl's convention.
#
# In your own program you would start it with `torchrun --nproc_per_node 2
# my_training.py`; here `record_on_ranks` starts 2 processes on a gloo
# FileStore and records several variants in one process group: the clean
# run with local and with synchronized BatchNorm (`nn.SyncBatchNorm` refuses
# CPU tensors; `refimpl.oracle.torch_sync_bn` is the same layer for gloo),
# and one run per planted bug.

# %%
import tempfile
from pathlib import Path

import numpy as np
import torch

from refimpl.oracle import Trace, format_trace_report, replay_and_compare
from refimpl.oracle.compare import worst_row
from refimpl.oracle.torch_distributed_steps import BUGS, record_on_ranks

torch.set_num_threads(1)               # the 2 ranks are processes of their own
work = Path(tempfile.mkdtemp(prefix="tutorial14-"))
variants = [("clean", "local", None, {"lrs": [0.1, 0.05]}),
            ("clean_sync", "sync", None, {"lrs": [0.1, 0.05]})]
# bn_swapped: the trace declares sync BatchNorm, the SyncBatchNorm conversion is forgotten
variants += [(bug, "sync" if bug == "bn_swapped" else "local", bug) for bug in BUGS]
record_on_ranks(work, variants, world=2)
t = Trace(work / "clean")
print(f"producer: {t.meta['producer']}")
print(f"hparams: world_size {t.hparams['world_size']}, B {t.hparams['batch_size']}, "
      f"N {t.hparams['N']}, bn {t.hparams['bn']}, mask {t.hparams['weight_decay_mask']}")
assert t.hparams["world_size"] == 2 and "dz recorded / 2" in t.meta["producer"]

# %% [markdown]
# ## The trace
#
# One trace of the global batch: the inputs, `z` and `dz` of both ranks in
# rank order, the classifier's rows of both ranks in one (N, D) array,
# rank 0's parameters, gradients, momenta and BatchNorm buffers. The names
# have no `module.` (the writer hooks the module DDP wraps).

# %%
with np.load(work / "clean" / "step_000000.npz") as z:
    shapes = {k: z[k].shape for k in ("input", "ids", "z", "dz", "grad/classifier.weight",
                                      "conv1.weight")}
print(shapes)
assert shapes["z"] == (8, 16) and shapes["grad/classifier.weight"] == (16, 16)

# %% [markdown]
# ## Replay: refimpl runs the same steps
#
# In float64, one refimpl process (two BatchNorm groups for `local`; the
# global batch's statistics for `sync`), every tensor compared. Pass:
# max |yours - refimpl| <= 1e-12 + 1e-10 max |refimpl| per tensor.

# %%
for name in ("clean", "clean_sync"):
    result = replay_and_compare(work / name)
    rows = [r for _, rs in result["sections"] for r in rs]
    w = worst_row(rows, result["rtol"], result["atol"])
    print(f"{name}: {'pass' if result['ok'] else 'FAIL'}, {result['count']} tensors, worst "
          f"relative error {w['rel']:.1e} ({w['name']})")
    assert result["ok"], format_trace_report(result, True)
    assert w["rel"] < 1e-10

# %% [markdown]
# ## Seven classic bugs, and the first hint of each
#
# Each runs, the loss goes down, and it is wrong:
#
# 1. `no_times_P`: DDP averages, but the all-gather's backward does not
#    multiply dz by P: every network gradient is 1/P of the right one.
# 2. `rank_max`: the softmax's row max over this rank's classes only.
# 3. `rank_sum`: the softmax's sum over this rank's classes only.
# 4. `rank_smoothing`: alpha spread over the neighbours this rank owns.
# 5. `tau_x1.01`: the logits divide by 1.01 tau, the trace declares tau.
# 6. `bn_swapped`: sync BatchNorm declared, the conversion forgotten.
# 7. `decay_swapped`: a weight-decay schedule that sets every param group's
#    weight_decay, the BatchNorm / bias group's zero too.
#
# The report's first divergence is the first tensor each breaks, in the
# order the step computes them; the first hint says why, from the numbers:
# a ratio of exactly 1/P, a row max that is never above refimpl's and equal
# in some rows (a max over a subset of the classes), a log-sum-exp short by
# a different amount in each row, a loss that refimpl's logits give with
# per-rank targets, logits in a constant ratio, a `z` that refimpl
# reproduces with the other BatchNorm mode, a momentum off by exactly
# weight_decay x the parameter.

# %%
names = {"no_times_P": "DDP averaging without x P", "rank_max": "a per-rank softmax max",
         "rank_sum": "a per-rank softmax sum", "rank_smoothing": "smoothing normalized per rank",
         "tau_x1.01": "tau x 1.01", "bn_swapped": "BN mode swapped",
         "decay_swapped": "the weight-decay mask is swapped"}
for bug, words in names.items():
    result = replay_and_compare(work / bug)
    first = result["first"]
    print(f"--- {bug}: first divergence {first['where_step']}, {first['name']}")
    print(f"hint: {result['hints'][0][:300]}...")
    assert not result["ok"] and words in result["hints"][0], result["hints"]

# %% [markdown]
# ## Try on your own
#
# - `python -m refimpl.oracle.torch_distributed_steps /tmp/t --bn sync --bug rank_sum`
#   records the clean run and a bug from the shell; `refimpl-oracle replay
#   /tmp/t/rank_sum` prints the whole report.
# - Read one bug's whole report, `print(format_trace_report(replay_and_compare(work /
#   "rank_sum"), True))`: after the first divergence nearly every tensor
#   differs; the first one, and its hint, is what to fix.
# - Replay the clean trace on 2 MPI ranks: `refimpl-oracle replay DIR --ranks 2`.
