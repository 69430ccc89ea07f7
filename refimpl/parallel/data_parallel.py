"""Data parallelism: the replicated encoder + head, kept identical on every rank.

Contract.

- ``allreduce_gradients(grad, comm)``: step 9 of docs/design.md's table, ONE
  all-reduce (SUM) over the flat gradient buffer (``ParamStore.grad``).

  Gradient-scale convention (the first thing an oracle user must map): the
  loss is the mean over the *global* batch B, so each rank's backward already
  produces the gradient of its share of that mean, (1/B) sum over its b
  rows. The sum over ranks is then the 1-rank gradient. Gradients are
  summed: never averaged, never multiplied by P. (PyTorch DDP averages,
  because there each rank's loss is the mean over its own b rows; averaging
  (1/b)-scaled gradients gives the same number. Mixing the two conventions
  is off by a factor of P.)

- ``check_replicated(comm, named_arrays)``: a CRC32 checksum of every
  replicated array, all-gathered; any difference between ranks raises on
  every rank, naming the arrays and the ranks. Bitwise, not approximate:
  ranks run identical float operations on identical inputs.

- ``set_batchnorm_mode(net, comm, mode)`` sets the network's one
  ``BatchNormMode`` (``net.bn``, shared by every BatchNorm):
    "local" (default, like DDP): every rank normalizes with its own batch's
            statistics; after each step rank 0's running statistics are
            broadcast (``broadcast_buffers``, DDP's ``broadcast_buffers``
            rule), so evaluation sees the same BN on every rank;
    "sync":  the statistics of the whole global batch: BatchNorm's
            ``allreduce`` hook sums [sum d, sum d^2, count] in forward and
            [sum dout, sum dout * xhat] in backward (layers/batchnorm.py).
  A 1-rank run equals a P-rank run exactly (up to float rounding) with
  "sync", and with "local" against ``net.bn.groups = P`` in one process.
"""
import zlib

import numpy as np

from refimpl.backend import to_numpy

BN_MODES = ("local", "sync")


def allreduce_gradients(grad, comm):
    """Sum the flat gradient buffer over the ranks, in place (one message).

    grad: (P,) ``ParamStore.grad``. After this every rank holds the gradient
    of the global mean loss (module docstring: summed, never averaged).
    """
    return comm.all_reduce(grad, "sum", inplace=True)


def checksum(x):
    """CRC32 of the bytes of x (on the host)."""
    return zlib.crc32(np.ascontiguousarray(to_numpy(x)).view(np.uint8))


def check_replicated(comm, named_arrays):
    """Raise RuntimeError on every rank unless each array is bitwise equal on all ranks.

    named_arrays: dict name -> array (e.g. {"params": store.data,
    "buffers": store.buffer_data}). One all_gather of len(named_arrays)
    checksums.
    """
    names = list(named_arrays)
    local = np.array([checksum(named_arrays[n]) for n in names], dtype=np.int64)  # (k,)
    table = comm.all_gather(local.reshape(1, -1))                                # (P, k)
    bad = [f"{n} (ranks {np.nonzero(table[:, i] != table[0, i])[0].tolist()} differ "
           f"from rank 0)" for i, n in enumerate(names) if np.any(table[:, i] != table[0, i])]
    if bad:
        raise RuntimeError("replicated arrays differ between ranks: " + "; ".join(bad))


def set_batchnorm_mode(net, comm, mode="local"):
    """Make every BatchNorm of ``net`` per-rank ("local") or synchronized ("sync")."""
    if mode not in BN_MODES:
        raise ValueError(f"bn mode must be one of {BN_MODES}, got {mode!r}")
    net.bn.allreduce = None if mode == "local" else (lambda v: comm.all_reduce(v, "sum"))


def broadcast_buffers(store, comm, root=0):
    """Rank ``root``'s BatchNorm running statistics on every rank (one Bcast)."""
    if store.buffer_data.size:
        comm.bcast(store.buffer_data, root)
