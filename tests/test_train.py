"""refimpl-train end to end, on tiny runs: CLI, run directory, errors, dry run, P = 2 = P = 1.

Every run here is a tiny network (ResNet-18 at width 2, 8 x 8 synthetic images,
48 instances) so that a whole run takes seconds. The P-rank runs use the real
launcher (mpirun); the world-size invariance is checked on the saved
checkpoints: parameters, BN statistics, momenta, the whole W.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from refimpl.parallel.launch import mpirun_command, run_mpirun

from mpi_run import ENV, ROOT
from tolerances import TRAIN64

TINY = ["train=synthetic:n=48,size=8,classes=4,seed=0",
        "test=synthetic:n=24,size=8,classes=4,seed=1",
        "width=2", "head_hidden=8", "dim=8", "batch_size=8", "epochs=2", "k=3",
        "lr=0.1", "warmup_epochs=0.5", "knn_k=[5]", "log_every=3", "eval_every=1"]


def train(*args, ranks=None, timeout=300, mpi_args=()):
    """Run refimpl-train (python -m refimpl.train) alone or under mpirun -np ranks."""
    argv = ["-m", "refimpl.train", *map(str, args)]
    cmd = [sys.executable, *argv] if ranks is None else mpirun_command(ranks, *argv,
                                                                       mpi_args=mpi_args)
    return run_mpirun(cmd, timeout=timeout, env=ENV, cwd=ROOT)


def final_checkpoint(run):
    pointer = (run / "latest").read_text().strip()
    ckpt = run / pointer
    with np.load(ckpt / "replicated.npz") as z:
        replicated = {k: z[k] for k in z.files}
    return (replicated, np.load(ckpt / "classifier.weight.npy"),
            np.load(ckpt / "classifier.momentum.npy"), json.loads((ckpt / "meta.json").read_text()))


def scaled(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def state_errors(a, b):
    """{tensor: error} between the final checkpoints of runs a and b (b the reference).

    max |a - b| / max |b| per tensor; absolute where b is rounding noise
    (max |b| < 1e-12: the momentum of a bias just before a BatchNorm, whose
    gradient is 0 in exact arithmetic).
    """
    ra, Wa, Ma, _ = final_checkpoint(a)
    rb, Wb, Mb, _ = final_checkpoint(b)
    pairs = [(k, ra[k], rb[k]) for k in rb if rb[k].dtype.kind == "f"]
    pairs += [("classifier.weight", Wa, Wb), ("classifier.momentum", Ma, Mb)]
    return {k: scaled(x, y) if np.abs(y).max() > 1e-12 else float(np.abs(x - y).max())
            for k, x, y in pairs}


def test_run_directory_metrics_plot_and_summary(tmp_path):
    run = tmp_path / "run"
    proc = train(*TINY, f"out={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for line in ("kNN raw pixels:", "kNN random init (BN running statistics at their initial "
                 "values", "contrastive prior: 48 rows of W written once each",
                 "method: prior = paper (head features, pass BN statistics, eval transform); "
                 "alpha 0.2 over the K = 3 hardest classes from epoch 2\n",
                 "kNN after the prior", "epoch 2/2: loss", "neighbour label agreement",
                 "summary (weighted kNN on the test split, k = 5):", "trained encoder",
                 f"run directory: {run.resolve()}"):
        assert line in out, line
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(12)) and len(epochs) == 2
    assert all(np.isfinite(r["loss"]) and 0 <= r["top1"] <= 1 for r in steps)
    # the first step's loss is about ln N (a classifier that knows nothing yet)
    assert abs(steps[0]["loss"] - np.log(48)) < 1.5
    assert steps[0]["lr"] == pytest.approx(0.1 * 0.1)  # warm-up starts at 0.1 lr, not 0
    assert set(epochs[-1]["knn"]) == {"pooled", "head"} and "5" in epochs[-1]["knn"]["pooled"]
    assert 0 <= epochs[-1]["agreement"] <= 1
    assert (run / "curves.png").stat().st_size > 10_000
    assert "alpha = 0.2" in (run / "config.toml").read_text()
    prior = [r for r in records if r["kind"] == "prior"]
    assert len(prior) == 1 and -1 <= prior[0]["mean_cosine"] <= 1
    replicated, W, momentum, meta = final_checkpoint(run)
    assert W.shape == (48, 8) and meta["state"]["step"] == 12 and meta["world_size"] == 1
    assert "layer1.0.conv1.weight" in replicated and "momentum/head.3.bias" in replicated


def test_prior_variant_and_why_are_printed(tmp_path):
    """A variant of the prior runs end to end; the method line names it and says why."""
    run = tmp_path / "run"
    proc = train(*TINY, "epochs=1", "prior=whitened", "prior_bn=initial", "prior_mix=0.5",
                 "why='it is a test'", f"out={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("method: prior = whitened (head features, initial BN statistics, eval transform, "
            "mixed 0.5 with the random rows); alpha 0.2 over the K = 3 hardest classes from "
            "epoch 2. Why: it is a test\n") in proc.stdout
    assert "kNN after the prior (BN running statistics put back to their initial" in proc.stdout
    assert 'prior = "whitened"' in (run / "config.toml").read_text()
    proc = train(*TINY, "epochs=1", "prior=false", f"out={tmp_path / 'none'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "method: no contrastive prior; alpha 0.2" in proc.stdout
    assert "contrastive prior:" not in proc.stdout and "after the prior" not in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["alhpa=0.1"], "unknown key 'alhpa' (did you mean 'alpha'?)"),
    (["k=48"], "k = 48 hardest classes per instance needs N > K instances, got N = 48"),
    (["alpha=1"], "alpha must lie in [0, 1), got 1"),
    (["tau=0"], "tau must be > 0"),
    (["train=/nonexistent/data"], "train: cannot open '/nonexistent/data'"),
    (["batch_size=64"], "batch_size B = 64 is larger than the training set (N = 48)"),
])
def test_config_errors_exit_2_with_one_message(tmp_path, args, message):
    proc = train(*TINY, f"out={tmp_path / 'run'}", *args)
    assert proc.returncode == 2
    assert "refimpl-train: error:" in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("args,message", [
    (["prior=zca"], "prior must be one of ['none', 'paper', 'centered', 'whitened'], got 'zca'"),
    (["prior_features=encoder"], "prior_features must be one of ['head', 'pooled']"),
    (["prior_bn=eval"], "prior_bn must be one of ['pass', 'initial'], got 'eval'"),
    (["prior_transform=random"], "prior_transform must be one of ['eval', 'train']"),
    (["prior_scale=0"], "prior_scale must be > 0 (and finite), got 0.0"),
    (["prior_mix=1.5"], "prior_mix must lie in (0, 1], got 1.5"),
    (["prior_mix=half"], "prior_mix must be a number, got 'half'"),
    (["prior_features=pooled"], "prior_features = 'pooled' writes the pooled encoder features"),
])
def test_bad_prior_values_exit_2_with_one_line(tmp_path, args, message):
    """Each new value of the prior, when bad: exit 2, one line naming it, nothing written."""
    proc = train(*TINY, f"out={tmp_path / 'run'}", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("refimpl-train: error:") and message in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.mpi
def test_config_errors_under_mpirun_end_every_rank(tmp_path):
    """B not divisible by P, and an empty training set: one message, no hang."""
    proc = train(*TINY, f"out={tmp_path / 'run'}", "batch_size=9", ranks=2, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("batch_size B = 9 is not divisible by P = 2 ranks") == 1
    proc = train(*TINY, f"out={tmp_path / 'run'}", "train=synthetic:n=0,size=8", ranks=2,
                 timeout=120)
    assert proc.returncode != 0 and "train: cannot open" in proc.stderr


def test_dry_run_prints_memory_and_bytes(tmp_path):
    proc = train(*TINY, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "dry run: N = 48 instances, P = 1 ranks, B = 8" in out
    for part in ("classifier shard: 48 rows x 8", "exp buffer E = exp(logits - block max), B x N_r = 8 x 48",
                 "activations of 8 images (8x8)", "neighbour table 48 x 3",
                 "all_gather z_hat, labels", "reduce_scatter dZ", "all_reduce gradients"):
        assert part in out, part
    # float32: the gather sends b D 4 + 8 b = 8 * 8 * 4 + 64 bytes
    line = next(x for x in out.splitlines() if "all_gather z_hat" in x)
    assert "sent          320" in line and "received          320" in line
    assert "checkpoint on disk: 0.2 MiB each, keep = 2" in out
    assert "fits" in out


def test_dry_run_with_a_dataset_it_cannot_open_is_one_line(tmp_path):
    """--dry-run opened the dataset outside the config checks: a traceback."""
    (tmp_path / "empty").mkdir()
    proc = train(*TINY, "--dry-run", f"train={tmp_path / 'empty'}", "width=3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"refimpl-train: error: train: cannot open "
                                  f"'{tmp_path / 'empty'}': ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.mpi
def test_two_ranks_equal_one_rank(tmp_path):
    """2 epochs on P = 2 equal 2 epochs on P = 1: sync BN, float64, every tensor 1e-8
    (tests/tolerances.py, TRAIN64).

    Prior, neighbours (smoothing from epoch 1), targets, steps, schedule: all of
    it. A negative control (local BN, which normalizes per rank) differs.
    Width 4, B = 16, lr 0.05: at width 2 with B = 8 a tiny network amplifies
    rounding differences about 10x per step (measured: 5e-9 after 12 steps).
    The momentum of head.0.bias is rounding noise on both sides (a bias just
    before a BatchNorm has gradient 0): it is compared absolutely.
    """
    common = [*TINY, "dtype=float64", "bn=sync", "eval_every=0", "width=4", "batch_size=16",
              "lr=0.05"]
    one, two, local = tmp_path / "p1", tmp_path / "p2", tmp_path / "local"
    p1 = train(*common, f"out={one}")
    p2 = train(*common, f"out={two}", ranks=2)
    assert p1.returncode == 0 and p2.returncode == 0, p1.stderr[-2000:] + p2.stderr[-2000:]
    assert final_checkpoint(two)[3]["world_size"] == 2
    errors = state_errors(two, one)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TRAIN64, f"{worst}: {errors[worst]:.3e}"
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()
               if json.loads(x)["kind"] == "step"] for d in (one, two)]
    assert len(losses[0]) == 6 and max(abs(a - b) for a, b in zip(*losses)) <= TRAIN64
    p3 = train(*[a for a in common if a != "bn=sync"], "bn=local", f"out={local}", ranks=2)
    assert p3.returncode == 0, p3.stderr[-2000:]
    assert state_errors(local, one)["classifier.weight"] > 1e-6  # O(1) (1.1): not rounding


@pytest.mark.mpi
def test_hostfile_naming_this_machine_twice(tmp_path):
    """The multi-node launch (mpirun --hostfile): two "hosts", one slot each, that
    are this machine under two names. The run equals the plain 2-rank run."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost\n127.0.0.1\n")
    a, b = tmp_path / "hostfile", tmp_path / "plain"
    args = [*TINY, "epochs=1", "eval_every=0", "dtype=float64"]
    proc = train(*args, f"out={a}", ranks=2, mpi_args=("--hostfile", hosts))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stdout
    assert train(*args, f"out={b}", ranks=2).returncode == 0
    assert max(state_errors(a, b).values()) == 0.0  # same machine, P, kernel, threads: same bits


