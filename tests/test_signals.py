"""Stop signals at any phase (refimpl.parallel.signals): within seconds, exit 128 + signal.

In the step loop a signal waits for the end of the step (every rank together,
a checkpoint first with --save-on-interrupt: tests/test_resume.py); anywhere
else (opening data, the prior, the monitor, the probe, saving, after the last
step) it stops the job at once; a second signal ends the process at once.
Formerly a Ctrl-C during the prior waited for the whole prior, and one after
the last step let the run finish with exit status 0.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from refimpl.parallel.signals import Interrupted, StopSignals
from test_resume import launch
from test_train import TINY

from mpi_run import ENV, ROOT

BIG_PRIOR = [a for a in TINY if not a.startswith("train=")] + [
    "train=synthetic:n=1000,size=8,classes=4,seed=0", "eval_every=0", "save_every=0"]


@pytest.fixture
def handlers():
    """Put back the signal handlers of pytest after the test."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_a_signal_outside_the_step_loop_stops_at_once(handlers):
    signals = StopSignals("prog").install()
    with pytest.raises(Interrupted) as e:
        with signals.phase("the contrastive prior"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted: the handler raises in the main thread
            raise AssertionError("not stopped")
    assert str(e.value) == "SIGTERM during the contrastive prior" and e.value.signum == 15
    assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a second one: at once


def test_a_signal_in_the_step_loop_waits_for_the_check(handlers, capfd):
    """Recorded and announced; the program's check (any_rank) sees it and acts (a save
    first, not itself stopped), then stops."""
    signals = StopSignals("prog").install()
    with pytest.raises(KeyboardInterrupt, match="acted on"):
        with signals.phase("the steps of epoch 1", cooperative=True):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert signals.signum == signal.SIGINT  # recorded, the step goes on
            assert signals.any_rank(_OneRank()) == signal.SIGINT
            signals.acting = True  # e.g. saving a checkpoint first
            with signals.phase("saving a checkpoint"):
                pass
            raise KeyboardInterrupt("acted on")  # what the trainer's TrainingInterrupted does
    assert "prog: SIGINT received: stopping at the end of this step" in capfd.readouterr().err


def test_a_signal_after_the_last_check_stops_when_the_step_loop_ends(handlers):
    signals = StopSignals("prog").install()
    with pytest.raises(Interrupted, match="SIGINT during the steps of epoch 2"):
        with signals.phase("the steps of epoch 2", cooperative=True):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signals.signum == signal.SIGINT


class _OneRank:
    """What any_rank needs of a communicator, for one process."""
    rank, size = 0, 1

    def all_reduce(self, x, op):
        return x.copy()


def test_a_second_signal_ends_the_process_at_once():
    """A program busy in a step (the first Ctrl-C waits for its end) ends at the second."""
    code = ("import time; from refimpl.parallel.signals import StopSignals\n"
            "s = StopSignals('prog').install()\n"
            "with s.phase('a long step', cooperative=True):\n"
            "    print('in', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    assert proc.stdout.readline() == "in\n"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None  # the first waits for the end of the step
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGINT and time.monotonic() - start < 5  # shell: 130


def test_ctrl_c_during_the_prior_stops_within_seconds(tmp_path):
    run = tmp_path / "run"
    proc = launch([*BIG_PRIOR, f"out={run}"], None)
    for line in proc.stdout:  # the prior starts after the random-init kNN line
        if line.startswith("kNN random init"):
            break
    time.sleep(0.3)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert time.monotonic() - start < 10 and "contrastive prior:" not in out  # it did not finish
    assert err.splitlines()[-1] == ("refimpl-train: interrupted: SIGINT during the contrastive "
                                    "prior")
    assert "Traceback" not in err and not (run / "lock").exists()


def test_a_signal_after_the_last_step_never_exits_0(tmp_path):
    """SIGTERM once the last epoch's line is out: during the plot, the checkpoint or the
    linear probe that follow, the run stops with 143, not 0."""
    run = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("test=")] + [
        "test=synthetic:n=3000,size=8,classes=4,seed=1", "linear_probe=true", f"out={run}"]
    proc = launch(args, None)
    for line in proc.stdout:
        if line.startswith("epoch 2/2: loss"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert "summary" not in out and "linear probe (frozen" not in out
    last = err.splitlines()[-1]  # during the plot: at the end of the epoch's bookkeeping
    assert last.startswith(("refimpl-train: interrupted: SIGTERM during ",
                            "refimpl-train: interrupted: SIGTERM at step 12 (the end of "
                            "epoch 2)")), err[-3000:]
    assert "Traceback" not in err


def _rank_pids(proc):
    """{rank: pid} of the refimpl-train processes mpirun started (from /proc)."""
    ranks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"refimpl.train" in cmdline and os.getsid(int(pid)) == os.getsid(proc.pid) \
                and b"OMPI_COMM_WORLD_RANK" in env:
            ranks[int(env[b"OMPI_COMM_WORLD_RANK"])] = int(pid)
    return ranks


@pytest.mark.mpi
def test_a_signal_to_one_rank_during_the_prior_ends_the_job(tmp_path):
    """Rank 1 alone gets SIGTERM while rank 0 may wait for it in a collective: the job
    ends within seconds with 143 (MPI_Abort(128 + 15)), no hang."""
    run = tmp_path / "run"
    proc = launch([*BIG_PRIOR, f"out={run}"], 2)
    for line in proc.stdout:
        if line.startswith("kNN random init"):
            break
    time.sleep(0.3)
    pids = _rank_pids(proc)
    assert sorted(pids) == [0, 1], pids
    start = time.monotonic()
    os.kill(pids[1], signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert time.monotonic() - start < 20 and "contrastive prior:" not in out
    assert "Traceback" not in err
