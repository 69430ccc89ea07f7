"""Whole-model parity with an independent PyTorch implementation (float64).

refimpl/oracle/torch_resnet.py builds the same networks in plain torch.nn with
torchvision's module names; the PyTorch model gets refimpl's initial weights
through the state dict, both see the same input and the same upstream
gradient, and every tensor is compared with ``check_tensor`` (per tensor,
max|diff| / max|ref|).

Main test: ResNet-18 (CIFAR stem, width 16) + MLP head, BN in train mode,
loss = softmax cross-entropy of the head output z (B, 128) against random
labels, three SGD steps (momentum 0.9, weight decay 5e-4, lr 0.1). After the
three steps every parameter, every BN buffer (running statistics and
num_batches_tracked) and the momentum buffer agree within 1e-9 (tests/tolerances.py,
STEPS64); one forward and backward within 1e-10 (INDEPENDENT64).
"""
import numpy as np
import pytest

from refimpl.oracle import check_tensor
from refimpl.layers.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from refimpl.models import build_model
from refimpl.models.resnet import ResNet
from refimpl.optim.sgd import SGD
from tolerances import INDEPENDENT32, INDEPENDENT64, LAYER64, STEPS64

TOL = INDEPENDENT64  # one forward and backward against PyTorch's kernels

pytestmark = pytest.mark.torch


def torch_model_like(torch, ours_sd, model):
    """``model`` (a torch module) in float64 with refimpl's state dict loaded."""
    model = model.double()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours_sd.items()})
    return model


def randomize_bn(store, seed):
    """Non-trivial BN gammas/betas/running statistics (the init has 1, 0, 0, 1)."""
    g = np.random.default_rng(seed)
    for name, view in store.named_params():
        if name.rsplit(".", 1)[0] + ".running_mean" in store.shapes:  # a BN's weight/bias
            view[...] = (1.0 if name.endswith("weight") else 0.0) + 0.2 * g.standard_normal(view.shape)
    for name in store.buffer_names():
        if name.endswith("running_mean"):
            store.buffers[name][...] = 0.1 * g.standard_normal(store.shapes[name])
        elif name.endswith("running_var"):
            store.buffers[name][...] = g.uniform(0.5, 2.0, store.shapes[name])


@pytest.mark.slow
def test_resnet18_head_three_sgd_steps_match_torch():
    torch = pytest.importorskip("torch")
    from refimpl.oracle.torch_resnet import TorchNetwork
    net = build_model("resnet18", stem="cifar", width=16, head_hidden=64, dim=128,
                      dtype=np.float64, seed=3)
    tnet = torch_model_like(torch, net.store.state_dict(),
                            TorchNetwork("resnet18", "cifar", 16, head_hidden=64, dim=128))
    assert list(tnet.state_dict()) == list(net.store.state_dict())  # same names, same order
    tnet.train()
    lr, mu, wd = 0.1, 0.9, 5e-4
    opt = SGD(net.store.data, net.store.grad, lr=lr, momentum=mu, weight_decay=wd)
    topt = torch.optim.SGD(tnet.parameters(), lr=lr, momentum=mu, weight_decay=wd)
    g = np.random.default_rng(0)
    for step in range(3):
        x = g.standard_normal((8, 3, 32, 32))
        y = g.integers(0, 128, size=8)
        # refimpl
        z = net.forward(x, train=True)
        loss, cache = softmax_cross_entropy_forward(z, y)
        net.store.zero_grad()
        dx = net.backward(softmax_cross_entropy_backward(1.0, cache))
        # torch
        tx = torch.tensor(x, requires_grad=True)
        tz = tnet(tx)
        tloss = torch.nn.functional.cross_entropy(tz, torch.from_numpy(y))
        topt.zero_grad()
        tloss.backward()
        # after 0, 1, 2 updates: the steps' rounding differences are in the weights
        check_tensor(f"step {step} z", z, tz.detach().numpy(), STEPS64)
        check_tensor(f"step {step} loss", np.float64(loss), tloss.item(), STEPS64)
        check_tensor(f"step {step} dx", dx, tx.grad.numpy(), STEPS64)
        if step == 0:  # gradients once, before any update (afterwards they are inside the params)
            for name, p in tnet.named_parameters():
                if name == "head.0.bias":
                    # A bias right before a train-mode BN has gradient exactly 0
                    # (BN subtracts the batch mean); both sides hold rounding noise:
                    # 8 terms that cancel, ~10 roundings each: ~100 u of the scale.
                    scale = np.abs(net.store.grads["head.0.weight"]).max()
                    assert np.abs(net.store.grads[name]).max() < LAYER64 * scale
                    assert np.abs(p.grad.numpy()).max() < LAYER64 * scale
                    continue
                check_tensor(f"grad {name}", net.store.grads[name], p.grad.numpy(), TOL)
        opt.step()
        topt.step()

    tsd = tnet.state_dict()
    ours = net.store.state_dict()
    assert len(ours) == len(tsd) == 122 - 2 + 9  # torchvision resnet18 - fc + head
    for name, ref in tsd.items():
        if name.endswith("num_batches_tracked"):
            assert ours[name].dtype == np.int64 and int(ours[name]) == int(ref) == 3, name
        else:
            check_tensor(name, ours[name], ref.numpy(), STEPS64)
    for name, p in tnet.named_parameters():
        a, b = net.store.offsets[name]
        check_tensor(f"momentum {name}", opt.momentum_buffer[a:b].reshape(p.shape),
                     topt.state[p]["momentum_buffer"].numpy(), STEPS64)
    # And in eval mode (running statistics) the updated models still agree.
    tnet.eval()
    x = g.standard_normal((4, 3, 32, 32))
    check_tensor("eval z", net.forward(x, train=False), tnet(torch.tensor(x)).detach().numpy(),
                 STEPS64)


