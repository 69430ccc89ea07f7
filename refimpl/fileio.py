"""File helpers shared by the packed datasets and the checkpoints.

    sha256_file(path)  the hex sha256 of a file, read in 4 MiB chunks (never
                       all at once: an N x D classifier file is gigabytes)
    fsync_path(path)   flush a file's or a directory's data to the disk (a
                       directory's fsync makes a rename inside it durable)
    write_shard_rows(path, rows, lo, shape, dtype, comm)
                       every rank writes its rows of one (N, D) .npy file
                       through a memory map (checkpoints, traces)
"""
import hashlib
import os

import numpy as np

from refimpl.backend import to_numpy


def sha256_file(path, chunk=1 << 22):
    """Hex sha256 of the bytes of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path):
    """os.fsync of a file or a directory, opened read-only by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard_rows(path, rows, lo, shape, dtype, comm):
    """Every rank writes its rows [lo, lo + n) of an (N, D) .npy file; rank 0 creates it.

    Collective (a barrier between creating and writing); the file holds the
    whole W whatever the number of ranks, so any P' can read it. Each rank
    fsyncs its own writes.
    """
    if comm.rank == 0:
        np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    comm.barrier()
    mm = np.load(path, mmap_mode="r+")
    mm[lo:lo + rows.shape[0]] = to_numpy(rows)
    mm.flush()
    del mm
    fsync_path(path)
