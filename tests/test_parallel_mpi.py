"""P ranks = 1 rank: the hybrid parallel step under real mpirun, P = 1, 2, 3, 4.

Each P launches ``tests/mpi_worker.py`` once under ``mpirun``; every rank
compares its shard against a dense single-process reference computed on the
same global data and rank 0 writes the errors of all ranks to a JSON file.
N = 37 classes over P ranks (uneven shards: 4 ranks own 9, 9, 9, 10 rows),
global batch B = 12.
"""
import pytest
from mpi_run import ROOT, rank_results, run_ranks
from tolerances import LAYER64, SHORT64, STEPS64, float32_bound

pytestmark = pytest.mark.mpi

WORKER = ROOT / "tests" / "mpi_worker.py"
N, D, B = 37, 8, 12


def mpirun(P, *args, timeout=300):
    """Run the worker on P ranks; returns (CompletedProcess, seconds)."""
    return run_ranks(P, WORKER, *args, timeout=timeout)


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda p: f"P{p}")
def result(request, tmp_path_factory):
    P = request.param
    return rank_results(P, WORKER, tmp_path_factory.mktemp(f"mpi{P}") / "result.json", "check")


@pytest.mark.parametrize("case", ["float64_alpha0.0", "float64_alpha0.2",
                                  "float32_alpha0.0", "float32_alpha0.2"])
def test_sharded_classifier_equals_dense(result, case):
    # sums over the N = 37 classes in shards and blocks; float32 against the float64 dense
    tol = LAYER64 if case.startswith("float64") else float32_bound(N)
    for r, rank in enumerate(result["ranks"]):
        c = rank["classifier"][case]
        for name in ("loss", "dz", "dW"):
            assert c[name] <= tol, f"rank {r} {case} {name}: {c[name]:.3e} > {tol}"
        assert c["dtypes_kept"]
        # exact ranks: a label's closest rival logit is 0.03 away, float32 rounds by ~3e-6
        assert c["acc"] == c["ref_acc"], f"rank {r} {case}: top-k {c['acc']} vs {c['ref_acc']}"
    # The problem is built so that top-1 is neither 0 nor 1 (the check can fail).
    assert 0 < result["ranks"][0]["classifier"][case]["ref_acc"]["1"] < 1


def test_bytes_per_rank_match_design_formula(result):
    """docs/design.md's table, fp64 here: gather B*D*8 + B*8, max B*8, sum 2*B*8, scatter B*D*8."""
    P = result["size"]
    b, f = B // P, 8  # bytes per float64
    want = {"all_gather": {"calls": 2, "sent": b * D * f + b * 8, "received": B * D * f + B * 8},
            "all_reduce_max": {"calls": 1, "sent": B * f, "received": B * f},
            # top-k's guesses of the label logits, the loss message [sum exp,
            # target logit] and top-k's count message
            "all_reduce_sum": {"calls": 3, "sent": B * f + 2 * B * f + B * f,
                               "received": 4 * B * f},
            "reduce_scatter": {"calls": 1, "sent": B * D * f, "received": b * D * f}}
    if P > 1:  # shape checks (9 int64 each): before every gather of z (none for the labels)
        # and, this being the communicator's first step, once per new shape: the
        # all-reduces of B and of 2B values, the reduce-scatter
        want["shape_check"] = {"calls": 4, "sent": 4 * 72, "received": 4 * 72 * P}
    for rank in result["ranks"]:
        assert rank["classifier"]["float64_alpha0.0"]["counters"] == want


def test_label_out_of_range_raises_on_every_rank(result):
    for rank in result["ranks"]:
        msg = rank["classifier"]["bad_label_error"]
        assert msg is not None and f"[0, {N})" in msg and "37]" in msg


def test_all_gather_reduce_scatter_are_adjoint(result):
    for rank in result["ranks"]:
        a = rank["adjoint"]
        assert a["identity"] <= LAYER64  # two sums of 15 P products
        assert a["all_gather_values"] == 0.0  # copies
        # P <= 4 terms added in MPI's order: sum_bound(4, cond=10) = 8.9e-15
        assert a["reduce_scatter_values"] <= SHORT64


def test_uneven_collectives(result):
    """all_gather_v, all_to_all_v and ring_shift deliver exactly the right rows."""
    for r, rank in enumerate(result["ranks"]):
        u = rank["uneven"]
        assert u["gather_v_given"] == 0.0 and u["gather_v_asked"] == 0.0, (r, u)
        assert u["gather_v_int"] and u["all_to_all_v"] and u["ring_shift"], (r, u)
        P = result["size"]
        if P == 1:
            assert u["mismatch"] is None
        else:
            B = 4 * P + 1
            assert u["mismatch"] == ("all_gather: the ranks bring different numbers of rows ("
                                     + ", ".join(f"rank {q}: {4 + (q == 1)}" for q in range(P))
                                     + f"): B = {B} is not divisible by P = {P}"), u["mismatch"]


def test_hardest_neighbours_equal_dense_top_k(result):
    """The ring search over P uneven shards = the dense N x N top-K, ties included."""
    for r, rank in enumerate(result["ranks"]):
        nb = rank["neighbours"]
        msg = nb.pop("k_too_large")
        assert msg is not None and "needs N > K" in msg
        # exact ids: random rows' cosines near the 5th are >= 2e-4 apart (rounding 1e-15),
        # the tie rows' cosines are exact
        assert all(nb.values()), (r, nb)
        assert len(nb) == 4


@pytest.mark.parametrize("bn", ["sync", "local"])
def test_training_step_P_ranks_equals_1_rank(result, bn):
    """3 SGD steps of encoder + head + classifier, float64, every parameter."""
    for r, rank in enumerate(result["ranks"]):
        s = rank["step"][bn]
        assert s["worst_param_err"] <= STEPS64, \
            f"rank {r} bn={bn}: {s['worst_param']} off by {s['worst_param_err']:.3e}"
        assert s["buffers"] <= STEPS64 and s["loss"] <= STEPS64
    # (Every step also ran check_replicated: unequal replicas abort the job.)


def test_replica_checksum_catches_one_bit_on_one_rank(result):
    P = result["size"]
    for rank in result["ranks"]:
        msg = rank["replicas"]
        if P == 1:
            assert msg is None  # nothing to differ from
        else:
            assert msg is not None and f"a (ranks [{P - 1}] differ from rank 0)" in msg
            assert "b (" not in msg  # only the array that differs is named


def test_negative_control_averaged_gradients_are_caught(result):
    """Averaging (DDP's habit) instead of summing is off by P: the comparison sees it."""
    if result["size"] == 1:
        pytest.skip("with one rank the average is the sum")
    for rank in result["ranks"]:
        assert rank["step"]["averaged"]["worst_param_err"] > 1e-3  # O(1): far above STEPS64


def test_rank_failure_ends_job():
    """Rank 1 raises while the others wait in an all-reduce: no hang, rank 1's message."""
    proc, seconds = mpirun(3, "fail", timeout=120)
    assert proc.returncode != 0
    assert seconds < 30, f"the job took {seconds:.1f} s to end"
    text = proc.stdout + proc.stderr
    assert "rank 1/3 failed" in text and "rank 1 failed on purpose" in text


def test_rank_leaving_early_ends_job():
    """Rank 1 calls sys.exit(0) while the others wait: the job ends, naming rank 1."""
    proc, seconds = mpirun(3, "exit", timeout=120)
    assert proc.returncode != 0 and seconds < 30
    assert "rank 1/3 left early (sys.exit(0))" in proc.stdout + proc.stderr