@pytest.mark.parametrize("stem,size", [("cifar", 16), ("imagenet", 64)])
def test_bottleneck_resnet50_forward_backward_match_torch(stem, size):
    torch = pytest.importorskip("torch")
    from refimpl.oracle.torch_resnet import TorchResNet
    model = ResNet("resnet50", stem=stem, width=8, num_classes=10, dtype=np.float64, seed=1)
    randomize_bn(model.store, 2)
    tmodel = torch_model_like(torch, model.store.state_dict(),
                              TorchResNet("resnet50", stem, 8, num_classes=10))
    _compare_forward_backward(torch, model, tmodel, (4, 3, size, size), train=True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_resnet18_imagenet_stem_forward_backward_match_torch(train):
    torch = pytest.importorskip("torch")
    from refimpl.oracle.torch_resnet import TorchResNet
    model = ResNet("resnet18", stem="imagenet", width=8, num_classes=None,
                   dtype=np.float64, seed=4)
    randomize_bn(model.store, 5)
    tmodel = torch_model_like(torch, model.store.state_dict(),
                              TorchResNet("resnet18", "imagenet", 8, num_classes=None))
    _compare_forward_backward(torch, model, tmodel, (4, 3, 48, 48), train=train)


def _compare_forward_backward(torch, model, tmodel, xshape, train):
    g = np.random.default_rng(7)
    x = g.standard_normal(xshape)
    tmodel.train(train)
    tx = torch.tensor(x, requires_grad=True)
    tout = tmodel(tx)
    out = model.forward(x, train=train)
    check_tensor("out", out, tout.detach().numpy(), TOL)
    dout = g.standard_normal(out.shape)
    tout.backward(torch.from_numpy(dout))
    model.store.zero_grad()
    dx = model.backward(dout)
    check_tensor("dx", dx, tx.grad.numpy(), TOL)
    for name, p in tmodel.named_parameters():
        check_tensor(f"grad {name}", model.store.grads[name], p.grad.numpy(), TOL)
    tsd, ours = tmodel.state_dict(), model.store.state_dict()
    for name in tsd:
        if not name.endswith("num_batches_tracked"):
            check_tensor(name, ours[name], tsd[name].numpy(), TOL)
        else:
            assert int(ours[name]) == int(tsd[name]), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_network_dtype_preserved(dtype):
    net = build_model("resnet18", stem="cifar", width=4, head_hidden=8, dim=6, dtype=dtype)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(dtype)
    z = net.forward(x)
    assert z.shape == (2, 6) and z.dtype == dtype
    dx = net.backward(np.ones_like(z))
    assert dx.dtype == dtype and net.store.grad.dtype == dtype
    for name, v in net.store.state_dict().items():
        assert v.dtype == (np.int64 if name.endswith("num_batches_tracked") else dtype), name
    assert net.forward(x, train=False).dtype == dtype


def test_init_reproducible_and_torchvision_like():
    a = build_model("resnet18", width=8, dtype=np.float64, seed=5)
    b = build_model("resnet18", width=8, dtype=np.float64, seed=5)
    c = build_model("resnet18", width=8, dtype=np.float64, seed=6)
    f = build_model("resnet18", width=8, dtype=np.float32, seed=5)
    np.testing.assert_array_equal(a.store.data, b.store.data)
    assert not np.array_equal(a.store.data, c.store.data)
    np.testing.assert_array_equal(f.store.data, a.store.data.astype(np.float32))
    # The encoder's init does not depend on the head.
    d = build_model("resnet18", width=8, dtype=np.float64, seed=5, head_hidden=16, dim=32)
    n = a.store.offsets["head.0.weight"][0]
    np.testing.assert_array_equal(a.store.data[:n], d.store.data[:n])
    p = a.store.params
    # kaiming normal, fan_out: std sqrt(2 / (F k k)); BN 1/0; Linear U(+-1/sqrt(in)).
    w = p["layer4.1.conv2.weight"]  # (64, 64, 3, 3)
    assert abs(w.std() / np.sqrt(2 / (64 * 9)) - 1) < 0.05
    assert np.all(p["layer2.0.bn1.weight"] == 1) and np.all(p["layer2.0.bn1.bias"] == 0)
    assert np.abs(p["head.0.weight"]).max() <= 1 / np.sqrt(64)
    assert np.abs(p["head.3.bias"]).max() <= 1 / np.sqrt(64)


def test_bn_mode_allreduce_reaches_every_batchnorm():
    """One setting, net.bn, reaches the encoder's and the head's BatchNorms."""
    calls = []

    def allreduce(v):  # a 1-rank "all-reduce" that records its calls
        calls.append(v.shape)
        return v.copy()

    a = build_model("resnet18", width=4, head_hidden=8, dim=6, dtype=np.float64, seed=0)
    b = build_model("resnet18", width=4, head_hidden=8, dim=6, dtype=np.float64, seed=0)
    b.bn.allreduce = allreduce
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8))
    za, zb = a.forward(x), b.forward(x)
    n_bn = 1 + 8 * 2 + 3 + 1  # stem, 8 blocks x 2, 3 downsamples, head
    assert len(calls) == n_bn
    # sync BN's one-pass statistics against the two-pass ones, through the whole network
    check_tensor("z with hook", zb, za, INDEPENDENT64)
    dz = np.random.default_rng(1).standard_normal(za.shape)
    check_tensor("dx with hook", b.backward(dz), a.backward(dz), INDEPENDENT64)
    assert len(calls) == 2 * n_bn
    assert b.forward(x, train=False) is not None and len(calls) == 2 * n_bn  # eval: local


