"""BasicBlock and Bottleneck backward against centered finite differences.

float64, tiny shapes, random upstream gradient, non-trivial BN gammas/betas.
Checked: dx and a few parameter gradients (first conv, a BN scale and shift,
the downsample conv), in train mode (batch statistics) and in eval mode.
"""
import numpy as np
import pytest

from helpers import check_tensor, numerical_grad
from refimpl.models.blocks import BasicBlock, Bottleneck
from refimpl.params import ParamStore

TOL = 1e-6  # scaled error: max|diff| / max|numerical|; h = 1e-6 central differences


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
