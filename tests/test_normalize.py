"""L2 normalize: finite differences (both branches), PyTorch parity, dtype."""
import numpy as np
import pytest

from refimpl.oracle import check_tensor, numerical_grad
from refimpl.layers.normalize import l2_normalize_backward, l2_normalize_forward
from tolerances import FD64, INDEPENDENT64, ROUNDINGS64


def test_forward_unit_rows():
    x = np.random.default_rng(0).standard_normal((6, 5)) * 3
    out, _ = l2_normalize_forward(x)
    check_tensor("norms", np.linalg.norm(out, axis=1), np.ones(6), ROUNDINGS64)  # (5 + 3) u
    # out's (5/2 + 2) u, a product's u, the norm's (5/2 + 1) u: 9 u
    check_tensor("direction", out * np.linalg.norm(x, axis=1, keepdims=True), x, ROUNDINGS64)


def test_gradient_matches_finite_differences():
    x = np.random.default_rng(1).standard_normal((4, 6)) * np.array([[0.1], [1], [5], [30]])
    dout = np.random.default_rng(2).standard_normal(x.shape)
    out, cache = l2_normalize_forward(x)
    dx = l2_normalize_backward(dout, cache)
    dx_fd = numerical_grad(lambda x_: l2_normalize_forward(x_)[0], x.copy(), dout)
    check_tensor("dx", dx, dx_fd, FD64)
    # dx is orthogonal to each output row (the norm is invariant to scaling): 0 up to
    # 6 terms dx_i x_i = O(1) of ~10 roundings each, ~60 u = 7e-15.
    assert np.abs((dx * x).sum(axis=1)).max() < 1e-12


def test_clamped_branch_matches_finite_differences():
    # eps = 0.5: rows of norm ~0.1 stay clamped under the FD step, rows of
    # norm ~3 stay unclamped.
    r = np.random.default_rng(3)
    x = r.standard_normal((4, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= np.array([[0.1], [3.0], [0.05], [2.0]])
    dout = r.standard_normal(x.shape)
    out, cache = l2_normalize_forward(x, eps=0.5)
    check_tensor("clamped rows", out[[0, 2]], x[[0, 2]] / 0.5, ROUNDINGS64)  # exact
    dx = l2_normalize_backward(dout, cache)
    dx_fd = numerical_grad(lambda x_: l2_normalize_forward(x_, eps=0.5)[0], x.copy(), dout)
    check_tensor("dx", dx, dx_fd, 1e-8)  # fd_bound(f_over_g=1.2) = 2.7e-9: 12 entries
    check_tensor("dx clamped", dx[[0, 2]], dout[[0, 2]] / 0.5, ROUNDINGS64)  # exact


def test_zero_row():
    x = np.zeros((2, 4))
    x[1] = [1.0, -2.0, 2.0, 0.0]
    dout = np.random.default_rng(4).standard_normal(x.shape)
    out, cache = l2_normalize_forward(x)
    dx = l2_normalize_backward(dout, cache)
    np.testing.assert_array_equal(out[0], np.zeros(4))
    check_tensor("dx zero row", dx[0], dout[0] / 1e-12, ROUNDINGS64)  # one division
    assert np.isfinite(dx).all()


def test_non_contiguous_and_3d():
    r = np.random.default_rng(5)
    x = r.standard_normal((5, 3, 8))[..., ::2].transpose(1, 0, 2)   # (3, 5, 4), a view
    dout = r.standard_normal((4, 5, 3)).T                           # (3, 5, 4), a view
    assert not x.flags.c_contiguous and not dout.flags.c_contiguous
    out, cache = l2_normalize_forward(x)
    dx = l2_normalize_backward(dout, cache)
    x2 = np.ascontiguousarray(x).reshape(15, 4)
    out2, cache2 = l2_normalize_forward(x2)
    dx2 = l2_normalize_backward(np.ascontiguousarray(dout).reshape(15, 4), cache2)
    # the same row computations on a view and on a copy (rows of 4, summed in order)
    check_tensor("out", out.reshape(15, 4), out2, ROUNDINGS64)
    check_tensor("dx", dx.reshape(15, 4), dx2, ROUNDINGS64)
    dx_fd = numerical_grad(lambda x_: l2_normalize_forward(x_)[0], np.ascontiguousarray(x), dout)
    check_tensor("dx vs fd", dx, dx_fd, FD64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_and_no_mutation(dtype):
    x = np.random.default_rng(6).standard_normal((5, 4)).astype(dtype)
    x[2] = 0
    dout = np.random.default_rng(7).standard_normal(x.shape).astype(dtype)
    x0, dout0 = x.copy(), dout.copy()
    out, cache = l2_normalize_forward(x)
    dx = l2_normalize_backward(dout, cache)
    assert out.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dout, dout0)


def test_negative_eps_and_a_0d_input_are_refused():
    with pytest.raises(ValueError, match="eps"):
        l2_normalize_forward(np.ones((2, 3)), eps=-1.0)
    with pytest.raises(ValueError, match="axis"):
        l2_normalize_forward(np.array(1.0))


@pytest.mark.torch
@pytest.mark.parametrize("eps", [1e-12, 0.5])
def test_matches_pytorch(eps):
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(8)
    x = r.standard_normal((6, 5)) * r.uniform(0.01, 4, (6, 1))
    x[3] = 0  # a zero row: the clamped branch
    dout = r.standard_normal(x.shape)
    out, cache = l2_normalize_forward(x, eps=eps)
    dx = l2_normalize_backward(dout, cache)
    tx = torch.tensor(x, requires_grad=True)
    tout = torch.nn.functional.normalize(tx, p=2, dim=-1, eps=eps)
    (tout * torch.tensor(dout)).sum().backward()
    check_tensor("out", out, tout.detach().numpy(), INDEPENDENT64)
    # The zero row's gradient is dout / eps (1e12 for the default eps): compare
    # the other rows on their own scale.
    rest = [0, 1, 2, 4, 5]
    check_tensor("dx", dx[rest], tx.grad.numpy()[rest], INDEPENDENT64)
    check_tensor("dx zero row", dx[3], tx.grad.numpy()[3], INDEPENDENT64, kind="rel")
