"""BasicBlock and Bottleneck backward against centered finite differences;
the BatchNorm mode's groups (``net.bn.groups``).

float64, tiny shapes, random upstream gradient, non-trivial BN gammas/betas.
Checked: dx and a few parameter gradients (first conv, a BN scale and shift,
the downsample conv), in train mode (batch statistics) and in eval mode.
``net.bn.groups = G`` normalizes the batch as G parts: per-rank (local)
BatchNorm in one process.
"""
import numpy as np
import pytest

from refimpl.oracle import check_tensor, numerical_grad
from refimpl.models.blocks import BasicBlock, Bottleneck
from refimpl.params import ParamStore
from refimpl.parallel import SelfComm, set_batchnorm_mode
from parallel_problem import B, small_net
from tolerances import LAYER64

# scaled error: max|diff| / max|numerical|; h = 1e-6 central differences. These blocks'
# F / max|g| reach 58 (tolerances.fd_bound's terms): fd_bound(f_over_g=60) = 1.3e-7.
TOL = 1e-6


def build(block_cls, cin, channels, stride, seed=0):
    store = ParamStore(dtype=np.float64)
    block = block_cls(store, "blk.", cin, channels, stride, rng=np.random.default_rng(seed))
    store.finalize()
    g = np.random.default_rng(seed + 1)
    for name, view in store.named_params():
        if view.ndim == 1:  # BN gammas around 1, betas around 0
            view[...] = (1.0 if name.endswith("weight") else 0.0) + 0.3 * g.standard_normal(view.shape)
    for name in store.buffer_names():
        if name.endswith("running_var"):
            store.buffers[name][...] = g.uniform(0.5, 2.0, store.shapes[name])
        elif name.endswith("running_mean"):
            store.buffers[name][...] = 0.2 * g.standard_normal(store.shapes[name])
    return store, block


CASES = [
    ("basic identity", BasicBlock, 4, 4, 1),
    ("basic downsample", BasicBlock, 3, 4, 2),
    ("bottleneck downsample", Bottleneck, 4, 2, 2),
    ("bottleneck identity", Bottleneck, 8, 2, 1),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("label,cls,cin,channels,stride", CASES, ids=[c[0] for c in CASES])
def test_block_backward_vs_finite_differences(label, cls, cin, channels, stride, train):
    store, block = build(cls, cin, channels, stride)
    g = np.random.default_rng(2)
    x = g.standard_normal((2, cin, 5, 5))
    out = block.forward(x, train)
    side = (5 - 1) // stride + 1  # 3x3 conv, pad 1 (and the 1x1 downsample)
    assert out.shape == (2, channels * cls.expansion, side, side)
    assert out.dtype == np.float64
    dout = g.standard_normal(out.shape)
    store.zero_grad()
    dx = block.backward(dout)
    assert dx.shape == x.shape

    f = lambda _: block.forward(x, train)  # noqa: E731 - closes over x and the store
    check_tensor(f"{label} dx", dx, numerical_grad(f, x, dout), TOL)
    names = ["blk.conv1.weight", "blk.bn1.weight", "blk.bn1.bias"]
    names += ["blk.conv3.weight"] if cls is Bottleneck else ["blk.conv2.weight"]
    if block.downsample is not None:
        names += ["blk.downsample.0.weight", "blk.downsample.1.weight"]
    for name in names:
        num = numerical_grad(f, store.params[name], dout)
        check_tensor(f"{label} d{name}", store.grads[name], num, TOL)


def test_backward_accumulates_and_leaves_dout_alone():
    store, block = build(BasicBlock, 3, 4, 2)
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6))
    dout = np.random.default_rng(4).standard_normal(block.forward(x).shape)
    keep = dout.copy()
    store.zero_grad()
    block.backward(dout)
    once = store.grad.copy()
    block.backward(dout)  # a second backward adds the same gradients again
    # grads[name] += dw adds the same dw bits again: x + x = 2 x, exact
    np.testing.assert_allclose(store.grad, 2 * once, rtol=1e-14)
    np.testing.assert_array_equal(dout, keep)
    assert np.abs(once).sum() > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_dtype_preserved(dtype):
    store = ParamStore(dtype=dtype)
    block = Bottleneck(store, "", 4, 2, 2, rng=np.random.default_rng(0))
    store.finalize()
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(dtype)
    out = block.forward(x)
    assert out.dtype == dtype
    assert block.backward(np.ones_like(out)).dtype == dtype
    assert store.grad.dtype == dtype and store.buffer_data.dtype == dtype


LAST_BN = {BasicBlock: "bn2", Bottleneck: "bn3"}


