"""The backend: device choice, dtype policy, host/device copies, scatter-add, RNG, threads."""
import os

import numpy as np
import pytest

from refimpl import backend


def test_default_device_from_env(monkeypatch):
    monkeypatch.setenv("REFIMPL_DEVICE", "cpu")
    assert backend.default_device() == "cpu"
    assert backend.xp_for() is np
    monkeypatch.setenv("REFIMPL_DEVICE", "tpu")
    with pytest.raises(ValueError, match="device must be one of"):
        backend.default_device()


def test_resolve_dtype():
    assert backend.resolve_dtype() is np.float32
    assert backend.resolve_dtype("float64") is np.float64
    with pytest.raises(ValueError, match="float32 or float64"):
        backend.resolve_dtype(np.float16)


def test_scatter_add_accumulates_repeats():
    a = np.zeros(4)
    backend.scatter_add(a, np.array([1, 1, 3]), np.array([1.0, 2.0, 5.0]))
    np.testing.assert_array_equal(a, [0.0, 3.0, 0.0, 5.0])


def test_ascontiguous_copies_only_when_needed():
    x = np.arange(12.0).reshape(3, 4)
    assert backend.ascontiguous(x) is x
    y = backend.ascontiguous(x.T)
    assert y.flags.c_contiguous and np.array_equal(y, x.T)


def test_rng_is_keyed_and_reproducible():
    a = backend.rng(0, "augment", 3, 17).random(5)
    np.testing.assert_array_equal(a, backend.rng(0, "augment", 3, 17).random(5))
    assert not np.array_equal(a, backend.rng(0, "augment", 3, 18).random(5))
    assert not np.array_equal(a, backend.rng(0, "augment", 4, 17).random(5))
    assert not np.array_equal(a, backend.rng(0, "sampler", 3, 17).random(5))
    assert not np.array_equal(a, backend.rng(1, "augment", 3, 17).random(5))


def test_rng_trailing_zero_key_is_a_different_stream():
    # NumPy's SeedSequence pads with zeros: [s, e] and [s, e, 0] collide
    # unless the key count is part of the entropy.
    a = backend.rng(0, "x", 3).random(4)
    assert not np.array_equal(a, backend.rng(0, "x", 3, 0).random(4))
    assert not np.array_equal(backend.rng(0, "x").random(4), backend.rng(0, "x", 0).random(4))


def test_rng_rejects_bad_keys():
    with pytest.raises(ValueError, match="stream"):
        backend.rng(0, 3)
    with pytest.raises(ValueError, match="non-negative"):
        backend.rng(0, "x", -1)


def test_asarray_and_to_numpy_roundtrip_on_cpu():
    x = np.arange(6, dtype=np.float64)
    y = backend.asarray(x, device="cpu", dtype=np.float32)
    assert y.dtype == np.float32 and backend.device_of(y) == "cpu"
    np.testing.assert_array_equal(backend.to_numpy(y), x.astype(np.float32))
    assert backend.scalar(np.float64(2.5)) == 2.5


@pytest.mark.gpu
def test_gpu_roundtrip():
    x = np.random.default_rng(0).standard_normal((3, 4))
    y = backend.asarray(x, device="gpu")
    assert backend.device_of(y) == "gpu"
    np.testing.assert_array_equal(backend.to_numpy(y), x)


# ------------------------------------------------------------------ threads

@pytest.fixture
def threads():
    """backend.set_num_threads, put back to 1 after the test whatever happens."""
    yield backend.set_num_threads
    backend.set_num_threads(1)


def _numpy_blas_threads():
    """{library path: threads} for NumPy's own BLAS, as threadpoolctl sees it."""
    from threadpoolctl import ThreadpoolController
    return {lib.filepath: lib.num_threads
            for lib in backend._numpy_blas(ThreadpoolController()).lib_controllers}


def test_set_num_threads_validates(threads):
    for bad in (0, -1, 1.5, "2", None, True):
        with pytest.raises(ValueError, match="int >= 1"):
            threads(bad)
        assert backend.get_num_threads() == 1
    threads(np.int64(2))
    assert backend.get_num_threads() == 2 and type(backend.get_num_threads()) is int


def test_set_num_threads_limits_numpy_blas_and_restores_it(threads):
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
    assert backend.parallel_map(fn, [3, 4]) == [9, 16]
    # more items than threads, order kept; nested calls run serially (no deadlock)
    inner = lambda i: backend.parallel_map(lambda j: 10 * i + j, range(3))  # noqa: E731
    assert backend.parallel_map(inner, range(5)) == [[10 * i + j for j in range(3)] for i in range(5)]


def test_parallel_map_is_serial_with_one_thread_and_raises(threads):
    import threading
    main = threading.get_ident()
    assert backend.parallel_map(lambda i: threading.get_ident(), range(3)) == [main] * 3
    threads(2)

    def fn(i):
        if i == 1:
            raise KeyError("item 1")
        return i
    with pytest.raises(KeyError, match="item 1"):
        backend.parallel_map(fn, range(4))
    assert backend.num_workers(np.zeros(1)) == 2


def test_num_threads_default_from_env():
    import subprocess
    import sys
    code = ("from refimpl import backend; import threadpoolctl as t; "
            "print(backend.get_num_threads(), "
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


def test_arrays_of_a_cupy_imported_elsewhere_are_recognized(monkeypatch):
    """A caller that imported cupy itself (refimpl did not) still gets cupy
    from get_array_module for its arrays: here with a stand-in module."""
    import sys
    import types

    class DeviceArray:
        pass

    fake = types.ModuleType("cupy")
    fake.get_array_module = lambda *arrays: fake if any(
        isinstance(a, DeviceArray) for a in arrays) else np
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend, "_cupy", None)
    assert backend.get_array_module(DeviceArray()) is fake
    assert backend.device_of(DeviceArray()) == "gpu"
    assert backend.get_array_module(np.zeros(2)) is np
