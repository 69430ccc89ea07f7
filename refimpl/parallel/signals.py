"""Stop signals at any phase of a job: within seconds, exit status 128 + signal, never 0.

Contract. A program installs one ``StopSignals`` at its very start (before
it reads its config or opens data) and names the phase it is in:

    signals = StopSignals("refimpl-train").install()
    signals.comm = comm                           # once the job's communicator exists
    with signals.phase("the contrastive prior"):
        ...                                       # SIGINT here: stop now
    with signals.phase("training", cooperative=True):
        ...                                       # SIGINT here: stop at the step's end

SIGINT (Ctrl-C), SIGTERM and SIGUSR1 are handled alike:

* in a **cooperative** phase (the step loop) the signal is only recorded;
  the program asks at the end of every step whether any rank got one
  (``any_rank``: one Allreduce MAX of one float64) and every rank stops
  there together, after a checkpoint if asked (``--save-on-interrupt``;
  ``acting`` is then set, so that saving is not itself stopped);
* in **any other phase** (opening data, the prior, the neighbour search,
  the kNN monitor, the linear probe, saving, the end of the run) the job
  stops now: alone, ``Interrupted`` is raised in the main thread and the
  program exits 128 + signal; under MPI the receiving rank says so (rank 0)
  and ends every rank with ``MPI_Abort(128 + signal)``, since the others may
  be waiting for it in a collective (mpirun then exits 128 + signal too);
* leaving a cooperative phase with a signal recorded but not yet acted on
  (it came after the last check) stops now, as above.

The first signal puts the default action back for all three, so a second
one ends the process at once, even inside a long computation or an MPI
call (the shell then reports 128 + signal). A checkpoint being written is
never damaged by that: saves are published by one rename
(``refimpl.fileio``).

``Interrupted`` derives from BaseException, like KeyboardInterrupt: an
``except Exception`` on the way does not swallow it.
"""
import contextlib
import os
import signal
import sys

import numpy as np

from refimpl.backend import to_numpy

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# any_rank's answer when a rank failed (e.g. rank 0 could not write its log):
# above every signal number, so a failure wins over a signal
FAILED = 1000


class Interrupted(BaseException):
    """A stop signal ended the job; ``signum`` says which (exit status 128 + signum)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """The stop signals of one process: what arrived, and in which phase (module docstring).

    prog: the program's name, in the one line said on a signal; comm: the
    job's communicator (None until it exists: a signal before then stops
    this process alone).
    """

    def __init__(self, prog, comm=None):
        self.prog, self.comm = prog, comm
        self.signum = 0            # the first stop signal received (0: none)
        self.where = "starting"    # the phase, as the message names it
        self.cooperative = False
        self.acting = False        # the program is acting on the signal (e.g. saving first)
        self.announce = "stopping at the end of this step"

    def install(self):
        """Handle SIGINT, SIGTERM and SIGUSR1 in this process; returns self."""
        for s in STOP_SIGNALS:
            signal.signal(s, self._handler)
        return self

    def _handler(self, signum, frame):
        if not self.signum:
            self.signum = signum
        for s in STOP_SIGNALS:  # a second signal: the default action, at once
            signal.signal(s, signal.SIG_DFL)
        if self.cooperative:
            if self._speaks():
                self._say(f"{signal.Signals(signum).name} received: {self.announce}")
            return
        self.stop_now()

    def _speaks(self):
        return self.comm is None or self.comm.rank == 0

    def _say(self, text):
        os.write(2, f"{self.prog}: {text}\n".encode())

    def message(self):
        return f"{signal.Signals(self.signum).name} during {self.where}"

    def stop_now(self):
        """Stop this job now for the recorded signal (module docstring)."""
        if self.comm is None or self.comm.size == 1:
            raise Interrupted(self.message(), self.signum)
        if self._speaks():
            self._say(f"interrupted: {self.message()}: ending every rank now")
        self.comm.abort(128 + self.signum)

    @contextlib.contextmanager
    def phase(self, where, cooperative=False):
        """Run the body as phase ``where``; cooperative: signals wait for ``any_rank``."""
        before = (self.where, self.cooperative)
        self.where, self.cooperative = where, cooperative
        if self.signum and not cooperative and not self.acting:
            self.stop_now()  # came in the gap before this phase
        try:
            yield self
            if self.signum and cooperative and not self.acting:
                self.cooperative = False
                self.stop_now()  # arrived after the last check of the cooperative phase
        finally:
            self.where, self.cooperative = before

    def any_rank(self, comm, failed=False):
        """Collective: the signal any rank received (0: none), or FAILED if any rank
        ``failed``. One Allreduce MAX of one float64."""
        mine = float(FAILED if failed else self.signum)
        return int(to_numpy(comm.all_reduce(np.array([mine]), "max"))[0])


def run_program(prog, body, *args):
    """A program's main under stop signals: ``body(signals, *args)`` with
    ``StopSignals(prog)`` installed first of all; an ``Interrupted`` is one
    line (rank 0 only, once ``signals.comm`` is set) and exit status 128 + signal."""
    signals = StopSignals(prog).install()
    try:
        return body(signals, *args)
    except Interrupted as e:
        if signals.comm is None or signals.comm.rank == 0:
            print(f"{prog}: interrupted: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
