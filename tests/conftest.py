"""Shared pytest setup: markers skip cleanly when their dependency is absent
(``gpu`` tests of RUNS_DRY modules run on the CPU under REFIMPL_GPU_CHECK_DRY=1,
tests/gpu_util.py); the ``threads`` and ``fail_test_split`` fixtures."""
import importlib.util
import os

import pytest


def _has(module):
    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(config, items):
    from refimpl.backend import gpu_available
    from refimpl.parallel.launch import find_mpirun
    have_torch = _has("torch")
    have_mpi = _has("mpi4py") and find_mpirun() is not None
    have_gpu = None  # probed lazily: importing cupy is slow
    # benchmarks/gpu_check.sh --dry: the gpu tests of modules that name
    # gpu_util.DEVICE (RUNS_DRY) run on the CPU, to test the check's plumbing
    dry = os.environ.get("REFIMPL_GPU_CHECK_DRY") == "1"
    for item in items:
        if "torch" in item.keywords and not have_torch:
            item.add_marker(pytest.mark.skip(reason="torch not installed"))
        if "mpi" in item.keywords and not have_mpi:
            item.add_marker(pytest.mark.skip(reason="mpi4py/mpirun not found"))
        if "gpu" in item.keywords:
            if dry and getattr(item.module, "RUNS_DRY", False):
                continue
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


@pytest.fixture
def fail_test_split(monkeypatch):
    """A call that makes every later write of a packed split named "test" fail at
    its end, as a full disk would (undone after the test): the data tools must
    then leave no lone train split."""
    def fail():
        from refimpl.data.packed import PackedWriter
        real = PackedWriter._finish

        def finish(self):
            if self.out_dir.name == "test":
                raise OSError(f"{self.out_dir}: No space left on device (simulated)")
            return real(self)
        monkeypatch.setattr(PackedWriter, "_finish", finish)
    return fail
