"""refimpl's intra-op threads on the CPU, and the BLAS thread limit that goes with them.

``set_num_threads(n)`` / ``get_num_threads()`` are
refimpl's own intra-op thread count (default: REFIMPL_NUM_THREADS, else 1),
and ``parallel_map(fn, items)`` runs per-chunk work on a persistent pool of
that many threads (serially when it is 1); ``parallel_sum(fn, items)`` adds
the results in item order as they come. NumPy releases the GIL inside its
copies and GEMMs, so Python threads do run in parallel here. Why refimpl
splits the work itself instead of leaving it to a multi-threaded BLAS: on
the small GEMMs of a ResNet's convolutions a multi-threaded OpenBLAS is
often *slower* than a single-threaded one, because each GEMM is too small
to scale and the spinning BLAS worker fights the main thread's im2col
copies; one BLAS thread per worker, each worker running im2col + GEMM on
its own images, is faster at each layer shape benchmarked
(docs/benchmarks.md). So while n > 1, NumPy's BLAS is limited to one
thread (threadpoolctl, NumPy's own BLAS library only: PyTorch's threads
are left alone), and ``set_num_threads(1)`` restores what it was. With the
default of 1, importing refimpl changes no threading at all.
"""
import collections
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from refimpl.backend import get_array_module
from refimpl.checks import check_int
# Below this many elements an elementwise pass (BatchNorm, ReLU, the residual
# add) runs in the calling thread: handing work to the pool has a fixed cost,
# about that of one thread's pass over an array that still fits in the cache
# (2**19 float32 elements, 2 MiB); from 2**20 elements on the pass leaves the
# cache and splitting it pays (docs/benchmarks.md).
THREAD_MIN_ELEMENTS = 1 << 20

_num_threads = 1        # refimpl's intra-op threads (set_num_threads)
_blas_limiter = None    # threadpoolctl limiter while NumPy's BLAS is held at 1 thread
_pool = None            # persistent ThreadPoolExecutor with _num_threads workers
_in_worker = threading.local()  # set inside parallel_map: nested calls run serially


def _numpy_blas(controller):
    """The BLAS libraries NumPy itself calls, among those threadpoolctl found.

    Selected by file path (NumPy's wheels ship OpenBLAS in ``numpy.libs`` or
    ``numpy/.dylibs``) so that a BLAS loaded by PyTorch or SciPy keeps its
    threads. A NumPy built against a system BLAS has none there: then every
    BLAS in the process is limited (PyTorch's x86 wheels link MKL statically,
    which threadpoolctl does not see, and its OpenMP pool is not a BLAS).
    """
    numpy_dir = os.path.dirname(os.path.realpath(np.__file__))
    blas = controller.select(user_api="blas")
    ours = [lib.filepath for lib in blas.lib_controllers
            if os.path.realpath(lib.filepath).startswith((numpy_dir + os.sep, numpy_dir + ".libs"))]
    return controller.select(filepath=ours) if ours else blas


def set_num_threads(n, single_blas=False):
    """Use ``n`` threads (an int >= 1) for refimpl's CPU kernels.

    n > 1: a pool of worker threads runs per-chunk work (``parallel_map``) and
    NumPy's BLAS is limited to one thread, so that workers do not each start
    BLAS threads of their own (module docstring: why). n == 1: everything runs
    in the calling thread and the BLAS thread count is restored to what it was
    before the first ``set_num_threads(n > 1)``, unless ``single_blas``: then
    BLAS is held at one thread too (one core per rank, several ranks on a
    machine: a BLAS thread per core in every rank would oversubscribe it).
    """
    global _num_threads, _blas_limiter, _pool
    n = check_int("number of threads", n)
    if (n > 1 or single_blas) and _blas_limiter is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError as e:  # pragma: no cover - it is in install_requires
            raise RuntimeError("refimpl threads > 1 need threadpoolctl: "
                               "pip install threadpoolctl") from e
        _blas_limiter = _numpy_blas(ThreadpoolController()).limit(limits=1)
    elif n == 1 and not single_blas and _blas_limiter is not None:
        _blas_limiter.restore_original_limits()
        _blas_limiter = None
    if _pool is not None and n != _num_threads:
        _pool.shutdown(wait=True)
        _pool = None
    _num_threads = n


def get_num_threads():
    """refimpl's intra-op thread count (``set_num_threads``)."""
    return _num_threads


def num_workers(x):
    """How many threads to split work on ``x`` over: 1 for a CuPy array.

    A GPU kernel is already parallel; host threads would only contend for
    its stream.
    """
    return _num_threads if get_array_module(x) is np else 1


def elementwise_slices(x):
    """Contiguous slices of ``x.size`` elements, one per thread for a large
    NumPy array (``THREAD_MIN_ELEMENTS``), else one: how an elementwise pass
    over ``x.reshape(-1)`` is split. Elementwise results do not depend on
    the split, so every thread count gives the same bits."""
    return even_slices(x.size, num_workers(x) if x.size >= THREAD_MIN_ELEMENTS else 1)


def even_slices(size, parts):
    """range(size) cut into ``parts`` contiguous slices whose lengths differ by at most 1."""
    bounds = np.linspace(0, size, parts + 1).astype(np.int64)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def parallel_map(fn, items, serial=False):
    """``[fn(item) for item in items]``, on ``get_num_threads()`` threads
    (the calling thread runs the first item, the pool the others).

    Results come back in the order of ``items`` whichever thread ran them,
    so a caller that sums them in that order gets the same bits every run.
    Serial when threads == 1, for a single item, inside a worker (a nested
    call must not wait on the pool it is running in), and when ``serial``:
    work on a GPU (CuPy's current device is per thread, so a pool thread
    would launch on device 0 whatever device the rank uses).
    """
    return list(_in_order(fn, items, serial))


def parallel_sum(fn, items, serial=False):
    """``fn(item_0) + fn(item_1) + ...`` (at least one item), added in place
    into the first result in the order of ``items``: the bits of the serial
    sum on any number of threads. Each result is added and dropped as soon as
    those before it are in, so only a few are held at once (``parallel_map``
    would hold them all: some 300 (B, D) parts for a million-class shard).
    serial: as ``parallel_map``'s.
    """
    results = _in_order(fn, items, serial)
    total = next(results)
    for part in results:
        total += part
    return total


def _in_order(fn, items, serial=False):
    """Yield fn(item) for each item, in order, computed as ``parallel_map`` says."""
    global _pool
    items = list(items)
    if serial or _num_threads == 1 or len(items) <= 1 or getattr(_in_worker, "active", False):
        for item in items:
            yield fn(item)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_num_threads, thread_name_prefix="refimpl",
                                   initializer=_mark_worker)
    futures = collections.deque(_pool.submit(fn, item) for item in items[1:])
    try:
        # the calling thread runs the first item itself: one hand-off fewer,
        # and it would otherwise sit idle waiting
        _in_worker.active = True
        try:
            first = fn(items[0])
        finally:
            _in_worker.active = False
        yield first
        while futures:
            yield futures.popleft().result()                         # dropped once yielded
    finally:
        # wait for all before returning or raising: no worker may still be
        # writing into arrays that the caller is about to reuse or drop
        for f in futures:
            f.exception()


def _mark_worker():
    _in_worker.active = True


def _forget_pool_in_child():
    # a fork()ed child inherits the pool object but not its threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)

def _threads_from_env():
    value = os.environ.get("REFIMPL_NUM_THREADS", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"REFIMPL_NUM_THREADS must be an integer >= 1, got {value!r}") from None


set_num_threads(_threads_from_env())
