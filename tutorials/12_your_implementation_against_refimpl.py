# %% [markdown]
# # 12 · Check your whole training step against refimpl: write a trace, replay it, read the report
#
# **You will learn** the oracle workflow for a complete implementation of
# the method (encoder, head, N-way cosine classifier with smoothed targets,
# SGD): record a few steps of YOUR implementation as a *trace* (a folder of
# NumPy files), let `refimpl-oracle replay` run the same steps in refimpl in
# float64, and read the report: every tensor compared, the first divergence
# in forward-then-backward order, and hints that name the convention you
# probably got wrong. Tutorial 04 did this by hand for one block; here it is
# one command for the whole step.
#
# **You need** refimpl and PyTorch (CPU). Run
# `python tutorials/12_your_implementation_against_refimpl.py` (about 30 s).
# It also launches `mpirun -np 2` for a 2-rank replay when MPI is installed
# (`make test` installs it); without MPI that part is skipped and says so.
#
# docs/oracle.md is the reference: the trace format, the CLI, and every
# convention with its PyTorch DDP / Partial FC / Megatron mapping.
#
# ## Your implementation
#
# An independent PyTorch version of one training step, written the way you
# would write it: a dense classifier `W` (N x D) and autograd. The network
# is refimpl's independent PyTorch ResNet (`refimpl/oracle/torch_resnet.py`,
# plain `torch.nn`), standing in for yours. The step:
#
#     z = net(x)                                   (B, D), one call per rank's b rows
#     logits = normalize(z) @ normalize(W).T / tau (B, N)
#     y = (1 - alpha) e_i + alpha/K sum_{j in NK(i)} e_j
#     loss = mean_b( -sum_j y_bj log softmax(logits)_bj )
#
# P ranks are emulated in one process the way DDP behaves: the batch goes
# through the network in P chunks (per-rank BatchNorm statistics), the
# features are concatenated (the all-gather), and rank 0's BatchNorm buffers
# are kept (DDP's `broadcast_buffers`). Three switches plant the bugs of the
# last section.
#
# The code is `torch_training_steps` in `refimpl/oracle/torch_resnet.py`
# (plain PyTorch; refimpl's own tests replay the same code): read it there
# as the implementation you would write. The one refimpl object it touches
# is the `TraceWriter` handed to it, which hooks the model and the
# optimizer and says in `hparams` what they cannot show:
#
#     writer = TraceWriter(out, model, opt, W, {"tau": TAU, "alpha": ALPHA, "K": K,
#                                                "world_size": P, "bn": "local",
#                                                "neighbours": "initial_weight"})
#     ...                                     # per step:
#     writer.begin_step(ids, neighbours=rows)
#     writer.log(loss=loss, z_hat=z_hat, row_max=..., logsumexp=...)
#     opt.step()                              # writes the step's file
#     writer.close()

# %%
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from refimpl.oracle import format_trace_report, replay_and_compare
from refimpl.oracle.compare import worst_row
from refimpl.oracle.torch_resnet import torch_training_steps
from refimpl.oracle.torch_writer import TraceWriter
from refimpl.parallel.launch import find_mpirun

N, D, B, K, TAU, ALPHA = 16, 16, 8, 3, 0.15, 0.2
LRS = (0.1, 0.05)                      # two steps, a learning rate each
torch.set_num_threads(1)


def my_training(out, P=1, dtype=torch.float64, bug=None):
    """Two steps of 'your' implementation, recorded into the trace ``out``."""
    return torch_training_steps(out, TraceWriter, P, dtype, LRS, bug, num_classes=N, dim=D,
                                batch_size=B, k=K, tau=TAU, alpha=ALPHA)


# %% [markdown]
# ## The trace
#
# `TraceWriter` read most hyper-parameters from your objects (SGD's
# momentum, weight decay and its mask, BatchNorm's momentum and eps, the
# architecture from the state dict's shapes, N and D from `W`) and wrote,
# per step, every tensor in forward-then-backward order under torchvision
# names. Nothing but NumPy is needed to read it.

# %%
work = Path(tempfile.mkdtemp(prefix="tutorial12-"))
trace = my_training(work / "p1_float64")
with np.load(trace / "step_000000.npz") as z:
    names = z.files
print(f"{trace.name}: {sorted(p.name for p in trace.iterdir())}")
print(f"step 0 holds {len(names)} tensors: {names[:12]} ... {names[-3:]}")
assert names[:4] == ["lr", "input", "ids", "neighbours"] and names[-1] == "classifier.weight"

# %% [markdown]
# ## Replay it in refimpl
#
# `refimpl-oracle replay DIR` builds refimpl's network, classifier and SGD in
# float64 from the trace's initial state and hyper-parameters, runs the
# same steps on the same batches, recomputes the neighbour table from the
# initial `W`, and compares every tensor you recorded. Here through the
# library call it wraps (`replay_and_compare`); the command-line run is
# below. Pass: max |yours - refimpl| <= atol + rtol * max |refimpl| per
# tensor (float64: rtol 1e-10, atol 1e-12; float32: 1e-4, 1e-6).

# %%
result = replay_and_compare(trace)
print(format_trace_report(result, mismatches_only=True))
assert result["ok"]


