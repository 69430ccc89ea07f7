"""P ranks = 1 process: extract_features under real mpirun, P = 1, 2, 3, 4.

Each P launches ``tests/features_worker.py`` once; every rank compares the
gathered feature arrays with the one-process result. N = 23 images (shares
of 5 and 6 over 4 ranks) and N = 3 (with 4 ranks, one share is empty).
"""
import pytest
from mpi_run import ROOT, rank_results
from tolerances import LAYER64

pytestmark = pytest.mark.mpi

WORKER = ROOT / "tests" / "features_worker.py"
F, DIM, BYTES = 16, 8, 8  # pooled width (ResNet-18 of width 2), head width, float64


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda p: f"P{p}")
def result(request, tmp_path_factory):
    P = request.param
    data = rank_results(P, WORKER, tmp_path_factory.mktemp(f"features{P}") / "result.json")
    assert [r["rank"] for r in data["ranks"]] == list(range(P))
    return data


@pytest.mark.parametrize("case,n", [("n23", 23), ("n3", 3)])
def test_every_rank_gets_the_one_process_features(result, case, n):
    for rank in result["ranks"]:
        c = rank[case]
        for kind, width in (("pooled", F), ("head", DIM)):
            assert c[kind]["shape"] == [n, width] and c[kind]["dtype"] == "float64"
            # eval mode: each image alone, in other batches on each rank
            assert c[kind]["err"] <= LAYER64, f"rank {rank['rank']} {case} {kind}: {c[kind]['err']}"
            # the comparison sees a row out of place: another image, O(1) apart
            assert c[kind]["rolled_err"] > 1e-3
        assert c["buffers_unchanged"]


@pytest.mark.parametrize("case,n,batch", [("n23", 23, 4), ("n3", 3, 2)])
def test_shares_and_bytes(result, case, n, batch):
    """Rank r encodes rows [r n // P, (r + 1) n // P); one all_gather_v per kind."""
    P = result["size"]
    for r, rank in enumerate(result["ranks"]):
        share = (r + 1) * n // P - r * n // P
        want = {"all_gather_v": {"calls": 2, "sent": share * (F + DIM) * BYTES,
                                 "received": n * (F + DIM) * BYTES}}
        if P > 1 and case == "n23":  # the communicator's first gathers of (., F) and (., DIM):
            # each checks the trailing shape and dtype once (9 int64, not payload)
            want["shape_check"] = {"calls": 2, "sent": 2 * 72, "received": 2 * 72 * P}
        assert rank[case]["counters"] == want, (r, rank[case]["counters"])
        # progress is reported per batch of this rank's share
        assert rank[case]["progress"] == [[min(d, share), share]
                                          for d in range(batch, share + batch, batch)]
    if case == "n3" and P == 4:
        assert result["ranks"][0]["n3"]["counters"]["all_gather_v"]["sent"] == 0
