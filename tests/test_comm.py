"""Communicators in one process (refimpl.parallel.comm): ``SelfComm``'s collectives
and byte counters, ``detect_cuda_aware_mpi``, ``abort_on_error``. MPIComm under
mpirun: test_parallel_mpi.py."""
import io

import numpy as np
import pytest

from refimpl.parallel import SelfComm, abort_on_error, detect_cuda_aware_mpi


class DoublingComm(SelfComm):
    """SelfComm whose sum all-reduce doubles, as if a second rank held the same
    values: makes the write-back of an in-place all-reduce visible."""

    def _allreduce(self, send, recv, op):
        recv[...] = (recv if send is None else send) * (2 if op == "sum" else 1)


def test_selfcomm_collectives_copy_and_count():
    """Size-1 collectives return copies and count the bytes exactly."""
    comm = SelfComm()
    x = np.arange(12.0).reshape(3, 4)
    x0 = x.copy()
    for name, out in (("all_gather", comm.all_gather(x)),
                      ("reduce_scatter", comm.reduce_scatter(x)),
                      ("all_reduce_sum", comm.all_reduce(x, "sum")),
                      ("all_reduce_max", comm.all_reduce(x, "max"))):
        np.testing.assert_array_equal(out, x0)
        assert out.dtype == x.dtype and not np.shares_memory(out, x), name
        out += 100  # the result is the caller's: the input does not change
        np.testing.assert_array_equal(x, x0)
        assert comm.counters[name] == {"calls": 1, "sent": 96, "received": 96}, name
    assert comm.bcast(x) is x
    np.testing.assert_array_equal(x, x0)
    assert comm.counters["bcast"] == {"calls": 1, "sent": 96, "received": 0}
    assert comm.bytes_sent() == 5 * 96 and comm.bytes_received() == 4 * 96
    comm.all_gather(x[:, ::2].T)  # non-contiguous input, (2, 3)
    assert comm.counters["all_gather"] == {"calls": 2, "sent": 96 + 48, "received": 96 + 48}
    comm.reset_counters()
    assert comm.counters == {} and comm.bytes_sent() == 0 and comm.bytes_received() == 0


def test_selfcomm_errors():
    """Unknown op, a missing root and a scalar gather raise, counting nothing."""
    comm = SelfComm()
    with pytest.raises(ValueError, match=r"op must be one of \('sum', 'max'\), got 'min'"):
        comm.all_reduce(np.ones(3), "min")
    with pytest.raises(ValueError, match="root 1 does not exist"):
        comm.bcast(np.ones(3), root=1)
    with pytest.raises(ValueError, match="leading row axis"):
        comm.all_gather(np.array(1.0))
    assert comm.counters == {}


@pytest.mark.parametrize("comm_cls", [SelfComm, DoublingComm])
def test_all_reduce_in_place_on_a_view(comm_cls):
    """inplace=True on a strided view writes the result back into the view."""
    comm = comm_cls()
    factor = 2 if comm_cls is DoublingComm else 1
    buf = np.arange(10.0)
    view = buf[::2]
    assert not view.flags.c_contiguous
    assert comm.all_reduce(view, "sum", inplace=True) is view
    np.testing.assert_array_equal(buf[::2], factor * np.arange(0.0, 10, 2))
    np.testing.assert_array_equal(buf[1::2], np.arange(1.0, 10, 2))  # untouched
    assert comm.counters["all_reduce_sum"] == {"calls": 1, "sent": 40, "received": 40}
    flat = np.arange(4.0)
    assert comm.all_reduce(flat, inplace=True) is flat
    np.testing.assert_array_equal(flat, factor * np.arange(4.0))
    # Not in place: the input keeps its values whatever the result is.
    y = np.arange(3.0)
    np.testing.assert_array_equal(comm.all_reduce(y), factor * np.arange(3.0))
    np.testing.assert_array_equal(y, np.arange(3.0))


def test_detect_cuda_aware_mpi_env(monkeypatch):
    """REFIMPL_CUDA_AWARE_MPI=1/0 decides; any other value is an error."""
    monkeypatch.setenv("REFIMPL_CUDA_AWARE_MPI", "1")
    assert detect_cuda_aware_mpi() is True
    monkeypatch.setenv("REFIMPL_CUDA_AWARE_MPI", "0")
    assert detect_cuda_aware_mpi() is False
    for value in ("yes", "", "true", "2"):
        monkeypatch.setenv("REFIMPL_CUDA_AWARE_MPI", value)
        with pytest.raises(ValueError, match="REFIMPL_CUDA_AWARE_MPI must be 0 or 1"):
            detect_cuda_aware_mpi()


class AbortRecorder(SelfComm):
    """SelfComm that records its abort() calls."""

    def __init__(self):
        super().__init__()
        self.aborts = []

    def abort(self, code=1):
        self.aborts.append(code)


def test_abort_on_error_reports_and_propagates():
    """The rank's message and traceback go to the stream; the error propagates."""
    comm, stream = AbortRecorder(), io.StringIO()
    err = RuntimeError("rank work failed on purpose")
    with pytest.raises(RuntimeError) as info:
        with abort_on_error(comm, stream=stream):
            raise err
    assert info.value is err and comm.aborts == [1]
    text = stream.getvalue()
    assert text.startswith("refimpl: rank 0/1 failed:\nTraceback (most recent call last):")
    assert "RuntimeError: rank work failed on purpose" in text
    # Plain SelfComm: abort is a no-op and the exception still propagates.
    with pytest.raises(KeyError, match="x"):
        with abort_on_error(SelfComm(), stream=io.StringIO()):
            raise KeyError("x")


def test_abort_on_error_exits_and_passthrough():
    """No error: nothing printed, no abort. Any sys.exit (0 included) inside ends
    the job (the other ranks may wait in a collective). A passthrough type
    (an error every rank raises together) propagates without an abort."""
    comm = AbortRecorder()
    stream = io.StringIO()
    with abort_on_error(comm, stream=stream):
        pass
    assert stream.getvalue() == "" and comm.aborts == []
    for code in (0, None, 3):
        stream = io.StringIO()
        with pytest.raises(SystemExit) as info:
            with abort_on_error(comm, stream=stream):
                raise SystemExit(code)
        assert info.value.code == code
        assert f"rank 0/1 left early (sys.exit({code!r}))" in stream.getvalue()
    assert comm.aborts == [1, 1, 1]
    stream = io.StringIO()
    with pytest.raises(KeyError):
        with abort_on_error(comm, stream=stream, passthrough=(KeyError,)):
            raise KeyError("every rank")
    assert stream.getvalue() == "" and comm.aborts == [1, 1, 1]
