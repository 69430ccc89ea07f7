"""The contrastive prior on P = 1, 2, 3, 4 ranks equals one process.

Each P launches ``tests/prior_worker.py`` once under ``mpirun``; every rank
runs the prior (sync BN and local BN), compares the gathered W and the BN
statistics against the dense single-process reference, and runs the
doubled / missing row cases; rank 0 writes every rank's results to JSON.
N = 37 rows (uneven shards), B = 12 (divisible by every P here).
"""
import numpy as np
import pytest
from mpi_run import ROOT, rank_results
from refimpl.parallel.sharding import shard_range
from tolerances import INDEPENDENT64

pytestmark = pytest.mark.mpi

WORKER = ROOT / "tests" / "prior_worker.py"
N, D, B, SEED = 37, 8, 12, 3   # as in prior_worker.py
T = -(-N // B)                  # 4 batches, the last one padded


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda p: f"P{p}")
def result(request, tmp_path_factory):
    P = request.param
    return rank_results(P, WORKER, tmp_path_factory.mktemp(f"prior{P}") / "result.json")


@pytest.mark.parametrize("bn", ["sync", "local"])
def test_prior_P_ranks_equals_dense_reference(result, bn):
    """The whole W and the BN running statistics, float64, every rank."""
    for r, rank in enumerate(result["ranks"]):
        c = rank[bn]
        # P ranks against 1 process: INDEPENDENT64 (measured <= 1.3e-14)
        assert c["W"] <= INDEPENDENT64, f"rank {r} bn={bn}: W off by {c['W']:.3e}"
        assert c["buffers"] <= INDEPENDENT64, \
            f"rank {r} bn={bn}: BN statistics off by {c['buffers']:.3e}"
        assert c["counts_equal"] and c["num_batches_tracked"] == T
        assert c["params_unchanged"] and c["grad_zero"]
        assert c["replicas"] is None, c["replicas"]   # equal on every rank


def test_whitened_mixed_pooled_prior_P_ranks_equals_dense_reference(result):
    """The finishing step's statistics come from every shard (one all-reduce)."""
    for r, rank in enumerate(result["ranks"]):
        c = rank["variant"]
        # P ranks against 1 process, then an eigendecomposition of both: INDEPENDENT64
        assert c["W"] <= INDEPENDENT64, f"rank {r}: W off by {c['W']:.3e}"
        assert abs(c["mean_cosine"] - c["mean_cosine_ref"]) <= INDEPENDENT64
        assert c["buffers_initial"]


def test_negative_control_local_bn_is_not_plain_bn(result):
    """The comparison can fail: per-rank BN statistics give other rows than plain BN."""
    if result["size"] == 1:
        pytest.skip("with one rank local BN is plain BN")
    for rank in result["ranks"]:
        assert rank["local"]["W_vs_plain_bn"] > 1e-3  # other statistics: O(1), not rounding


@pytest.mark.parametrize("bn", ["sync", "local"])
def test_routing_bytes(result, bn):
    """One all_to_all_v per batch; rank r sends the written entries of its slice and
    receives exactly its own rows; W is never gathered during the pass."""
    P = result["size"]
    b, f = B // P, 8                                            # float64
    write = (np.arange(T * B) < N).reshape(T, B)                # the default batches' flags
    for r, rank in enumerate(result["ranks"]):
        lo, hi = shard_range(N, P, r)
        sent = int(write[:, r * b:(r + 1) * b].sum()) * D * f
        c = rank[bn]["counters"]
        assert c["all_to_all_v"] == {"calls": T, "sent": sent, "received": (hi - lo) * D * f}
        assert rank[bn]["report"]["bytes_sent"] == sent
        assert rank[bn]["report"]["bytes_received"] == (hi - lo) * D * f
        # The batches' checksum (one int64 per rank), nothing else gathered.
        assert c["all_gather"] == {"calls": 1, "sent": 8, "received": 8 * P}
        assert "all_gather_v" not in c
    # The sum over the ranks of what was sent is the whole W once.
    total = sum(rank[bn]["counters"]["all_to_all_v"]["sent"] for rank in result["ranks"])
    assert total == N * D * 8


@pytest.mark.parametrize("kind", ["doubled", "missing", "both"])
def test_bad_coverage_raises_the_same_error_on_every_rank(result, kind):
    from refimpl.method.prior import prior_batches
    batches = prior_batches(N, B, 1, SEED)
    doubled, missing = int(batches[-1][0][-1]), int(batches[1][0][5])
    messages = [rank[kind] for rank in result["ranks"]]
    assert messages[0] is not None and len(set(messages)) == 1, messages
    msg = messages[0]
    if kind in ("doubled", "both"):
        assert f"1 row(s) written more than once (ids {doubled} x2)" in msg
    if kind in ("missing", "both"):
        assert f"1 row(s) never written (ids {missing})" in msg
    if kind == "doubled":
        assert "never written" not in msg
    if kind == "missing":
        assert "more than once" not in msg
