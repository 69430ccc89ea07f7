"""Traces across world sizes, under real mpirun: a P-rank trace replays on P ranks and on 1.

- refimpl-train --trace on 2 ranks (local BatchNorm): ``refimpl-oracle replay
  --ranks 2`` reproduces every tensor bit for bit (the same machine, P, kernel and
  threads), ``mpirun -n 2 refimpl-oracle replay`` is the same command, and one
  process (BatchNorm in 2 groups) agrees to 1e-10;
- a 3-rank trace with uneven shards (N = 37: 12, 12, 13 rows), sync
  BatchNorm and the classifier as touched rows + per-shard checksums
  (tests/oracle_worker.py) replays in one process.
"""
import subprocess
import sys

import numpy as np
import pytest

from refimpl.oracle import Trace, compare_traces, format_trace_report, replay
from refimpl.oracle.compare import worst_row

from mpi_run import ENV, ROOT, run_ranks
from tolerances import LAYER64, STEPS64

pytestmark = pytest.mark.mpi
TINY = ["train=synthetic:n=48,size=8,classes=4,seed=0", "width=1", "head_hidden=8", "dim=16",
        "batch_size=8", "epochs=1", "warmup_epochs=0", "k=3", "lr=0.1", "smooth_from_epoch=0",
        "knn_k=[5]", "eval_every=0", "dtype=float64"]


def test_refimpl_train_trace_on_2_ranks(tmp_path):
    trace = tmp_path / "trace"
    proc, _ = run_ranks(2, "-m", "refimpl.train", *TINY, f"out={tmp_path / 'run'}",
                        "--trace", trace, "--trace-steps", 2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hp = Trace(trace).hparams
    assert (hp["world_size"], hp["bn"], hp["batch_size"]) == (2, "local", 8)
    # the CLI launching mpirun itself, keeping refimpl's trace
    rep = subprocess.run([sys.executable, "-m", "refimpl.oracle", "replay", trace, "--ranks",
                          "2", "--out", tmp_path / "ours2", "-q"],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=240)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    assert rep.stdout.rstrip().endswith("result: all 678 tensors agree")
    same = compare_traces(tmp_path / "ours2", trace, 0.0, 0.0)     # bit for bit
    assert same["ok"], format_trace_report(same, True)
    # started under mpirun
    rep, _ = run_ranks(2, "-m", "refimpl.oracle", "replay", trace, "-q", timeout=240)
    assert rep.returncode == 0 and rep.stdout.count("result: all 678 tensors agree") == 1, \
        rep.stdout[-3000:] + rep.stderr[-3000:]
    # one process: local BatchNorm as 2 groups
    replay(trace, tmp_path / "ours1")
    # 2 steps, P = 2 against 1 process: STEPS64 relative, LAYER64 for tensors that are 0
    # up to rounding (refimpl's defaults, 1e-10 and 1e-12, are 80x above the error here)
    result = compare_traces(tmp_path / "ours1", trace, STEPS64, LAYER64)
    assert result["ok"], format_trace_report(result, True)
    rows = [r for _, rs in result["sections"] for r in rs]
    # 2 steps of P = 2 against 1 process: STEPS64 (measured up to 1.5e-12)
    assert worst_row(rows, result["rtol"], result["atol"])["rel"] < STEPS64


def test_uneven_shards_rows_and_checksums_on_3_ranks(tmp_path):
    trace = tmp_path / "trace"
    proc, _ = run_ranks(3, ROOT / "tests" / "oracle_worker.py", trace, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = Trace(trace)
    assert (t.meta["classifier"], t.hparams["world_size"], t.hparams["bn"]) == ("rows", 3, "sync")
    st = t.step(0)
    rows = st["classifier.rows"]
    np.testing.assert_array_equal(rows, np.unique(np.concatenate([st["ids"],
                                                                  st["neighbours"].ravel()])))
    assert st["classifier.weight@rows"].shape == (rows.size, 16)
    checks = st["checksum/classifier.weight"]
    assert checks.shape == (3, 2) and np.all(checks[:, 1] > 0)
    replay(trace, tmp_path / "ours")                  # 1 process, sync BN: the global batch
    result = compare_traces(tmp_path / "ours", trace)  # defaults: 100x above the error here
    assert result["ok"], format_trace_report(result, True)
    ours = Trace(tmp_path / "ours").step(1)
    # sums of a shard's 192 entries of W after 2 steps, 1 process vs 3 (measured 7e-15)
    np.testing.assert_allclose(ours["checksum/classifier.weight"],
                               t.step(1)["checksum/classifier.weight"], rtol=LAYER64)


def test_float32_trace_replayed_under_mpirun_uses_the_noise_floor(tmp_path):
    """``mpirun -n 2 refimpl-oracle replay`` of refimpl's own float32 trace agrees,
    as ``--ranks 2`` does: both compare through the float32 noise floor (the
    mpirun path once compared without it and reported 10 of 678 tensors)."""
    trace = tmp_path / "trace"
    f32 = [a for a in TINY if not a.startswith("dtype=")] + ["dtype=float32"]
    proc, _ = run_ranks(2, "-m", "refimpl.train", *f32, f"out={tmp_path / 'run'}",
                        "--trace", trace, "--trace-steps", 2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep, _ = run_ranks(2, "-m", "refimpl.oracle", "replay", trace, "-q", timeout=240)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    assert rep.stdout.count("result: all 678 tensors agree") == 1
    assert "within the noise floor" in rep.stdout
