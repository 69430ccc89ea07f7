"""Shared pytest setup: markers skip cleanly when their dependency is absent;
the ``threads`` fixture."""
import importlib.util

import pytest


def _has(module):
    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(config, items):
    from refimpl.backend import gpu_available
    from refimpl.parallel.launch import find_mpirun
    have_torch = _has("torch")
    have_mpi = _has("mpi4py") and find_mpirun() is not None
    have_gpu = None  # probed lazily: importing cupy is slow
    for item in items:
        if "torch" in item.keywords and not have_torch:
            item.add_marker(pytest.mark.skip(reason="torch not installed"))
        if "mpi" in item.keywords and not have_mpi:
            item.add_marker(pytest.mark.skip(reason="mpi4py/mpirun not found"))
        if "gpu" in item.keywords:
            if have_gpu is None:
                have_gpu = gpu_available()
            if not have_gpu:
                item.add_marker(pytest.mark.skip(reason="no CuPy/CUDA device"))


@pytest.fixture
def threads():
    """threads.set_num_threads, put back after the test whatever happens (to
    REFIMPL_NUM_THREADS, as at import: tests/kernel_matrix.py runs the suite at 1, 2, 4)."""
    from refimpl import threads as refimpl_threads
    yield refimpl_threads.set_num_threads
    refimpl_threads.set_num_threads(refimpl_threads._threads_from_env())
