"""A real torch.distributed run, recorded rank by rank and replayed in refimpl; the seven
classic bugs of a sharded implementation, each named by the first hint.

The run is ``refimpl.oracle.torch_distributed_steps``: 2 processes on gloo, the
encoder in DistributedDataParallel, the classifier's rows sharded over the ranks
(Partial FC's split, its all-gather backward x P, max and sum all-reduces),
smoothed targets, Nesterov SGD with the decay mask, float64; recorded by
``DistributedTraceWriter(..., gradients="averaged")``. One process group records
every variant (clean with local and sync BatchNorm, float32, and one per bug),
once for the module.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refimpl.oracle import Trace, TraceError, format_trace_report, replay_and_compare  # noqa: E402
from refimpl.oracle.compare import worst_row  # noqa: E402
from tolerances import INDEPENDENT64, NETWORK32  # noqa: E402

pytestmark = pytest.mark.torch

# bug -> (the first tensor it breaks, words of the first hint that name it)
BUGS = {
    "no_times_P": ("dz", "DDP averaging without x P"),
    "rank_max": ("row_max", "a per-rank softmax max"),
    "rank_sum": ("logsumexp", "a per-rank softmax sum"),
    "rank_smoothing": ("loss", "smoothing normalized per rank"),
    "tau_x1.01": ("row_max", "tau x 1.01"),
    "bn_swapped": ("z", "BN mode swapped"),
    "decay_swapped": ("momentum/bn1.weight", "the weight-decay mask is swapped"),
}


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from refimpl.oracle.torch_distributed_steps import record_on_ranks
    root = tmp_path_factory.mktemp("distributed")
    two = {"lrs": [0.1, 0.05]}
    variants = [("clean_local", "local", None, two), ("clean_sync", "sync", None, two),
                ("clean_float32", "local", None, {"dtype": "float32"}),
                ("clean_rows", "sync", None, {**two, "classifier_mode": "rows"})]
    # bn_swapped: the trace declares sync, the conversion to SyncBatchNorm is forgotten
    variants += [(bug, "sync" if bug == "bn_swapped" else "local", bug) for bug in BUGS]
    return record_on_ranks(root, variants, world=2, timeout=240)


@pytest.mark.parametrize("name,bn", [("clean_local", "local"), ("clean_sync", "sync")])
def test_a_2_process_run_replays_clean(traces, name, bn):
    t = Trace(traces / name)
    hp = t.hparams
    assert (hp["world_size"], hp["bn"], hp["batch_size"], hp["N"]) == (2, bn, 8, 16)
    assert (hp["weight_decay_mask"], hp["nesterov"], hp["dtype"]) == ("no_bn_bias", True,
                                                                      "float64")
    assert "2 ranks, gradients averaged: dz recorded / 2" in t.meta["producer"]
    assert "conv1.weight" in t.init()                       # DDP's module. unwrapped
    result = replay_and_compare(traces / name)
    assert result["ok"], format_trace_report(result, True)
    rows = [r for _, rs in result["sections"] for r in rs]
    # teacher-forced replay of an independent implementation (measured 4e-13)
    assert worst_row(rows, result["rtol"], result["atol"])["rel"] < INDEPENDENT64
    assert not result["not_compared"]                      # every tensor was recorded


def test_a_2_process_run_with_the_classifier_as_rows_replays_clean(traces):
    """The classifier as the batch's touched rows plus per-shard checksums (the form of a
    large N): every rank contributes the rows it holds and its checksums."""
    t = Trace(traces / "clean_rows")
    st = t.step(1)
    assert t.meta["classifier"] == "rows" and "classifier.weight" not in st
    assert st["checksum/classifier.weight"].shape == (2, 2)
    np.testing.assert_array_equal(st["classifier.rows"], np.unique(
        np.concatenate([st["ids"][:, None], st["neighbours"]], axis=1)))
    result = replay_and_compare(traces / "clean_rows")
    assert result["ok"], format_trace_report(result, True)


def test_a_2_process_float32_run_replays_clean(traces):
    result = replay_and_compare(traces / "clean_float32")
    assert result["ok"], format_trace_report(result, True)
    rows = [r for _, rs in result["sections"] for r in rs]
    assert worst_row(rows, result["rtol"], result["atol"])["rel"] < NETWORK32


@pytest.mark.parametrize("bug", list(BUGS))
def test_each_classic_bug_gets_a_first_hint_that_names_it(traces, bug):
    first, words = BUGS[bug]
    result = replay_and_compare(traces / bug)
    report = format_trace_report(result, True)
    assert not result["ok"]
    assert (result["first"]["where_step"], result["first"]["name"]) == ("step 0", first), report
    assert result["hints"][0].startswith(f"first divergence ({first}): "), result["hints"]
    assert words in result["hints"][0], result["hints"][0]
    # everything before the first divergence agrees: the report is not noise
    step = dict(result["sections"])["step 0"]
    names = [r["name"] for r in step]
    assert all(r["ok"] for r in step[:names.index(first)])
    # no ratio hint on a tensor that is zero (head.0.bias's gradient: it feeds a
    # BatchNorm) or whose difference is pure weight decay
    assert not any("head.0.bias" in h for h in result["hints"]), result["hints"]


# ------------------------------------------------------------ the writer's checks, one rank
@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_distributed_writer_refusals(tmp_path, one_rank):
    from refimpl.oracle.torch_resnet import TorchNetwork
    from refimpl.oracle.torch_writer import DistributedTraceWriter
    net = TorchNetwork("resnet18", "cifar", width=1, head_hidden=8, dim=4).double()
    model = torch.nn.parallel.DistributedDataParallel(net)
    W = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.float64))
    opt = torch.optim.SGD(list(net.parameters()) + [W], lr=0.1, momentum=0.9)
    hp = {"tau": 0.1, "alpha": 0.0, "bn": "local"}
    with pytest.raises(TraceError, match="gradients must be one of"):
        DistributedTraceWriter(tmp_path / "t", model, opt, W, (0, 6), hp, gradients="mean")
    with pytest.raises(TraceError, match="neither partition \\[0, N\\)"):
        DistributedTraceWriter(tmp_path / "t", model, opt, W, (2, 8), hp, gradients="summed")
    with pytest.raises(TraceError, match="rank 0.*contradicts the model"):
        DistributedTraceWriter(tmp_path / "t", model, opt, W, (0, 6),
                               {**hp, "world_size": 2}, gradients="summed")
    writer = DistributedTraceWriter(tmp_path / "t", model, opt, W, (0, 6), hp,
                                    gradients="summed")
    assert writer.names[0] == "conv1.weight" and writer.hparams["world_size"] == 1
    writer.close()


def test_a_trace_with_ddp_prefix_names_it(tmp_path):
    from refimpl.oracle.torch_resnet import TorchNetwork
    net = TorchNetwork("resnet18", "cifar", width=1, head_hidden=8, dim=4)
    state = {"module." + k: v.numpy() for k, v in net.state_dict().items()}
    from refimpl.oracle.trace import architecture_of
    with pytest.raises(TraceError, match="start with 'module.', DistributedDataParallel's"):
        architecture_of(state)
