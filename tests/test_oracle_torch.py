"""PyTorch traces: the writer's hooks, its refusals, replay of an independent PyTorch step,
and the planted convention bugs the oracle must name (the tutorial's, plus 1/P).

The PyTorch step here is written without refimpl (dense classifier, autograd,
refimpl's independent ``TorchNetwork`` as the model); P ranks are emulated in
one process as DDP behaves (the batch through the network in P chunks, rank
0's BatchNorm buffers kept).
"""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from refimpl.oracle import (Trace, TraceError, format_trace_report, load_encoder_file,  # noqa: E402
                            replay_and_compare)
from refimpl.oracle.compare import worst_row  # noqa: E402
from refimpl.oracle.torch_resnet import TorchNetwork  # noqa: E402
from refimpl.oracle.torch_writer import TraceWriter  # noqa: E402
from tolerances import INDEPENDENT64, NETWORK32  # noqa: E402

pytestmark = pytest.mark.torch
N, D, B, K, TAU, ALPHA = 16, 16, 8, 3, 0.15, 0.2


def neighbours(W, k, tie_rule=True):
    S = F.normalize(W.detach(), dim=1) @ F.normalize(W.detach(), dim=1).T
    S.fill_diagonal_(-float("inf"))
    if tie_rule:
        return torch.sort(S, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.argsort(S, dim=1, stable=True).flip(1)[:, :k]   # ties to the higher id


def unbiased_bn(bn, x):
    dims, shape = [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)
    mean, var = x.mean(dims), x.var(dims, unbiased=True)
    with torch.no_grad():
        bn.running_mean.mul_(0.9).add_(0.1 * mean)
        bn.running_var.mul_(0.9).add_(0.1 * var)
        bn.num_batches_tracked += 1
    xhat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    return xhat * bn.weight.view(shape) + bn.bias.view(shape)


def torch_steps(out, P=1, dtype=torch.float64, bug=None, groups="one", steps=2, seed=0):
    """``steps`` steps of an independent PyTorch implementation, traced into ``out``."""
    g = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = TorchNetwork("resnet18", "cifar", width=2, head_hidden=8, dim=D).to(dtype)
    if bug == "unbiased_bn":
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.forward = functools.partial(unbiased_bn, m)
    W = torch.nn.Parameter(torch.tensor(g.choice([-0.5, 0.5], size=(N, D)), dtype=dtype))
    if groups == "one":
        params = list(model.parameters()) + [W]
    else:  # refimpl-train's rule: no weight decay on BatchNorm and biases
        params = [{"params": [p for p in model.parameters() if p.dim() > 1] + [W]},
                  {"params": [p for p in model.parameters() if p.dim() <= 1],
                   "weight_decay": 0.0}]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    writer = TraceWriter(out, model, opt, W, {"tau": TAU, "alpha": ALPHA, "K": K,
                                              "world_size": P, "bn": "local",
                                              "neighbours": "initial_weight"})
    table = neighbours(W, K, tie_rule=bug != "ties")
    b = B // P
    for s in range(steps):
        x = torch.tensor(g.normal(size=(B, 3, 8, 8)), dtype=dtype)
        ids = torch.tensor(g.permutation(N)[:B])
        rows = table[ids]
        writer.begin_step(ids, rows)
        zs = []
        for r in range(P):
            zs.append(model(x[r * b:(r + 1) * b]))
            if r == 0:
                rank0 = {k: v.clone() for k, v in model.named_buffers()}
        z = torch.cat(zs)
        if bug == "dz_times_P":
            z.register_hook(lambda dz: dz * P)
        if bug == "dz_over_P":
            z.register_hook(lambda dz: dz / P)
        logits = F.normalize(z, dim=1) @ F.normalize(W, dim=1).T / TAU
        y = torch.zeros(B, N, dtype=dtype)
        y[torch.arange(B), ids] = 1 - ALPHA
        y.scatter_add_(1, rows, torch.full((B, K), ALPHA / K, dtype=dtype))
        loss = -(y * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        writer.log(loss=loss, logsumexp=torch.logsumexp(logits, 1))
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(rank0[k])
        for group in opt.param_groups:
            group["lr"] = 0.1 / (s + 1)
        opt.step()
    writer.close()
    return out


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
