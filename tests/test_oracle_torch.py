"""PyTorch traces: the writer's hooks, its refusals, replay of an independent PyTorch step,
and the planted convention bugs the oracle must name (the tutorial's, plus 1/P).

The PyTorch step is ``refimpl.oracle.torch_resnet.torch_training_steps``, written
without refimpl (dense classifier, autograd, the independent ``TorchNetwork`` as
the model; tutorial 12 runs it too); P ranks are emulated in one process as DDP
behaves (the batch through the network in P chunks, rank 0's BatchNorm buffers
kept).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refimpl.oracle import (Trace, TraceError, format_trace_report, load_encoder_file,  # noqa: E402
                            replay_and_compare)
from refimpl.oracle.compare import worst_row  # noqa: E402
from refimpl.oracle.torch_resnet import TorchNetwork, torch_training_steps  # noqa: E402
from refimpl.oracle.torch_writer import TraceWriter  # noqa: E402
from tolerances import INDEPENDENT64, NETWORK32  # noqa: E402

pytestmark = pytest.mark.torch
N, D, B, K, TAU, ALPHA = 16, 16, 8, 3, 0.15, 0.2


def torch_steps(out, P=1, dtype=torch.float64, bug=None, groups="one", steps=2):
    """``steps`` steps of the independent PyTorch implementation, traced into ``out``:
    nesterov SGD, one or two weight-decay groups, loss and logsumexp logged."""
    return torch_training_steps(out, TraceWriter, P, dtype, lrs=(0.1, 0.05)[:steps], bug=bug,
                                num_classes=N, dim=D, batch_size=B, k=K, tau=TAU, alpha=ALPHA,
                                nesterov=True, logged=("loss", "logsumexp"),
                                weight_decay_mask="all" if groups == "one" else "no_bn_bias")


@pytest.mark.parametrize("groups,mask", [("one", "all"), ("two", "no_bn_bias")])
def test_writer_reads_the_optimizer_and_replay_agrees(tmp_path, groups, mask):
    trace = torch_steps(tmp_path / "t", P=2, groups=groups)
    t = Trace(trace)
    hp = t.hparams
    assert (hp["weight_decay_mask"], hp["nesterov"], hp["momentum"], hp["weight_decay"]) == \
        (mask, True, 0.9, 5e-4)
    assert (hp["arch"], hp["stem"], hp["width"], hp["head_hidden"], hp["dim"]) == \
        ("resnet18", "cifar", 2, 8, D)
    assert (hp["bn_momentum"], hp["bn_eps"], hp["dtype"], hp["batch_size"]) == \
        (0.1, 1e-5, "float64", B)
    st = t.step(0)
    assert "z_hat" not in st and "logsumexp" in st   # only what was logged
    assert [float(t.step(i)["lr"]) for i in (0, 1)] == [0.1, 0.05]
    result = replay_and_compare(trace)
    assert result["ok"], format_trace_report(result, True)
    rows = [r for _, rs in result["sections"] for r in rs]
    # teacher-forced replay: one step at a time against PyTorch (measured 4e-13)
    assert worst_row(rows, result["rtol"], result["atol"])["rel"] < INDEPENDENT64
    assert "step 1: momentum/classifier.weight" not in result["not_compared"]


def test_float32_torch_trace_within_float32_network_bound(tmp_path):
    result = replay_and_compare(torch_steps(tmp_path / "t", P=2, dtype=torch.float32))
    assert result["ok"], format_trace_report(result, True)
    rows = [r for _, rs in result["sections"] for r in rs]
    # u32 / u64 times the float64 test's error (4e-13): 2.2e-4 (measured 4.4e-5)
    assert worst_row(rows, result["rtol"], result["atol"])["rel"] < NETWORK32


@pytest.mark.parametrize("bug,P,first,words", [
    ("dz_times_P", 2, "dz", "yours is 2 x refimpl's (P = 2, the world size)"),
    ("dz_over_P", 2, "dz", "yours is 0.5 x refimpl's (1/P = 1/2)"),
    ("unbiased_bn", 1, "z", "BIASED batch variance"),
    ("ties", 1, "neighbours", "both have cosine"),
])
def test_planted_bugs_are_named_at_their_first_tensor(tmp_path, bug, P, first, words):
    result = replay_and_compare(torch_steps(tmp_path / bug, P=P, bug=bug, steps=1))
    assert not result["ok"]
    assert (result["first"]["where_step"], result["first"]["name"]) == ("step 0", first)
    assert any(words in h for h in result["hints"]), result["hints"]
    report = format_trace_report(result, True)
    assert f"first divergence: step 0, {first} (" in report
    # everything before the first divergence agrees: the report is not noise
    order = [r["name"] for title, rows in result["sections"] if title == "step 0" for r in rows]
    ok = {r["name"]: r["ok"] for title, rows in result["sections"] if title == "step 0"
          for r in rows}
    assert all(ok[n] for n in order[:order.index(first)])


def test_writer_refusals(tmp_path):
    model = TorchNetwork("resnet18", "cifar", width=2, head_hidden=8, dim=D).double()
    W = torch.nn.Parameter(torch.zeros(N, D, dtype=torch.float64))
    hp = {"tau": TAU, "alpha": 0.0, "world_size": 1, "bn": "local"}
    params = list(model.parameters()) + [W]
    with pytest.raises(TraceError, match="the optimizer is Adam"):
        TraceWriter(tmp_path, model, torch.optim.Adam(params), W, hp)
    with pytest.raises(TraceError, match="dampening"):
        TraceWriter(tmp_path, model, torch.optim.SGD(params, lr=0.1, momentum=0.9,
                                                     dampening=0.1), W, hp)
    with pytest.raises(TraceError, match="must hold exactly the model's parameters and the "
                                         "classifier: missing \\['classifier.weight'\\]"):
        TraceWriter(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), W, hp)
    W32 = torch.nn.Parameter(torch.zeros(N, D))
    with pytest.raises(TraceError, match="conv1.weight is float64 but the run's dtype is "
                                         "float32: a run has ONE dtype"):
        TraceWriter(tmp_path, model, torch.optim.SGD(list(model.parameters()) + [W32],
                                                     lr=0.1), W32, {**hp, "dtype": None})
    conv = [p for n, p in model.named_parameters() if n == "conv1.weight"]
    rest = [p for n, p in model.named_parameters() if n != "conv1.weight"] + [W]
    with pytest.raises(TraceError, match="neither one group \\('all'\\) nor the 1-D"):
        TraceWriter(tmp_path, model, torch.optim.SGD([{"params": conv, "weight_decay": 0},
                                                      {"params": rest}], lr=0.1,
                                                     weight_decay=1e-4), W, hp)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    writer = TraceWriter(tmp_path / "t", model, opt, W,
                         {"tau": TAU, "alpha": 0.2, "world_size": 1, "bn": "local"})
    writer.begin_step(torch.arange(B), neighbours=torch.zeros(B, K, dtype=torch.long) + 9)
    model(torch.zeros(B, 3, 8, 8, dtype=torch.float64)).sum().backward()
    with pytest.raises(TraceError, match="hparams\\['neighbours'\\] is missing"):
        opt.step()
    writer.close()


def test_init_encoder_from_a_pt_file(tmp_path):
    """A .pt of a (DDP-wrapped) PyTorch model's state dict starts refimpl's encoder."""
    from refimpl.models import build_model
    model = TorchNetwork("resnet18", "cifar", width=2, head_hidden=8, dim=D)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "enc.pt")
    net = build_model("resnet18", "cifar", width=2, head_hidden=8, dim=D, dtype="float64")
    load_encoder_file(net, tmp_path / "enc.pt")
    mine = net.store.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            np.testing.assert_array_equal(mine[k], v.numpy().astype(np.float64))
    assert not np.array_equal(mine["head.0.weight"], model.state_dict()["head.0.weight"].numpy())
