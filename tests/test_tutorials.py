"""The tutorials: each runs to the end as a script (each ends with asserts on what it
printed); those that use ranks also run under mpirun and print the numbers of the
single process; one runs as a notebook (jupytext + nbclient, skipped without them).

Tutorials run with cwd = tutorials/ (the PNGs some of them save land there; the
notebook runs in a temporary folder).
"""
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from refimpl.parallel.launch import mpirun_command, run_mpirun
from tolerances import LAYER64

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9]*.py"))
# One BLAS thread per process: P ranks on a 2-core machine would oversubscribe it.
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")

# The tutorials that run under mpirun: {name: (ranks, the quantities compared)}. Each
# prints, on every rank, a line "rank r of P: <name> <value>, ..." with these names;
# under mpirun every rank's values must equal the single process's.
MPI_TUTORIALS = {
    "05_sharded_softmax": (3, ["loss"]),
    "06_one_hybrid_step": (3, ["loss", "|grad|", "|dW|", "|W after|"]),
    "09_hardest_class_smoothing": (3, ["loss (one-hot)", "loss (smoothed)"]),
}
# The tutorial executed as a notebook: it has a picture, so the inline display is checked.
NOTEBOOK = "10_train_evaluate_resume"


def run(cmd, cwd, env=None, timeout=300):
    return run_mpirun(cmd, timeout=timeout, cwd=cwd, env=env)


def test_there_are_tutorials():
    assert TUTORIALS, "no tutorials/NN_*.py found"
    for name in [*MPI_TUTORIALS, NOTEBOOK]:
        assert (ROOT / "tutorials" / f"{name}.py").exists(), name


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_is_a_percent_notebook_with_a_title(path):
    """jupytext's percent format: the file opens with a markdown cell holding the title."""
    lines = path.read_text().splitlines()
    assert lines[0] == "# %% [markdown]", f"{path.name}: the first line must open a markdown cell"
    assert re.match(r"# # \d\d ", lines[1]), f"{path.name}: line 2 must be the title '# # NN ...'"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path):
    if "\nimport torch" in path.read_text() and importlib.util.find_spec("torch") is None:
        pytest.skip("this tutorial compares against PyTorch, which is not installed")
    res = run([sys.executable, str(path)], cwd=path.parent)
    assert res.returncode == 0, f"{path.name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert res.stdout.strip(), f"{path.name} printed nothing"


def rank_values(text, keys):
    """[{key: value}] from every report 'rank r of P: ...' that names all the keys.

    A report runs from 'rank r of P:' to the end of its line or the next
    report: mpirun, its ranks' output piped, sometimes joins one rank's line
    to another's.
    """
    rows = []
    for m in re.finditer(r"rank \d+ of \d+: (.*?)(?=rank \d+ of \d+: |$)", text, re.M):
        report = m.group(1)
        if all(k + " " in report for k in keys):
            rows.append({k: float(re.search(re.escape(k) + r" ([-+0-9.eE]+)", report).group(1)
                                  .rstrip(".,")) for k in keys})
    return rows


@pytest.mark.mpi
@pytest.mark.parametrize("name", sorted(MPI_TUTORIALS))
def test_tutorial_under_mpirun_prints_the_one_process_numbers(name):
    """E.g. tutorial 05 on 3 ranks (shards of 12, 12, 13 classes) = the script alone."""
    path = ROOT / "tutorials" / f"{name}.py"
    ranks, keys = MPI_TUTORIALS[name]
    alone = run([sys.executable, str(path)], cwd=path.parent, env=ENV)
    several = run(mpirun_command(ranks, path), cwd=path.parent, env=ENV)
    assert alone.returncode == 0, alone.stdout[-2000:] + alone.stderr[-3000:]
    assert several.returncode == 0, several.stdout[-2000:] + several.stderr[-3000:]
    one, many = rank_values(alone.stdout, keys), rank_values(several.stdout, keys)
    assert len(one) == 1, alone.stdout[-2000:]
    assert len(many) == ranks, several.stdout[-2000:]
    for row in many:
        for k in keys:
            # one step, P ranks vs 1, printed to 15 digits: ~1e-15 on every kernel
            assert abs(row[k] - one[0][k]) <= LAYER64 * abs(one[0][k]), \
                f"{name}: {k} {row[k]!r} on {ranks} ranks vs {one[0][k]!r} alone"


def test_tutorial_as_a_notebook(tmp_path):
    """jupytext turns a tutorial into a notebook; nbclient executes it cell by cell,
    with markdown cells between and the picture shown inline."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel", reason="nbclient needs ipykernel to start a kernel")
    notebook = tmp_path / f"{NOTEBOOK}.ipynb"
    jupytext.write(jupytext.read(ROOT / "tutorials" / f"{NOTEBOOK}.py"), notebook)
    nb = nbformat.read(notebook, as_version=4)
    kinds = [cell.cell_type for cell in nb.cells]
    assert kinds[0] == "markdown" and kinds.count("markdown") >= 3 and "code" in kinds
    assert any("$$" in cell.source for cell in nb.cells if cell.cell_type == "markdown")
    # Run in tmp_path, as Jupyter runs a notebook in its folder: the PNG lands there.
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()                     # raises CellExecutionError on any failing cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no inline picture"
    assert (tmp_path / f"{NOTEBOOK}.png").exists()
