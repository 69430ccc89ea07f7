"""Communicators: the only place where bytes move between ranks.

Contract. Every parallel function in refimpl takes a communicator as an
argument; nothing inside the package reads ``MPI.COMM_WORLD`` but
``launch.world_comm``, with which the program that starts the job makes one:

    comm = MPIComm(MPI.COMM_WORLD)     # under mpirun / srun
    comm = SelfComm()                  # one process, no MPI installed at all

Both have the same methods and run the same code in refimpl; ``SelfComm``
is the size-1 case (its collectives are copies). The methods are the
collectives of one training step, each written next to its adjoint, the
operator its backward needs (Megatron's ``copy_to`` / ``reduce_from`` pairs):

    all_gather(x)      (b, ...) -> (P*b, ...)   rank r's rows land at [r*b, (r+1)*b)
    reduce_scatter(x)  (P*b, ...) -> (b, ...)   sum over ranks, rank r keeps [r*b, (r+1)*b)
        adjoints: sum_r <all_gather(x)_r, g_r> = sum_r <x_r, reduce_scatter(g)_r>
    all_reduce(x, "sum")   sum over ranks, on every rank; its own adjoint
    all_reduce(x, "max")   elementwise max (the softmax shift: no gradient flows
                           through it, softmax does not depend on the shift)
    bcast(x, root)         rank root's values on every rank, in place

and three that move uneven rows outside the step (no gradient flows through
them): ``all_gather_v`` (classifier shards, the neighbour table, features),
``all_to_all_v`` (the contrastive prior's features to the owners of their
rows) and ``ring_shift`` (shards around the ring of the neighbour search).

Checks. Before its first call with a shape and dtype, a collective asks
every rank what it brings (``check_same_shape``: one Allgather of 9 int64,
counted as "shape_check") and refuses on every rank, naming the ranks that
differ, instead of a bare MPI_ERR_TRUNCATE on one rank and silently wrong
values on another; ``all_gather`` asks before every call (its local batch
is where ranks differ first), the others once per shape (``_check_once``),
the uneven ones for the trailing shape and the dtype.

Only MPI's buffer methods (``Allgather``, ``Reduce_scatter_block``,
``Allreduce``, ``Bcast``, ``Allgatherv``, ``Alltoallv``, ``Sendrecv``) are
used, on C-contiguous arrays; never the pickling lower-case ones.

Byte counters. ``comm.counters[op]`` holds ``calls``, ``sent`` and
``received``: the bytes of the buffer this rank hands to the collective and of
the buffer it gets back (for ``all_gather`` of a (b, D) float32 array:
sent b*D*4, received P*b*D*4). This is the payload at the API, the quantity
of docs/design.md's step table; the bytes on the wire depend on MPI's algorithm
(a ring all-reduce moves about 2 (P-1)/P times the buffer).

GPU. CuPy arrays go to MPI directly when the MPI is CUDA-aware, otherwise
through host copies. ``cuda_aware`` is detected (``REFIMPL_CUDA_AWARE_MPI=0|1``
overrides, then Open MPI's ``MPIX_Query_cuda_support``; unknown means no) and
can be forced with the constructor argument. Before any device buffer goes to
MPI the current CUDA stream is synchronized: MPI reads memory, it does not
wait for kernels. (Which GPU a rank uses, and ending the job when one rank
fails, are the launched job's concerns: ``launch.py``.)
"""
import ctypes
import os

import numpy as np

from refimpl.backend import ascontiguous, get_array_module, synchronize, to_numpy

OPS = ("sum", "max")


