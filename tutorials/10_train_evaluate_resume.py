# %% [markdown]
# # 10 · Train, evaluate, and resume on another number of ranks
#
# **You will learn** how to run the whole method with `refimpl-train`
# (contrastive prior, hardest-class smoothing, kNN monitor, checkpoints),
# what its run directory holds, and how a run saved on 1 process continues
# on 2 MPI ranks along the very same loss curve: the checkpoint stores the
# full classifier, and the global batch of every step does not depend on
# the number of ranks.
#
# **You need** refimpl with its mpi and train extras (`make test` installs
# them). Run `python tutorials/10_train_evaluate_resume.py` (about 15 s); it
# starts `refimpl-train` itself, alone and under `mpirun -np 2` (run it with
# plain python, not under mpirun). It saves `10_train_evaluate_resume.png`
# next to itself (the notebook shows it inline); the run directories go to
# a temporary folder that is removed at the end.
#
# ## What is compared
#
# Run A trains 4 epochs on 1 process and saves a checkpoint after every
# epoch. Run B starts from A's checkpoint after epoch 2, on 2 ranks, and
# trains epochs 3 and 4. With synchronized BatchNorm (`bn=sync`: the
# statistics of the global batch, whatever P) and float64, B's loss at
# every step t must equal A's:
#
# $$\max_{t \ge t_2} \left| L^{B}_t - L^{A}_t \right| < 10^{-10},$$
#
# where $t_2$ is the first step of epoch 3. (With `bn=local`, the default, P
# ranks normalize in P groups, so a run on 2 ranks is a different run from
# one on 1 process: it resumes fine but follows its own curve.)

# %%
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib

from refimpl import checkpoint
from refimpl.parallel import find_mpirun, mpirun_command, run_mpirun

matplotlib.use("Agg")                          # draw to files; the notebook shows the PNG
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
tmp = Path(tempfile.mkdtemp(prefix="refimpl-tutorial10-"))
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")   # 1 BLAS thread per rank

CONFIG = [
    "train=synthetic:n=96,size=8,classes=4,seed=0",  # 96 instances = 96 classes, 8x8 images
    "test=synthetic:n=48,size=8,classes=4,seed=1",   # labeled: the kNN monitor
    "width=2", "head_hidden=8", "dim=8",             # a ResNet-18 of width 2
    "batch_size=12", "epochs=4", "lr=0.05", "warmup_epochs=0.5",
    "alpha=0.2", "k=3",                              # smoothing over 3 hardest classes from epoch 2
    "dtype=float64", "bn=sync",                      # for the 1e-10 comparison across P
    "knn_k=[5]", "eval_every=1", "log_every=100", "keep=5",  # keep every epoch's checkpoint
]


