"""The fault drill: SIGKILL a 2-rank training run at 10 moments, resume, and finish
with exactly the result of a run that was never interrupted.

One run (tiny network, float64, a checkpoint every epoch) is killed 10 times:
at odd kills the moment a checkpoint write has begun (its temporary directory
exists), at even kills at a random time while it trains. mpirun and every
rank die at once (SIGKILL to the whole session: the ranks are not mpirun's
process group). After each kill the latest checkpoint must load and verify,
no half-written checkpoint may count as one, and ``--resume auto`` continues.
At the end every saved tensor and the loss curve are bitwise those of the
uninterrupted run.
"""
import json
import os
import signal
import time

import numpy as np
import pytest

from refimpl import checkpoint
from test_resume import launch, same_state, step_losses
from test_train import TINY, train

pytestmark = [pytest.mark.mpi, pytest.mark.slow]
ARGS = [*TINY, "dtype=float64", "epochs=8", "eval_every=0", "keep=2"]


def kill_session(proc):
    """SIGKILL every process of the run's session (mpirun and its ranks)."""
    if proc.poll() is not None:  # it finished before the moment came: nothing to kill
        return
    sid = os.getsid(proc.pid)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # the session id
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait(timeout=30)


def wait_for(condition, proc, timeout=120, poll=0.002):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return True
        if proc.poll() is not None:
            return False  # the run finished before the moment came
        time.sleep(poll)
    raise AssertionError("timed out")


def training_started(run):
    m = run / "metrics.jsonl"
    return m.exists() and '"kind": "step"' in m.read_text()


def test_fault_drill(tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert train(*ARGS, f"out={reference}", ranks=2).returncode == 0
    g = np.random.default_rng(0)
    inside_saves = 0
    relaunched = []
    for kill in range(10):
        while True:
            proc = launch([*ARGS, f"out={run}", "--resume", "auto"], ranks=2)
            if kill % 2:   # the moment a checkpoint write has begun
                hit = wait_for(lambda: any(run.glob(".tmp-ckpt-*")), proc)
            else:          # a random moment of training
                hit = wait_for(lambda: training_started(run), proc)
                if hit:
                    time.sleep(g.uniform(0, 1.0))
            if hit or proc.poll() is None or proc.returncode == 0:
                break
            # The run failed before the moment came. Once in a CI run, mpirun
            # exited with status 213 here, right after the previous session
            # was killed (a launcher hiccup; not reproduced in 30 more kills):
            # one relaunch, and a second failure fails the drill with stderr.
            err = proc.communicate()[1]
            assert not relaunched, (f"kill {kill}: the resumed run failed twice "
                                    f"(status {proc.returncode}):\n{err[-3000:]}")
            relaunched.append((kill, proc.returncode, err[-3000:]))
            print(f"kill {kill}: relaunching after status {proc.returncode}:\n{err[-3000:]}")
        inside = kill % 2 and any(run.glob(".tmp-ckpt-*"))
        kill_session(proc)
        inside_saves += bool(inside)
        latest = checkpoint.latest_checkpoint(run)
        if latest is not None:  # what is left must load and verify
            meta = checkpoint.verify(latest)
            assert meta["world_size"] == 2 and (latest / "meta.json").is_file()
    assert inside_saves >= 3, f"only {inside_saves} kills landed inside a checkpoint write"
    proc = launch([*ARGS, f"out={run}", "--resume", "auto"], ranks=2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert not list(run.glob(".tmp-*"))
    same_state(run, reference, exact=True)
    assert step_losses(run) == step_losses(reference)
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "epoch"] == list(range(8))
