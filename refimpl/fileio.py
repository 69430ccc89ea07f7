"""File helpers shared by the packed datasets and the checkpoints.

    sha256_file(path)  the hex sha256 of a file, read in 4 MiB chunks (never
                       all at once: an N x D classifier file is gigabytes)
    fsync_path(path)   flush a file's or a directory's data to the disk (a
                       directory's fsync makes a rename inside it durable)
"""
import hashlib
import os


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