def train(*args, ranks=None):
    """refimpl-train (python -m refimpl.train) on 1 process or under mpirun -np ranks."""
    argv = ["-m", "refimpl.train", *CONFIG, *args]
    cmd = [sys.executable, *argv] if ranks is None else mpirun_command(ranks, *argv)
    proc = run_mpirun(cmd, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def records(run, kind):
    """The records of one kind ("step" or "epoch") of a run's metrics.jsonl."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


print("python -m refimpl.train \\\n    " + " \\\n    ".join(CONFIG) + " \\\n    out=RUN_A")

# %% [markdown]
# ## Run A: 4 epochs on 1 process
#
# `refimpl-train` takes a TOML file and/or `key=value` overrides (every key
# is a field of `refimpl.train.config.Config`). It logs the kNN of raw
# pixels and of the random network, writes W with the contrastive prior,
# then trains; from the second epoch on, the targets are smoothed over each
# instance's 3 hardest classes. After every epoch: the kNN monitor on the
# test split and a checkpoint.

# %%
run_a = tmp / "run_a"
log_a = train(f"out={run_a}")
print(log_a)

# %% [markdown]
# ## The run directory
#
# `config.toml` (the exact config), `metrics.jsonl` (one JSON object per
# step and per epoch), `curves.png`, and one directory per checkpoint:
# `meta.json`, the replicated parameters and momenta (`replicated.npz`), and
# the **whole** N x D classifier and its momentum as `.npy` files that every
# rank writes its own rows into, so that any number of ranks can read them
# back.

# %%
print(sorted(p.name for p in run_a.iterdir()))
ckpts = checkpoint.list_checkpoints(run_a)
for ckpt in ckpts:
    meta = json.loads((ckpt / "meta.json").read_text())
    print(f"  {ckpt.name}: epoch {meta['state']['epoch']}, step {meta['state']['step']}, "
          f"saved on {meta['world_size']} rank(s), N = {meta['num_classes']}; files "
          + ", ".join(f"{p.name} ({p.stat().st_size:,} B)" for p in sorted(ckpt.iterdir())))
epochs_a = records(run_a, "epoch")
for e in epochs_a:
    print(f"epoch {e['epoch'] + 1}: loss {e['loss']:.4f}, instance top-1 {100 * e['top1']:.1f}%, "
          f"neighbour label agreement {100 * e['agreement']:.1f}%, "
          f"kNN@5 {100 * e['knn']['pooled']['5']:.1f}% (encoder) "
          f"{100 * e['knn']['head']['5']:.1f}% (head)")

# %% [markdown]
# ## Run B: resume from epoch 2 on 2 ranks
#
# The same config and `--resume` with the checkpoint after epoch 2, now
# under `mpirun -np 2`: each rank reads its half of W's rows from the full
# `.npy` file, the replicated parameters, the momenta, the neighbour table
# in use and the sampler's position (epoch 3, step 0 of it).

# %%
resume_from = next(c for c in ckpts
                   if json.loads((c / "meta.json").read_text())["state"]["epoch"] == 2)
run_b = tmp / "run_b"
ranks = 2 if find_mpirun() is not None else None
if ranks is None:
    print("mpirun not found (pip install 'refimpl[mpi]'): resuming on 1 process instead")
log_b = train(f"out={run_b}", "--resume", str(resume_from), ranks=ranks)
print(log_b)
meta_b = json.loads((checkpoint.latest_checkpoint(run_b) / "meta.json").read_text())
print(f"run B's last checkpoint was saved on {meta_b['world_size']} rank(s)")

# %% [markdown]
# ## The same loss curve

# %%
steps_a = {r["step"]: r["loss"] for r in records(run_a, "step")}
steps_b = {r["step"]: r["loss"] for r in records(run_b, "step")}
first_b = min(steps_b)
title_b = f"run B (resumed, {meta_b['world_size']} ranks)"
print(f"{'step':>4s}  {'run A (1 process)':>20s}  {title_b:>24s}")
for t in sorted(steps_a):
    b_text = f"{steps_b[t]:24.15f}" if t in steps_b else f"{'':>24s}"
    print(f"{t:4d}  {steps_a[t]:20.15f}  {b_text}")
worst = max(abs(steps_b[t] - steps_a[t]) for t in steps_b)
knn_a = epochs_a[-1]["knn"]["pooled"]["5"]
knn_b = records(run_b, "epoch")[-1]["knn"]["pooled"]["5"]
print(f"steps {first_b}..{max(steps_b)}: max |loss B - loss A| = {worst:.1e}; "
      f"final kNN@5: A {100 * knn_a:.1f}%, B {100 * knn_b:.1f}%")

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6))
ax0.plot(sorted(steps_a), [steps_a[t] for t in sorted(steps_a)], "-", color="grey",
         label="run A, 1 process")
ax0.plot(sorted(steps_b), [steps_b[t] for t in sorted(steps_b)], "o", ms=4, mfc="none",
         label=f"run B, resumed on {meta_b['world_size']} ranks")
ax0.axvline(first_b - 0.5, color="k", linestyle=":", label="checkpoint (epoch 2)")
ax0.set(title="training loss per step", xlabel="step", ylabel="loss")
ax0.legend(fontsize=8)
x = [e["epoch"] + 1 for e in epochs_a]
ax1.plot(x, [100 * e["knn"]["pooled"]["5"] for e in epochs_a], marker="o", label="encoder")
ax1.plot(x, [100 * e["knn"]["head"]["5"] for e in epochs_a], marker="s", label="head")
ax1.set(title="run A: kNN@5 on the test split (%)", xlabel="epoch", ylabel="%")
ax1.legend(fontsize=8)
fig.tight_layout()
png = HERE / "10_train_evaluate_resume.png"
fig.savefig(png, dpi=100)
plt.close(fig)
if "ipykernel" in sys.modules:
    from IPython.display import Image, display
    display(Image(filename=str(png)))
else:
    print(f"saved {png}")

# %%
assert len(ckpts) == 4 and meta_b["world_size"] == (ranks or 1)
assert sorted(steps_b) == [t for t in sorted(steps_a) if t >= first_b] and first_b == 16
# resumed on another P: every sum split otherwise (at most 2e-15 on every BLAS kernel);
# 1e-10 is tests/tolerances.py's INDEPENDENT64
assert worst < 1e-10
assert all(0 <= e["knn"]["pooled"]["5"] <= 1 for e in epochs_a)
assert abs(knn_b - knn_a) < 1e-12  # the same predictions: the same fraction, up to a rounding
shutil.rmtree(tmp)                             # comment out to keep both run directories

# %% [markdown]
# ## Try on your own
#
# - Resume with `bn=local` (in both runs): it resumes, but from step 16 on
#   the two curves part, by more than rounding: 2 ranks normalize in 2
#   groups of 6 images, 1 process in one group of 12.
# - Interrupt a run: start it with `--save-on-interrupt`, press Ctrl-C (or
#   under mpirun send SIGUSR1) and continue with `--resume auto`.
# - `refimpl-eval` evaluates a checkpoint on its own (kNN, linear probe);
#   `refimpl-export` writes the encoder as a torchvision state dict.