def test_float32_step_follows_float64():
    """The float32 fast paths (Winograd on the 8x8 and 4x4 maps, pixel-major
    im2col, BatchNorm's row passes, threads off) against the same network in
    float64: one forward and backward from the same weights agree to float32
    accuracy, relative to each tensor's largest value."""
    from refimpl.layers import conv
    x = np.random.default_rng(7).standard_normal((8, 3, 32, 32))
    nets = {dt: build_model("resnet18", stem="cifar", width=8, head_hidden=16, dim=8,
                            dtype=dt, seed=3) for dt in (np.float32, np.float64)}
    assert conv._winograd(x.astype(np.float32), 8, 8, 3, 3, 1, 1, 1)  # the 8x8 stage uses it
    out = {}
    for dt, net in nets.items():
        z = net.forward(x.astype(dt))
        dz = np.cos(np.arange(z.size, dtype=np.float64)).reshape(z.shape).astype(dt)
        net.store.zero_grad()
        dx = net.backward(dz)
        out[dt] = {"z": z, "dx": dx, "grad": net.store.grad}
    for name in ("z", "dx", "grad"):
        a, b = out[np.float32][name].astype(np.float64), out[np.float64][name]
        err = np.abs(a - b).max() / np.abs(b).max()
        # float32 rounds u32 / u64 = 5.4e8 times coarser: 5.4e8 x this network's float64
        # reordering error (1.4e-13 against PyTorch) = 7.6e-5; measured <= 2.8e-6
        assert err < INDEPENDENT32, f"{name}: float32 relative error {err:.1e}"
