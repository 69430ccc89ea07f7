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
