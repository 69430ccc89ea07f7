"""refimpl's threads: set_num_threads validation, the BLAS limit and its restore,
parallel_map's order, concurrency, nesting and errors, parallel_sum's order and
memory, REFIMPL_NUM_THREADS."""
import os

import numpy as np
import pytest

from refimpl import threads as threads_mod


def _numpy_blas_threads():
    """{library path: threads} for NumPy's own BLAS, as threadpoolctl sees it."""
    from threadpoolctl import ThreadpoolController
    return {lib.filepath: lib.num_threads
            for lib in threads_mod._numpy_blas(ThreadpoolController()).lib_controllers}


def test_set_num_threads_validates(threads):
    before = threads_mod.get_num_threads()      # REFIMPL_NUM_THREADS (tests/kernel_matrix.py)
    for bad in (0, -1, 1.5, "2", None, True):
        with pytest.raises(ValueError, match="number of threads must be a positive integer"):
            threads(bad)
        assert threads_mod.get_num_threads() == before
    threads(np.int64(2))
    assert threads_mod.get_num_threads() == 2 and type(threads_mod.get_num_threads()) is int


def test_set_num_threads_limits_numpy_blas_and_restores_it(threads):
    threads(1)  # whatever REFIMPL_NUM_THREADS said at import: BLAS unlimited again
    before = _numpy_blas_threads()
    assert before, "threadpoolctl found no BLAS in NumPy"
    threads(2)
    assert set(_numpy_blas_threads().values()) == {1}
    threads(3)  # changing n > 1 keeps the limit and the original to restore
    assert set(_numpy_blas_threads().values()) == {1}
    threads(1)
    assert _numpy_blas_threads() == before


@pytest.mark.torch
def test_set_num_threads_leaves_torch_alone(threads):
    torch = pytest.importorskip("torch")
    from threadpoolctl import threadpool_info
    torch_before = torch.get_num_threads()
    others_before = [lib for lib in threadpool_info() if lib["user_api"] != "blas"]  # torch's OpenMP
    threads(2)
    assert torch.get_num_threads() == torch_before
    assert [lib for lib in threadpool_info() if lib["user_api"] != "blas"] == others_before
    threads(1)
    assert torch.get_num_threads() == torch_before


def test_parallel_map_runs_items_concurrently_and_in_order(threads):
    import threading
    threads(2)
    # both items must be inside fn at once to pass the barrier: a serial
    # run would break it after the timeout
    barrier = threading.Barrier(2, timeout=10)

    def fn(i):
        barrier.wait()
        return i * i
    assert threads_mod.parallel_map(fn, [3, 4]) == [9, 16]
    # more items than threads, order kept; nested calls run serially (no deadlock)
    inner = lambda i: threads_mod.parallel_map(lambda j: 10 * i + j, range(3))  # noqa: E731
    assert threads_mod.parallel_map(inner, range(5)) == [[10 * i + j for j in range(3)] for i in range(5)]


def test_parallel_map_is_serial_with_one_thread_and_raises(threads):
    import threading
    threads(1)
    main = threading.get_ident()
    assert threads_mod.parallel_map(lambda i: threading.get_ident(), range(3)) == [main] * 3
    threads(2)

    def fn(i):
        if i == 1:
            raise KeyError("item 1")
        return i
    with pytest.raises(KeyError, match="item 1"):
        threads_mod.parallel_map(fn, range(4))
    assert threads_mod.num_workers(np.zeros(1)) == 2
    # serial=True (work on a GPU): every item in the calling thread, at any thread count
    assert threads_mod.parallel_map(lambda i: threading.get_ident(), range(3),
                                    serial=True) == [main] * 3
    assert threads_mod.parallel_sum(lambda i: np.array([threading.get_ident()]), range(3),
                                    serial=True)[0] == 3 * main


def test_parallel_sum_adds_in_order_and_waits_on_errors(threads):
    """parallel_sum gives the serial left-to-right sum's bits on 2 threads
    (float32 sums that depend on the order) and raises a worker's error only
    after every item has finished. (What it saves in memory is measured by
    bench_classifier's peak memory, not here.)"""
    import time
    parts = [np.float32(v) * np.ones(3, np.float32) for v in (1e8, 1.0, -1e8, 3.0, 0.5)]
    threads(2)
    total = threads_mod.parallel_sum(lambda i: parts[i % 5].copy(), range(50))
    expect = parts[0].copy()
    for i in range(1, 50):
        expect += parts[i % 5]
    assert np.array_equal(total, expect) and total.dtype == np.float32
    # another order rounds otherwise: 1e8 + 1 is 1e8 in float32
    assert not np.array_equal(total, sum(parts[i % 5] for i in reversed(range(50))))
    finished = []

    def slow_or_bad(i):
        if i == 1:
            raise KeyError("item 1")
        time.sleep(0.05)
        finished.append(i)
        return np.zeros(1)
    with pytest.raises(KeyError, match="item 1"):
        threads_mod.parallel_sum(slow_or_bad, range(6))
    assert sorted(finished) == [0, 2, 3, 4, 5]


def test_num_threads_default_from_env():
    import subprocess
    import sys
    code = ("from refimpl import threads; import threadpoolctl as t; "
            "print(threads.get_num_threads(), "
            "sorted({l['num_threads'] for l in t.threadpool_info() if l['user_api'] == 'blas'}))")
    env = {k: v for k, v in os.environ.items() if k != "REFIMPL_NUM_THREADS"}
    env.update(OPENBLAS_NUM_THREADS="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = lambda: subprocess.run([sys.executable, "-c", code], env=env, cwd=root,  # noqa: E731
                                 capture_output=True, text=True)
    plain = run()
    assert plain.stdout.split() == ["1", "[2]"], plain.stderr  # import changes nothing
    env["REFIMPL_NUM_THREADS"] = "2"
    two = run()
    assert two.stdout.split() == ["2", "[1]"], two.stderr
