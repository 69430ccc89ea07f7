"""refimpl-train with every file it writes limited in size: a disk that fills, for the tests.

    python tests/fsize_limited.py BYTES [refimpl-train arguments ...]
    mpirun -np 2 python tests/fsize_limited.py BYTES [...]

RLIMIT_FSIZE makes a write beyond BYTES fail with EFBIG ("File too large"), as
a full disk fails with ENOSPC, in this process only (Python ignores SIGXFSZ).
Under mpirun the limit is set after MPI has started, whose shared-memory
files it would otherwise refuse.
"""
import resource
import sys

from refimpl.parallel.launch import launched_by_mpi

if __name__ == "__main__":
    limit = int(sys.argv[1])
    if launched_by_mpi():
        from mpi4py import MPI  # noqa: F401  (MPI starts here, before the limit)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from refimpl.train.__main__ import main
    sys.exit(main(sys.argv[2:]))
