"""Shared pytest setup: markers skip cleanly when their dependency is absent."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # `import helpers` from any test file


def _has(module):
    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(config, items):
    from refimpl.backend import gpu_available
    have_torch = _has("torch")
    from helpers import find_mpirun
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