@pytest.mark.mpi
def test_ranks_with_different_configs_refuse_to_start(tmp_path):
    """Rank 1 started with another alpha (mpirun's MPMD form A : B): every rank
    stops before training, with one message."""
    base = [sys.executable, "-m", "refimpl.train", *TINY, f"out={tmp_path / 'run'}"]
    cmd = mpirun_command(1, *base, "alpha=0.1", ":", "-np", 1, *base, "alpha=0.2", python=False)
    proc = run_mpirun(cmd, timeout=120, env=ENV, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("ranks [1] run another configuration than rank 0") == 1
    assert not (tmp_path / "run").exists()


def test_dry_run_bytes_equal_the_counters_of_a_real_step():
    """cost()'s bytes per step = the communicator's counters of one train_step
    (P = 1, float32), for local and sync BatchNorm; the shape check (P > 1
    only) is not payload."""
    from refimpl.optim.sgd import SGD
    from refimpl.parallel import CosineClassifier, SelfComm, set_batchnorm_mode
    from refimpl.train.config import Config
    from refimpl.train.dry_run import cost
    from refimpl.train.step import train_step
    from refimpl.models.network import build_model
    for bn in ("local", "sync"):
        cfg = Config(train="x", width=2, head_hidden=8, dim=8, batch_size=8, bn=bn, alpha=0)
        _, moved, _ = cost(cfg, 48, 1, 0, image_size=8)
        comm = SelfComm()
        net = build_model("resnet18", "cifar", 2, 8, 8, "float32", "cpu", 0)
        set_batchnorm_mode(net, comm, bn)
        clf = CosineClassifier(48, 8, comm)
        opts = [SGD(net.store.data, net.store.grad, 0.1, 0.9),
                SGD(clf.weight.ravel(), clf.grad.ravel(), 0.1, 0.9)]
        x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
        train_step(net, clf, x, np.arange(8), comm, *opts, topk=(1, 5))
        assert sum(s for s, _ in moved.values()) == comm.bytes_sent(), (bn, moved, comm.counters)
        assert sum(r for _, r in moved.values()) == comm.bytes_received()
