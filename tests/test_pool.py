"""Max pool and global average pool: finite differences, twins, PyTorch, ties, dtypes."""
import numpy as np
import pytest
from refimpl.oracle import check_tensor, numerical_grad

from refimpl.layers.pool import (global_avgpool_backward, global_avgpool_forward,
                                 maxpool2d_backward, maxpool2d_backward_naive,
                                 maxpool2d_forward, maxpool2d_forward_naive)
from tolerances import FD64, INDEPENDENT64, LAYER64, SHORT64, fd_bound

# (x shape, kernel, stride, pad)
POOL_CASES = [
    ((2, 3, 8, 8), 3, 2, 1),   # the ImageNet stem's pool (overlapping windows)
    ((2, 2, 7, 5), 3, 2, 1),   # non-square, odd sizes
    ((1, 3, 6, 6), 2, 2, 0),   # non-overlapping
    ((2, 2, 5, 6), 3, 1, 1),   # stride 1: every pixel in up to 9 windows
]


def _ids(case):
    x, k, s, p = case
    return f"x{'x'.join(map(str, x))}-k{k}s{s}p{p}"


def _distinct(shape, seed):
    """Values without ties (a permutation, spaced 0.01 apart), so FD is clean."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    return (rng.permutation(size).astype(np.float64) * 0.01 - size * 0.005).reshape(shape)


@pytest.mark.parametrize("case", POOL_CASES, ids=_ids)
def test_maxpool_backward_matches_finite_differences(case):
    x_shape, k, s, p = case
    x = _distinct(x_shape, seed=0)
    out, cache = maxpool2d_forward(x, k, s, p)
    dout = np.random.default_rng(1).standard_normal(out.shape)
    dx = maxpool2d_backward(dout, cache)
    # h far below the 0.01 gap between values: no window changes its winner
    dx_num = numerical_grad(lambda t: maxpool2d_forward(t, k, s, p)[0], x.copy(), dout, h=1e-5)
    check_tensor("dx", dx, dx_num, fd_bound(h=1e-5))  # piecewise linear: rounding only


@pytest.mark.parametrize("case", POOL_CASES, ids=_ids)
def test_maxpool_fast_matches_naive(case):
    x_shape, k, s, p = case
    x = np.random.default_rng(2).standard_normal(x_shape)
    out, cache = maxpool2d_forward(x, k, s, p)
    out_n, cache_n = maxpool2d_forward_naive(x, k, s, p)
    assert out.shape == out_n.shape == (x_shape[0], x_shape[1],
                                        (x_shape[2] + 2 * p - k) // s + 1,
                                        (x_shape[3] + 2 * p - k) // s + 1)
    check_tensor("out", out, out_n, LAYER64)
    dout = np.random.default_rng(3).standard_normal(out.shape)
    check_tensor("dx", maxpool2d_backward(dout, cache), maxpool2d_backward_naive(dout, cache_n),
                 LAYER64)


def test_maxpool_padding_is_minus_infinity():
    """All-negative inputs: a zero pad would win at the border; -inf never does."""
    x = -1.5 - np.abs(_distinct((1, 1, 4, 4), seed=4))
    out, cache = maxpool2d_forward(x, 3, 2, 1)
    assert out.max() < -1.0
    dx = maxpool2d_backward(np.ones_like(out), cache)
    assert dx.sum() == out.size  # every window's gradient lands on a real pixel


def test_maxpool_non_contiguous_input_and_no_mutation():
    rng = np.random.default_rng(5)
    x = _distinct((6, 2, 3, 7), seed=5).transpose(2, 1, 3, 0)[:, :, ::1, 1:]  # (3, 2, 7, 5) view
    assert not x.flags.c_contiguous
    out, cache = maxpool2d_forward(x, 3, 2, 1)
    out_c, cache_c = maxpool2d_forward(np.ascontiguousarray(x), 3, 2, 1)
    np.testing.assert_array_equal(out, out_c)
    dout = rng.standard_normal(out.shape + (2,))[..., 1]  # non-contiguous upstream gradient
    dout_before = dout.copy()
    dx = maxpool2d_backward(dout, cache)
    np.testing.assert_array_equal(dx, maxpool2d_backward(np.ascontiguousarray(dout), cache_c))
    np.testing.assert_array_equal(dout, dout_before)
    dx_num = numerical_grad(lambda t: maxpool2d_forward(t, 3, 2, 1)[0], np.ascontiguousarray(x),
                            dout, h=1e-5)
    check_tensor("dx vs FD", dx, dx_num, fd_bound(h=1e-5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pools_preserve_dtype(dtype):
    x = np.random.default_rng(6).standard_normal((2, 3, 6, 6)).astype(dtype)
    out, cache = maxpool2d_forward(x)
    dx = maxpool2d_backward(np.ones_like(out), cache)
    assert out.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    out, cache = global_avgpool_forward(x)
    dx = global_avgpool_backward(np.ones_like(out), cache)
    assert out.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape


def test_global_avgpool_backward_matches_finite_differences():
    x = np.random.default_rng(7).standard_normal((2, 3, 4, 5))
    out, cache = global_avgpool_forward(x)
    assert out.shape == (2, 3)
    check_tensor("out", out, x.reshape(2, 3, -1).mean(-1), SHORT64)  # means of 20
    dout = np.random.default_rng(8).standard_normal(out.shape)
    dx = global_avgpool_backward(dout, cache)
    dx_num = numerical_grad(lambda t: global_avgpool_forward(t)[0], x.copy(), dout)
    check_tensor("dx", dx, dx_num, FD64)
    dx_view = global_avgpool_backward(dout.T.copy().T, cache)  # non-contiguous dout
    np.testing.assert_array_equal(dx, dx_view)


def _torch_maxpool(x, dout, k, s, p):
    """PyTorch's F.max_pool2d(x, k, s, p) and its dx for the upstream gradient dout (NumPy)."""
    import torch
    xt = torch.tensor(x, requires_grad=True)
    out = torch.nn.functional.max_pool2d(xt, k, s, p)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), xt.grad.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("case", POOL_CASES, ids=_ids)
