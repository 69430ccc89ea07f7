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
