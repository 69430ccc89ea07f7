"""The backend: device choice, dtype policy, host/device copies, scatter-add, RNG."""
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