# %% [markdown]
# ## float32, and 2 ranks
#
# The same check for your float32 run (refimpl still replays in float64:
# the difference is your rounding) and for 2 emulated ranks. refimpl's
# tensors are of the global batch, so one refimpl process replays a 2-rank
# trace (two BatchNorm groups); `--ranks 2` replays it on 2 real ranks
# under mpirun. The "worst" error is over the tensors that the relative test
# governs (a bias right before a BatchNorm has a gradient of 0 in exact
# arithmetic; atol covers its rounding).

# %%
def worst(result):
    rows = [r for _, rs in result["sections"] for r in rs]
    w = worst_row(rows, result["rtol"], result["atol"])
    return w["rel"], w["name"]


measured = {}
for P in (1, 2):
    for dtype in (torch.float64, torch.float32):
        name = f"p{P}_{str(dtype)[6:]}"
        path = my_training(work / name, P, dtype) if name != "p1_float64" else trace
        result = replay_and_compare(path)
        measured[name] = worst(result)
        verdict = "pass" if result["ok"] else "FAIL"
        print(f"P = {P} {str(dtype)[6:]:8s} one refimpl process: {verdict}, worst relative "
              f"error {measured[name][0]:.1e} ({measured[name][1]})")
        assert result["ok"]
# float64: two independent implementations, at most 6.6e-13 on every BLAS kernel
# (1e-10 is tests/tolerances.py's INDEPENDENT64). float32 rounds u32 / u64 = 5.4e8
# times coarser, so the float32 runs differ from refimpl by up to ~5.4e8 x 6.6e-13 =
# 3.6e-4 (measured 3.3e-5; tests/tolerances.py's NETWORK32)
assert max(measured["p1_float64"][0], measured["p2_float64"][0]) < 1e-10
assert max(measured["p1_float32"][0], measured["p2_float32"][0]) < 1e-3

# %% [markdown]
# The command line, on 2 real ranks (it launches `mpirun -np 2` itself;
# `mpirun -n 2 refimpl-oracle replay DIR` is the same):
#
#     refimpl-oracle replay DIR --ranks 2 -q
#
# Exit status 0 when every tensor agrees, 1 on a mismatch, 2 on a bad trace.

# %%
if find_mpirun() is None:
    print("mpirun not found: the 2-rank replay is skipped (pip install 'refimpl[mpi]')")
else:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    for name in ("p2_float64", "p2_float32"):
        proc = subprocess.run([sys.executable, "-m", "refimpl.oracle", "replay",
                               str(work / name), "--ranks", "2", "-q"],
                              capture_output=True, text=True, env=env, timeout=240)
        print(f"$ refimpl-oracle replay {name} --ranks 2 -q     (exit {proc.returncode})")
        print("\n".join(proc.stdout.splitlines()[-4:]))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

# %% [markdown]
# ## Three convention bugs, and what the report says
#
# Each is a classic: it runs, the loss goes down, and it is wrong.
#
# 1. **dz x P**: the feature gradient multiplied by the world size (what
#    InsightFace's Partial FC does before DDP averages), with gradients then
#    summed, not averaged. refimpl sums the gradients of the global-mean
#    loss; nothing is ever multiplied by P.
# 2. **Unbiased variance in BatchNorm's normalization** (PyTorch normalizes
#    with the biased one and stores the unbiased one in `running_var`).
# 3. **Neighbours without the tie rule**: `argsort` reversed puts the
#    higher id first among equal similarities; refimpl's rule is the lower id.

# %%
expected = {"dz_times_P": (2, "dz", "P = 2, the world size"),
            "unbiased_bn": (1, "z", "BIASED batch variance"),
            "ties": (1, "neighbours", "a TIE")}
for bug, (P, first, words) in expected.items():
    result = replay_and_compare(my_training(work / bug, P, bug=bug))
    report = format_trace_report(result, mismatches_only=True).splitlines()
    print(f"--- {bug}")
    print("\n".join(line for line in report
                    if line.startswith(("first divergence", "hint", "result"))))
    assert not result["ok"]
    assert result["first"]["name"] == first and result["first"]["where_step"] == "step 0"
    assert any(words in h for h in result["hints"]), result["hints"]

# %% [markdown]
# Each report points at the first tensor the bug breaks, in the order the
# step computes them: the neighbour rows (an input of the loss, computed
# from `W`), `z` (the network's forward, before any classifier), `dz` (the
# classifier's backward: the loss, logits and classifier gradient before it
# all agree). The hint says what is wrong: a constant ratio of exactly P,
# or two neighbours with the same cosine.
#
# ## Try on your own
#
# - Give the optimizer two parameter groups, the 1-D parameters without
#   weight decay: the writer records `weight_decay_mask = "no_bn_bias"` and
#   the replay follows (refimpl-train's default). Then record "all" while
#   training with the groups: the first divergence is a momentum buffer.
# - Average the 2 ranks' gradients as DDP would *and* keep the loss a mean
#   over the global batch: every network gradient comes out 1/2 of refimpl's,
#   and the hint says "1/P".
# - `refimpl-train config.toml --trace DIR --trace-steps 3` records refimpl's
#   own run; `refimpl-oracle compare DIR yours/` checks yours against it
#   directly (both must start from the same weights and batches).