@pytest.mark.parametrize("zero_init", [True, False], ids=["zero_init", "default"])
@pytest.mark.parametrize("cls", [BasicBlock, Bottleneck], ids=["basic", "bottleneck"])
def test_zero_init_residual_block(cls, zero_init):
    """torchvision's option: only the last BN's weight of the main branch starts at 0."""
    store = ParamStore(dtype=np.float64)
    block = cls(store, "blk.", 4, 4, 2, rng=np.random.default_rng(0),
                zero_init_residual=zero_init)
    store.finalize()
    assert block.downsample is not None
    last = f"blk.{LAST_BN[cls]}.weight"
    np.testing.assert_array_equal(store.params[last], 0.0 if zero_init else 1.0)
    for name, view in store.named_params():  # every other BN weight is 1, every BN bias 0
        if name.endswith("bias"):
            np.testing.assert_array_equal(view, 0.0, err_msg=name)
        elif view.ndim == 1 and name != last:  # incl. the downsample's BN (blk.downsample.1)
            np.testing.assert_array_equal(view, 1.0, err_msg=name)


@pytest.mark.parametrize("cls", [BasicBlock, Bottleneck], ids=["basic", "bottleneck"])
def test_zero_init_residual_block_starts_as_identity(cls):
    """With the last BN at 0, an identity block computes relu(x) (in train mode too)."""
    cin = 4 * cls.expansion
    store = ParamStore(dtype=np.float64)
    block = cls(store, "", cin, 4, 1, rng=np.random.default_rng(0), zero_init_residual=True)
    store.finalize()
    assert block.downsample is None
    x = np.random.default_rng(1).standard_normal((2, cin, 5, 5))
    np.testing.assert_array_equal(block.forward(x, train=True), np.maximum(x, 0))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_zero_init_residual_resnet(arch):
    """ResNet passes the option to every block; the stem's and downsample BNs stay at 1.

    (refimpl/oracle/torch_resnet.py has no zero_init_residual, so the values are checked
    directly: exactly the last BN weight of every block is 0.)
    """
    from refimpl.models.resnet import ARCHS, ResNet
    block_cls, depths = ARCHS[arch]
    every_block = [f"layer{s + 1}.{i}.{LAST_BN[block_cls]}.weight"
                   for s, depth in enumerate(depths) for i in range(depth)]
    for zero_init in (True, False):
        model = ResNet(arch, stem="cifar", width=4, num_classes=3, dtype=np.float64,
                       zero_init_residual=zero_init)
        bn_weights = {n: v for n, v in model.store.named_params()
                      if n.endswith(".weight") and v.ndim == 1}
        zeroed = [n for n, v in bn_weights.items() if np.all(v == 0)]
        assert zeroed == (every_block if zero_init else [])
        for n, v in bn_weights.items():
            if n not in zeroed:
                np.testing.assert_array_equal(v, 1.0, err_msg=n)


# -------------------------------------------------------------- bn_groups

def test_bn_groups_validation():
    """bn groups must be a positive integer dividing the batch, without sync BN."""
    net = small_net()
    for bad in (0, 1.5, -2, "abc", float("nan"), True):
        with pytest.raises(ValueError, match="bn groups must be a positive integer"):
            net.bn.groups = bad
    assert net.bn.groups == 1
    net.bn.groups = 3
    with pytest.raises(ValueError, match="a batch of 10 does not split into 3 equal groups"):
        net.forward(np.zeros((10, 3, 8, 8)), train=True)
    set_batchnorm_mode(net, SelfComm(), "sync")
    with pytest.raises(ValueError, match="cannot be combined"):
        net.forward(np.zeros((12, 3, 8, 8)), train=True)


def test_bn_groups_equal_separate_batches():
    """bn groups = 3 = three models on the three parts (local BN on 3 ranks)."""
    x = np.random.default_rng(8).standard_normal((B, 3, 8, 8))
    grouped = small_net()
    grouped.bn.groups = 3
    z = grouped.forward(x, train=True)
    parts = [small_net() for _ in range(3)]
    z_ref = np.concatenate([net.forward(x[4 * g:4 * g + 4], train=True)
                            for g, net in enumerate(parts)])
    check_tensor("z", z, z_ref, LAYER64)
    # The running statistics follow part 0 only (rank 0's, in a P-rank run): means over
    # <= 256 values per channel, reduced over another array shape.
    check_tensor("buffers", grouped.store.buffer_data, parts[0].store.buffer_data, LAYER64)
    # part 1's statistics are other numbers (O(1) apart), not a rounding away
    assert not np.allclose(parts[1].store.buffer_data, parts[0].store.buffer_data)
    # Negative control: the whole batch in one group gives another z (O(1), not 1e-12).
    assert np.abs(small_net().forward(x, train=True) - z).max() > 1e-3