def test_maxpool_matches_pytorch(case):
    pytest.importorskip("torch")
    x_shape, k, s, p = case
    x = np.random.default_rng(9).standard_normal(x_shape)
    out, cache = maxpool2d_forward(x, k, s, p)
    dout = np.random.default_rng(10).standard_normal(out.shape)
    dx = maxpool2d_backward(dout, cache)
    out_t, dx_t = _torch_maxpool(x, dout, k, s, p)
    check_tensor("out", out, out_t, INDEPENDENT64, kind="rel")
    check_tensor("dx", dx, dx_t, INDEPENDENT64, kind="rel")


@pytest.mark.torch
@pytest.mark.parametrize("case", POOL_CASES, ids=_ids)
def test_maxpool_tie_rule_matches_pytorch(case):
    """Many ties (values from {0, 1, 2}, and all-equal planes): the first
    maximum in row-major window order gets the gradient, as in PyTorch."""
    pytest.importorskip("torch")
    x_shape, k, s, p = case
    x = np.random.default_rng(11).integers(0, 3, x_shape).astype(np.float64)
    x[0, 0] = 1.0  # a plane where every window is one big tie
    out, cache = maxpool2d_forward(x, k, s, p)
    dout = np.random.default_rng(12).standard_normal(out.shape)
    dx = maxpool2d_backward(dout, cache)
    out_t, dx_t = _torch_maxpool(x, dout, k, s, p)
    check_tensor("out", out, out_t, 0.0)  # a max picks an input: exact
    # overlapping windows: each dx a sum of <= 9 window gradients in another order
    check_tensor("dx", dx, dx_t, SHORT64)
    # the twin follows the same rule
    check_tensor("dx naive", maxpool2d_backward_naive(dout, maxpool2d_forward_naive(x, k, s, p)[1]),
                 dx_t, SHORT64)


@pytest.mark.torch
def test_global_avgpool_matches_pytorch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(13).standard_normal((3, 4, 5, 6))
    out, cache = global_avgpool_forward(x)
    dout = np.random.default_rng(14).standard_normal(out.shape)
    dx = global_avgpool_backward(dout, cache)
    xt = torch.tensor(x, requires_grad=True)
    outt = torch.nn.functional.adaptive_avg_pool2d(xt, 1).flatten(1)
    outt.backward(torch.tensor(dout))
    check_tensor("out", out, outt.detach().numpy(), INDEPENDENT64, kind="rel")
    check_tensor("dx", dx, xt.grad.numpy(), INDEPENDENT64, kind="rel")


@pytest.mark.torch
@pytest.mark.parametrize("case", POOL_CASES, ids=_ids)
def test_maxpool_nan_propagates_like_pytorch(case):
    """A NaN anywhere in a window wins (PyTorch: val > max || isnan(val)), and
    the window's gradient goes to its last NaN; NaN must reach the loss."""
    pytest.importorskip("torch")
    x_shape, k, s, p = case
    x = _distinct(x_shape, 13)
    x[0, 0, 1, 1] = np.nan
    x[-1, -1, 2, 1] = np.nan
    x[-1, -1, 2, 2] = np.nan  # two NaNs side by side: the later one takes the gradient
    out, cache = maxpool2d_forward(x, k, s, p)
    dout = np.random.default_rng(14).standard_normal(out.shape)
    out_t, dx_t = _torch_maxpool(x, dout, k, s, p)
    assert np.isnan(out).any()
    np.testing.assert_array_equal(out, out_t)  # NaN where torch has NaN
    # overlapping windows sum in another order: equal up to rounding
    check_tensor("dx", maxpool2d_backward(dout, cache), dx_t, SHORT64)  # <= 9 terms
    check_tensor("dx naive", maxpool2d_backward_naive(dout, maxpool2d_forward_naive(x, k, s, p)[1]),
                 dx_t, SHORT64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel=3, stride=0, pad=1), "stride must be a positive integer"),
    (dict(kernel=3, stride=2, pad=-1), "pad must be a non-negative integer"),
    (dict(kernel=0, stride=1, pad=0), "kernel must be a positive integer"),
    (dict(kernel=3, stride=1.5, pad=1), "stride must be a positive integer"),
    (dict(kernel=9, stride=1, pad=1), "larger than padded input"),
    (dict(kernel=3, stride=2, pad=2), "pad 2 must be <= kernel // 2"),
])
def test_maxpool_rejects_impossible_windows(kwargs, match):
    with pytest.raises(ValueError, match=match):
        maxpool2d_forward(np.zeros((1, 1, 5, 5)), **kwargs)
