"""Ranks that disagree are refused by name, never a silently wrong number (2 ranks, mpirun).

One launch of ``tests/agreement_worker.py`` runs every case: collectives
handed another length or dtype on one rank, a classifier built with another
N, another config, another dataset. Without the checks, MPI either fails
with a bare MPI_ERR_TRUNCATE on one rank and hands wrong values to the
other, or (the classifier) both ranks print the same wrong loss.
"""
import pytest

from mpi_run import ROOT, rank_results

pytestmark = pytest.mark.mpi

WORKER = ROOT / "tests" / "agreement_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return rank_results(2, WORKER, tmp_path_factory.mktemp("agree") / "result.json")["ranks"]


@pytest.mark.parametrize("case,message", [
    ("all_reduce_length", "all_reduce: rank(s) [1] bring another shape or dtype than rank 0 "
                          "(rank 0: (12,) float64; rank 1: (13,) float64): every rank must "
                          "pass the same shape and dtype"),
    ("all_reduce_dtype", "all_reduce: rank(s) [1] bring another shape or dtype than rank 0 "
                         "(rank 0: (12,) float64; rank 1: (12,) float32)"),
    ("reduce_scatter_length", "reduce_scatter: rank(s) [1] bring another shape or dtype than "
                              "rank 0 (rank 0: (4, 3) float64; rank 1: (6, 3) float64)"),
    ("bcast_length", "bcast: rank(s) [1] bring another shape or dtype than rank 0 (rank 0: "
                     "(12,) float64; rank 1: (13,) float64)"),
    ("all_gather_v_width", "all_gather_v: rank(s) [1] bring another shape or dtype than rank 0 "
                           "(rank 0: (0, 3) float64; rank 1: (0, 4) float64)"),
    ("classifier_N", "CosineClassifier: the ranks disagree (rank 0: N = 37, D = 8, tau = 0.15; "
                     "rank 1: N = 38, D = 8, tau = 0.15): every rank must build the classifier "
                     "with the same N"),
    ("config", "ranks [1] run another configuration than rank 0 (alpha: rank 0 0.1, rank 1 "
               "0.2): start every rank with the same config and overrides"),
    ("dataset", "train 'data/x' differs between ranks: the ranks disagree (rank 0: 64 "
                "instances, manifest sha256 "),
])
def test_every_rank_refuses_naming_the_ranks(ranks, case, message):
    """The same one-line message on every rank, and the job stays usable (the worker
    runs a matching all-reduce after each case and checks its sum)."""
    assert ranks[0][case] == ranks[1][case], (ranks[0][case], ranks[1][case])
    assert ranks[0][case] is not None and message in ranks[0][case], ranks[0][case]
    assert "\n" not in ranks[0][case]
    if case == "dataset":
        assert "rank 1: 62 instances, manifest sha256 " in ranks[0][case]


def test_agreeing_ranks_are_checked_once_per_shape(ranks):
    """Three all-reduces and three broadcasts of one shape: two checks, then none."""
    for rank in ranks:
        assert rank["checks_of_agreeing_calls"] == 2
        assert rank["agreeing_sum"] == [2.0] * 5
    assert [r["agreeing_classifier_rows"] for r in ranks] == [[0, 18], [18, 37]]


def _node_copies(tmp_path, name, sizes):
    """One working folder per rank, each holding its own packed dataset at data/<name>
    (what two nodes with different copies under one path see)."""
    from refimpl.data.packed import write_packed
    from refimpl.data.synthetic import open_synthetic
    folders = []
    for rank, n in enumerate(sizes):
        folder = tmp_path / f"node{rank}"
        ds = open_synthetic(f"synthetic:n={n},size=8,classes=4,seed=0")
        write_packed(folder / "data" / name, ds.read(list(range(n))), ds.labels)
        folders.append(folder)
    return folders


@pytest.mark.parametrize("split", ["train", "test"])
def test_trainer_refuses_datasets_that_differ_between_ranks(tmp_path, split):
    """The same config on both ranks, but the dataset under its path differs (64 and 62
    instances): refused before the first step, naming both; formerly two steps ran,
    then "labels must lie in [0, 62)" (train) or MPI_ERR_TRUNCATE (test)."""
    import subprocess
    import sys
    from mpi_run import ENV
    from refimpl.parallel.launch import mpirun_command
    from test_train import TINY
    sizes = {"train": (64, 62), "test": (24, 22)}[split]
    nodes = _node_copies(tmp_path, split, sizes)
    other = "test" if split == "train" else "train"
    args = [a for a in TINY if not a.startswith(("train=", "test="))]
    base = [sys.executable, "-m", "refimpl.train", *args, f"{split}=data/{split}",
            f"{other}=synthetic:n=48,size=8,classes=4,seed=0", f"out={tmp_path / 'run'}"]
    cmd = mpirun_command(1, *base, ":", "-np", 1, "--wdir", nodes[1], *base, python=False,
                         mpi_args=("--wdir", nodes[0]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count(f"refimpl-train: error: {split} 'data/{split}' differs between "
                             f"ranks: the ranks disagree (rank 0: {sizes[0]} instances") == 1
    assert f"rank 1: {sizes[1]} instances" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
