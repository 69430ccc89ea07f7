"""Every tutorial runs to the end (each ends with asserts on what it printed)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("[0-9]*.py"))


def test_there_are_tutorials():
    assert TUTORIALS, "no tutorials/NN_*.py found"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path):
    if "\nimport torch" in path.read_text() and importlib.util.find_spec("torch") is None:
        pytest.skip("this tutorial compares against PyTorch, which is not installed")
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                         timeout=300, cwd=path.parent)
    assert res.returncode == 0, f"{path.name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert res.stdout.strip(), f"{path.name} printed nothing"