class _Comm:
    """What both communicators share: checks, GPU staging, byte counting.

    A subclass provides ``rank``, ``size`` and the raw primitives
    ``_allgather(send, recv)``, ``_reduce_scatter(send, recv)``,
    ``_allreduce(send, recv, op)`` (send None = in place), ``_bcast(buf, root)``
    and, for uneven rows, ``_allgatherv``, ``_alltoallv``, ``_sendrecv``, on
    contiguous arrays of one device.
    """

    cuda_aware = True  # overridden by MPIComm

    def __init__(self):
        self.counters = {}
        self._checked = set()  # (op, shape, dtype) every rank has been seen to agree on

    # ---- bookkeeping ------------------------------------------------------
    def _count(self, op, sent, received):
        c = self.counters.setdefault(op, {"calls": 0, "sent": 0, "received": 0})
        c["calls"] += 1
        c["sent"] += int(sent)
        c["received"] += int(received)

    def reset_counters(self):
        """Forget all byte counts (e.g. at the start of a measured step)."""
        self.counters = {}

    def bytes_sent(self):
        """Total bytes this rank handed to collectives since the last reset."""
        return sum(c["sent"] for c in self.counters.values())

    def bytes_received(self):
        """Total bytes this rank got back from collectives since the last reset."""
        return sum(c["received"] for c in self.counters.values())

    # ---- device handling --------------------------------------------------
    def _to_mpi(self, x):
        """The array MPI may read for x: contiguous, on the host unless CUDA-aware."""
        if get_array_module(x) is np:
            return ascontiguous(x)
        if self.cuda_aware:
            x = ascontiguous(x)
            synchronize(x)  # kernels that write x must finish before MPI reads it
            return x
        return np.ascontiguousarray(to_numpy(x))  # host staging (the copy syncs)

    @staticmethod
    def _like(x, host_result):
        """host_result on x's device (no copy when x is a NumPy array)."""
        xp = get_array_module(x)
        return host_result if xp is np else xp.asarray(host_result)

    def _check_rows(self, name, x):
        if x.ndim < 1:
            raise ValueError(f"{name}: needs an array with a leading row axis, got a scalar")

    def check_same_shape(self, name, x):
        """Raise ValueError on every rank unless every rank brings x's shape and dtype.

        One Allgather of 9 int64 per rank (counted as "shape_check"; not part
        of docs/design.md's payload table). Without it, ranks with different local
        batches make MPI hang or fail with a bare MPI_ERR_TRUNCATE, and a
        shorter buffer on one rank gives wrong values on another, silently.
        The message names every rank that differs from rank 0 and what it brings.
        """
        if self.size == 1:
            return
        if x.ndim > 7:
            raise ValueError(f"{name}: arrays of more than 7 axes are not supported")
        desc = np.full(9, -1, dtype=np.int64)                      # ndim, shape..., dtype
        desc[0], desc[1:1 + x.ndim], desc[8] = x.ndim, x.shape, np.dtype(x.dtype).num
        table = np.empty((self.size, 9), dtype=np.int64)
        self._allgather(desc, table)
        self._count("shape_check", desc.nbytes, table.nbytes)
        if np.all(table == table[0]):
            return
        shapes = [tuple(int(v) for v in row[1:1 + row[0]]) for row in table]
        if name == "all_gather" and all(s[1:] == shapes[0][1:] for s in shapes) \
                and len(set(table[:, 8])) == 1 and all(len(s) == len(shapes[0]) for s in shapes):
            rows = [s[0] for s in shapes]
            B = sum(rows)
            hint = (f"B = {B} is not divisible by P = {self.size}" if B % self.size else
                    "every rank needs the same number of rows")
            raise ValueError(f"{name}: the ranks bring different numbers of rows ("
                             + ", ".join(f"rank {q}: {n}" for q, n in enumerate(rows))
                             + f"): {hint}")
        bad = [q for q in range(self.size) if not np.array_equal(table[q], table[0])]
        said = "; ".join(f"rank {q}: {shapes[q]} {_dtype_name(table[q, 8])}"
                         for q in [0] + bad[:3]) + (f"; {len(bad) - 3} more" if len(bad) > 3
                                                     else "")
        raise ValueError(f"{name}: rank(s) {bad} bring another shape or dtype than rank 0 "
                         f"({said}): every rank must pass the same shape and dtype")

    def _check_once(self, name, x):
        """``check_same_shape`` the first time this communicator sees (name, shape, dtype).

        Every rank calls the collectives in the same order, so ranks that
        bring the same shape make the same choice to check or not, and ranks
        that disagree from the first call of a shape on are caught there.
        Later calls with a shape already agreed on cost nothing. Not caught:
        one rank switching to a shape it has not used while the others repeat
        one already checked (it checks alone); refimpl's callers pass shapes
        fixed by the config (B, D, G) and by N, which the programs check
        before the first step (``agreement``).
        """
        if self.size == 1:
            return
        key = (name, tuple(x.shape), np.dtype(x.dtype).str)
        if key not in self._checked:
            self.check_same_shape(name, x)
            self._checked.add(key)

    # ---- all-gather and its adjoint, reduce-scatter ------------------------
    def all_gather(self, x, check=True):
        """(b, ...) on every rank -> (P*b, ...) on every rank, rank order.

        Rank r's rows land at [r*b, (r+1)*b). Every rank must pass the same
        shape: ``check_same_shape`` verifies it first (check=False skips
        that, where the caller has just checked an array of the same b).
        Adjoint: ``reduce_scatter``.
        """
        self._check_rows("all_gather", x)
        if check:
            self.check_same_shape("all_gather", x)
        send = self._to_mpi(x)
        xp = get_array_module(send)
        recv = xp.empty((self.size * x.shape[0],) + x.shape[1:], dtype=send.dtype)
        self._allgather(send, recv)
        self._count("all_gather", send.nbytes, recv.nbytes)
        return self._like(x, recv)

    def reduce_scatter(self, x):
        """(P*b, ...) on every rank -> (b, ...): the sum over ranks of rows [r*b, (r+1)*b).

        Adjoint of ``all_gather``: all-gather copies each rank's rows to every
        rank, so the gradient of those rows is the sum of every rank's
        gradient of them.
        """
        self._check_rows("reduce_scatter", x)
        self._check_once("reduce_scatter", x)
        if x.shape[0] % self.size:
            raise ValueError(f"reduce_scatter: {x.shape[0]} rows do not split evenly "
                             f"over {self.size} ranks")
        send = self._to_mpi(x)
        xp = get_array_module(send)
        recv = xp.empty((x.shape[0] // self.size,) + x.shape[1:], dtype=send.dtype)
        self._reduce_scatter(send, recv)
        self._count("reduce_scatter", send.nbytes, recv.nbytes)
        return self._like(x, recv)

    # ---- uneven rows: all_gather_v, all_to_all_v, ring_shift ----------------
    def all_gather_v(self, x, counts=None):
        """(n_r, ...) on rank r -> (sum_r n_r, ...) on every rank, rank order.

        The uneven all-gather (Allgatherv): ranks may bring different numbers
        of rows (the classifier's uneven shards), the same trailing shape and
        dtype. counts: the n_r of every rank, if the caller knows them (e.g.
        from ``shard_range``); None asks every rank first (one Allgather of P
        integers).
        """
        self._check_rows("all_gather_v", x)
        self._check_once("all_gather_v", x[:0])  # the trailing shape and the dtype
        if counts is None:
            counts = self.all_gather(np.array([x.shape[0]], dtype=np.int64)).tolist()
        counts = [int(c) for c in counts]
        if len(counts) != self.size or counts[self.rank] != x.shape[0]:
            raise ValueError(f"all_gather_v: counts {counts} do not fit rank {self.rank}'s "
                             f"{x.shape[0]} rows in a world of {self.size}")
        send = self._to_mpi(x)
        xp = get_array_module(send)
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        recv = xp.empty((sum(counts),) + x.shape[1:], dtype=send.dtype)
        self._allgatherv(send, recv, [c * row for c in counts])
        self._count("all_gather_v", send.nbytes, recv.nbytes)
        return self._like(x, recv)

    def all_to_all_v(self, x, send_counts, recv_counts):
        """Rows to the ranks that need them (Alltoallv).

        x (sum(send_counts), ...): the rows for rank 0 first, then those for
        rank 1, ...; send_counts[q] rows go to rank q. Returns
        (sum(recv_counts), ...): recv_counts[q] rows from rank q, in rank
        order. Every rank must know what it receives (``recv_counts``), as
        the contrastive prior does: the ids of a global batch are known
        everywhere.
        """
        self._check_rows("all_to_all_v", x)
        self._check_once("all_to_all_v", x[:0])  # the trailing shape and the dtype
        send_counts, recv_counts = [int(c) for c in send_counts], [int(c) for c in recv_counts]
        if len(send_counts) != self.size or len(recv_counts) != self.size \
                or sum(send_counts) != x.shape[0]:
            raise ValueError(f"all_to_all_v: send_counts {send_counts} (for {x.shape[0]} rows) "
                             f"and recv_counts {recv_counts} need one entry per rank of "
                             f"{self.size}")
        send = self._to_mpi(x)
        xp = get_array_module(send)
        row = int(np.prod(x.shape[1:], dtype=np.int64))
        recv = xp.empty((sum(recv_counts),) + x.shape[1:], dtype=send.dtype)
        self._alltoallv(send, [c * row for c in send_counts], recv,
                        [c * row for c in recv_counts])
        self._count("all_to_all_v", send.nbytes, recv.nbytes)
        return self._like(x, recv)

    def ring_shift(self, x, recv_shape):
        """Send x to rank r + 1, receive rank r - 1's array (mod P), one Sendrecv.

        recv_shape: the shape of what rank r - 1 sends (shards have known,
        possibly different, sizes). After P - 1 shifts every rank has seen
        every rank's x once: the ring the neighbour search walks.
        """
        send = self._to_mpi(x)
        xp = get_array_module(send)
        recv = xp.empty(tuple(recv_shape), dtype=send.dtype)
        self._sendrecv(send, (self.rank + 1) % self.size, recv, (self.rank - 1) % self.size)
        self._count("ring_shift", send.nbytes, recv.nbytes)
        return self._like(x, recv)

    # ---- all-reduce (self-adjoint) and broadcast ----------------------------
    def all_reduce(self, x, op="sum", inplace=False):
        """The elementwise sum (or max) of x over the ranks, on every rank.

        inplace=True writes the result into x (MPI_IN_PLACE: no second buffer
        of x's size, which matters for the flat gradient buffer) and returns x.
        The sum is its own adjoint (the gradient of a replicated sum is the
        replicated sum of the gradients).
        """
        if op not in OPS:
            raise ValueError(f"all_reduce: op must be one of {OPS}, got {op!r}")
        self._check_once("all_reduce", x)
        send = self._to_mpi(x)
        if inplace:
            self._allreduce(None, send, op)
            self._count("all_reduce_" + op, send.nbytes, send.nbytes)
            if send is not x:  # staged or made contiguous: copy the result back
                x[...] = self._like(x, send)
            return x
        recv = get_array_module(send).empty_like(send)
        self._allreduce(send, recv, op)
        self._count("all_reduce_" + op, send.nbytes, recv.nbytes)
        return self._like(x, recv)

    def bcast(self, x, root=0):
        """Overwrite x, in place, with rank ``root``'s x; returns x."""
        self._check_once("bcast", x)
        buf = self._to_mpi(x)
        self._bcast(buf, root)
        self._count("bcast", buf.nbytes if self.rank == root else 0,
                    0 if self.rank == root else buf.nbytes)
        if buf is not x:
            x[...] = self._like(x, buf)
        return x


class SelfComm(_Comm):
    """The size-1 communicator: refimpl's parallel code without MPI.

    Collectives are copies (so a result never aliases its input, as with
    MPI) and are counted like MPI's, so one process runs exactly the code
    path of a P-rank job.
    """

    rank, size, local_rank, local_size = 0, 1, 0, 1

    def _allgather(self, send, recv):
        recv[...] = send

    _reduce_scatter = _allgather

    def _allgatherv(self, send, recv, counts):
        recv[...] = send

    def _alltoallv(self, send, send_counts, recv, recv_counts):
        recv[...] = send

    def _sendrecv(self, send, dest, recv, source):
        recv[...] = send

    def _allreduce(self, send, recv, op):
        if send is not None:
            recv[...] = send

    def _bcast(self, buf, root):
        if root != 0:
            raise ValueError(f"bcast: root {root} does not exist in a size-1 communicator")

    def barrier(self):
        pass

    def abort(self, code=1):
        """One process: nothing else can hang; leave the exception to propagate."""


class MPIComm(_Comm):
    """An mpi4py communicator (e.g. ``MPI.COMM_WORLD``) with refimpl's methods.

    cuda_aware: None (detect: REFIMPL_CUDA_AWARE_MPI, then Open MPI's
    MPIX_Query_cuda_support, else False) or a bool to force it.
    """

    def __init__(self, mpi_comm, cuda_aware=None):
        super().__init__()
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = mpi_comm
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        # The rank among the processes on this node (which GPU to use) and their
        # number (how many cores each may use).
        node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.cuda_aware = detect_cuda_aware_mpi() if cuda_aware is None else bool(cuda_aware)
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX}

    def _allgather(self, send, recv):
        self.comm.Allgather(send, recv)

    def _reduce_scatter(self, send, recv):
        self.comm.Reduce_scatter_block(send, recv, op=self.MPI.SUM)

    def _allgatherv(self, send, recv, counts):
        self.comm.Allgatherv(send, [recv, (counts, _displacements(counts))])

    def _alltoallv(self, send, send_counts, recv, recv_counts):
        self.comm.Alltoallv([send, (send_counts, _displacements(send_counts))],
                            [recv, (recv_counts, _displacements(recv_counts))])

    def _sendrecv(self, send, dest, recv, source):
        self.comm.Sendrecv(send, dest=dest, recvbuf=recv, source=source)

    def _allreduce(self, send, recv, op):
        self.comm.Allreduce(self.MPI.IN_PLACE if send is None else send, recv,
                            op=self._ops[op])

    def _bcast(self, buf, root):
        self.comm.Bcast(buf, root=root)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        """End every rank of the job now (MPI_Abort)."""
        self.comm.Abort(code)


def _dtype_name(num):
    """The name of the NumPy dtype whose ``dtype.num`` is ``num`` (as a shape check sends it)."""
    for t in np.sctypeDict.values():
        if np.dtype(t).num == num:
            return np.dtype(t).name
    return f"dtype #{num}"


def _displacements(counts):
    """Start of each rank's part in a buffer holding ``counts`` elements per rank."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()


def detect_cuda_aware_mpi():
    """True when MPI can read CuPy (device) buffers directly.

    REFIMPL_CUDA_AWARE_MPI=1|0 decides if set. Otherwise ask Open MPI's
    ``MPIX_Query_cuda_support()`` in the already-loaded libmpi (built with
    CUDA *and* CUDA support active at run time). Any other MPI, or no answer:
    False, and device buffers are staged through the host (always correct,
    only slower).
    """
    env = os.environ.get("REFIMPL_CUDA_AWARE_MPI")
    if env is not None:
        if env not in ("0", "1"):
            raise ValueError(f"REFIMPL_CUDA_AWARE_MPI must be 0 or 1, got {env!r}")
        return env == "1"
    try:
        for name in ("libmpi.so.40", "libmpi.so"):
            try:
                lib = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            query = getattr(lib, "MPIX_Query_cuda_support", None)
            if query is not None:
                query.restype = ctypes.c_int
                return bool(query())
    except (AttributeError, OSError):  # no RTLD_NOLOAD (not Linux/macOS)
        pass
    return False
