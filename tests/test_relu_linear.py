"""ReLU and its readable twin, Linear: finite differences, PyTorch parity, dtype,
non-contiguous inputs."""
import numpy as np
import pytest

from refimpl.oracle import check_tensor, numerical_grad
from refimpl.layers.linear import linear_backward, linear_forward
from refimpl.layers.relu import (relu_backward, relu_backward_naive, relu_forward,
                                 relu_forward_naive)
from tolerances import FD64, INDEPENDENT64, ROUNDINGS64, SHORT64


def away_from_zero(shape, seed, margin=0.1):
    """Standard normal values with |x| >= margin, so no FD step crosses the kink."""
    x = np.random.default_rng(seed).standard_normal(shape)
    return np.where(x >= 0, x + margin, x - margin)


# ---------------------------------------------------------------- ReLU

def test_relu_values_and_gradient():
    x = away_from_zero((5, 3, 2, 2), seed=0)
    dout = np.random.default_rng(1).standard_normal(x.shape)
    out, cache = relu_forward(x)
    np.testing.assert_array_equal(out, np.where(x > 0, x, 0.0))
    dx = relu_backward(dout, cache)
    check_tensor("dx", dx, numerical_grad(lambda x_: relu_forward(x_)[0], x.copy(), dout), FD64)


def test_relu_kink_gradient_is_zero():
    x = np.array([-1.0, 0.0, 2.0])
    _, cache = relu_forward(x)
    np.testing.assert_array_equal(relu_backward(np.array([3.0, 4.0, 5.0]), cache), [0.0, 0.0, 5.0])


def test_relu_non_contiguous():
    x = away_from_zero((6, 8), seed=2)[:, ::2].T           # (4, 6), strided and transposed
    dout = np.random.default_rng(3).standard_normal((8, 6))[::2]    # (4, 6), strided
    assert not x.flags.c_contiguous and not dout.flags.c_contiguous
    out, cache = relu_forward(x)
    dx = relu_backward(dout, cache)
    np.testing.assert_array_equal(out, np.maximum(np.ascontiguousarray(x), 0))
    np.testing.assert_array_equal(dx, np.ascontiguousarray(dout) * (x > 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_dtype_and_no_mutation(dtype):
    x = away_from_zero((4, 5), seed=4).astype(dtype)
    dout = np.random.default_rng(5).standard_normal(x.shape).astype(dtype)
    x0, dout0 = x.copy(), dout.copy()
    out, cache = relu_forward(x)
    dx = relu_backward(dout, cache)
    assert out.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dout, dout0)


def test_relu_in_place_and_out_errors():
    x = away_from_zero((3, 4), seed=8)
    ref, ref_mask = relu_forward(x)
    y = x.copy()
    out, mask = relu_forward(y, out=y)
    assert out is y
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(mask, ref_mask)
    for bad in (np.empty((4, 3)), np.empty((3, 8))[:, ::2]):
        with pytest.raises(ValueError, match=r"relu: out must be a C-contiguous array of shape \(3, 4\)"):
            relu_forward(x, out=bad)


@pytest.mark.parametrize("n", [2, 3])
def test_relu_and_add_threads_give_the_same_bits(threads, n):
    """Above THREAD_MIN_ELEMENTS ReLU and the residual add cut the array into
    one run per thread; the results are those of one thread, bit for bit."""
    from refimpl.models.blocks import add_into
    from refimpl.threads import THREAD_MIN_ELEMENTS, elementwise_slices
    g = np.random.default_rng(9)
    x = g.standard_normal(THREAD_MIN_ELEMENTS + 7).astype(np.float32)
    dout, other = (g.standard_normal(x.shape).astype(np.float32) for _ in range(2))
    results = []
    for t in (1, n):
        threads(t)
        assert len(elementwise_slices(x)) == t
        out, mask = relu_forward(x)
        results.append((out, mask, relu_backward(dout, mask), add_into(x.copy(), other)))
    for name, a, b in zip(("out", "mask", "dx", "add"), results[1], results[0]):  # elementwise
        np.testing.assert_array_equal(a, b, err_msg=f"{name} differs on {n} threads")
    np.testing.assert_array_equal(results[0][3], x + other)


def _relu_fast_and_naive(x, dout):
    """{name: (fast, naive)} for out and dx."""
    out, cache = relu_forward(x)
    out_n, cache_n = relu_forward_naive(x)
    return {"out": (out, out_n),
            "dx": (relu_backward(dout, cache), relu_backward_naive(dout, cache_n))}


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 4, 5), (3, 4, 5)],
                         ids=lambda s: "x".join(map(str, s)))
def test_relu_fast_matches_naive(shape):
    """The thread-sliced passes against max(x, 0) and dout * [x > 0] on the
    whole array, exact zeros (the kink) included."""
    g = np.random.default_rng(10)
    x = g.standard_normal(shape)
    x.flat[::7] = 0.0
    dout = g.standard_normal(shape)
    for name, (fast, naive) in _relu_fast_and_naive(x, dout).items():
        check_tensor(name, fast, naive, ROUNDINGS64)  # no rounding: x or 0, dout or 0


def test_relu_fast_matches_naive_on_non_contiguous_inputs():
    g = np.random.default_rng(11)
    x = g.standard_normal((4, 5, 6, 2)).transpose(0, 3, 1, 2)   # NHWC viewed as NCHW
    dout = g.standard_normal((4, 2, 5, 12))[..., ::-2]          # strided, reversed
    assert not x.flags.c_contiguous and not dout.flags.c_contiguous
    for name, (fast, naive) in _relu_fast_and_naive(x, dout).items():
        check_tensor(name, fast, naive, ROUNDINGS64)


@pytest.mark.parametrize("n", [2, 3])
def test_relu_fast_matches_naive_on_threads(threads, n):
    """Above THREAD_MIN_ELEMENTS, one run of elements per thread."""
    from refimpl.threads import THREAD_MIN_ELEMENTS, elementwise_slices
    threads(n)
    g = np.random.default_rng(12)
    x = g.standard_normal(THREAD_MIN_ELEMENTS + 7)
    assert len(elementwise_slices(x)) == n
    for name, (fast, naive) in _relu_fast_and_naive(x, g.standard_normal(x.shape)).items():
        check_tensor(name, fast, naive, ROUNDINGS64)


def test_relu_naive_gradient_matches_finite_differences():
    x = away_from_zero((4, 3, 2, 3), seed=13)
    dout = np.random.default_rng(14).standard_normal(x.shape)
    dx = relu_backward_naive(dout, relu_forward_naive(x)[1])
    check_tensor("dx", dx, numerical_grad(lambda t: relu_forward_naive(t)[0], x.copy(), dout),
                 FD64)


@pytest.mark.torch
def test_relu_matches_pytorch():
    torch = pytest.importorskip("torch")
    x = away_from_zero((3, 4, 5), seed=6)
    dout = np.random.default_rng(7).standard_normal(x.shape)
    out, cache = relu_forward(x)
    dx = relu_backward(dout, cache)
    tx = torch.tensor(x, requires_grad=True)
    tout = torch.relu(tx)
    (tout * torch.tensor(dout)).sum().backward()
    check_tensor("out", out, tout.detach().numpy(), ROUNDINGS64)  # no rounding: x or 0
    check_tensor("dx", dx, tx.grad.numpy(), ROUNDINGS64)


# ---------------------------------------------------------------- Linear

def linear_inputs(seed, N=5, D_in=4, D_out=3, dtype=np.float64):
    r = np.random.default_rng(seed)
    x = r.standard_normal((N, D_in))
    w = r.standard_normal((D_out, D_in))
    b = r.uniform(-2, 2, D_out)
    dout = r.standard_normal((N, D_out))
    return [a.astype(dtype) for a in (x, w, b, dout)]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients_match_finite_differences(bias):
    x, w, b, dout = linear_inputs(8)
    b = b if bias else None
    out, cache = linear_forward(x, w, b)
    check_tensor("out", out, x @ w.T + (b if bias else 0), SHORT64)  # 4 terms and a bias
    dx, dw, db = linear_backward(dout, cache)
    check_tensor("dx", dx, numerical_grad(lambda x_: linear_forward(x_, w, b)[0], x.copy(), dout), FD64)
    check_tensor("dw", dw, numerical_grad(lambda w_: linear_forward(x, w_, b)[0], w.copy(), dout), FD64)
    if bias:
        check_tensor("db", db, numerical_grad(lambda b_: linear_forward(x, w, b_)[0], b.copy(), dout), FD64)
    else:
        assert db is None


def test_linear_non_contiguous():
    r = np.random.default_rng(9)
    x = r.standard_normal((8, 5))[::2]                      # (4, 5), strided rows
    w = r.standard_normal((5, 3)).T                         # (3, 5), a transposed view
    b = r.standard_normal(6)[::2]                           # (3,), strided
    dout = r.standard_normal((3, 4)).T                      # (4, 3), transposed
    assert not any(a.flags.c_contiguous for a in (x, w, b, dout))
    out, cache = linear_forward(x, w, b)
    grads = linear_backward(dout, cache)
    cont = [np.ascontiguousarray(a) for a in (x, w, b, dout)]
    out_c, cache_c = linear_forward(*cont[:3])
    grads_c = linear_backward(cont[3], cache_c)
    # sums of <= 5 terms, perhaps by another BLAS path for transposed operands
    check_tensor("out", out, out_c, SHORT64)
    for name, g, gc in zip(("dx", "dw", "db"), grads, grads_c):
        check_tensor(name, g, gc, SHORT64)
    dx_fd = numerical_grad(lambda x_: linear_forward(x_, w, b)[0], cont[0].copy(), dout)
    check_tensor("dx vs fd", grads[0], dx_fd, FD64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_dtype_and_no_mutation(dtype):
    x, w, b, dout = linear_inputs(10, dtype=dtype)
    saved = [a.copy() for a in (x, w, b, dout)]
    out, cache = linear_forward(x, w, b)
    dx, dw, db = linear_backward(dout, cache)
    for a in (out, dx, dw, db):
        assert a.dtype == dtype
    for a, s in zip((x, w, b, dout), saved):
        np.testing.assert_array_equal(a, s)


def test_linear_errors():
    x, w, b, _ = linear_inputs(11)
    with pytest.raises(ValueError, match="D_in"):
        linear_forward(x[:, :3], w, b)
    with pytest.raises(ValueError, match="D_in"):
        linear_forward(x[0], w, b)
    with pytest.raises(ValueError, match="b must have shape"):
        linear_forward(x, w, b[:2])


@pytest.mark.torch
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_pytorch(bias):
    torch = pytest.importorskip("torch")
    x, w, b, dout = linear_inputs(12, N=7, D_in=6, D_out=5)
    out, cache = linear_forward(x, w, b if bias else None)
    dx, dw, db = linear_backward(dout, cache)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    tout = torch.nn.functional.linear(tx, tw, tb if bias else None)
    (tout * torch.tensor(dout)).sum().backward()
    check_tensor("out", out, tout.detach().numpy(), INDEPENDENT64)
    check_tensor("dx", dx, tx.grad.numpy(), INDEPENDENT64)
    check_tensor("dw", dw, tw.grad.numpy(), INDEPENDENT64)
    if bias:
        check_tensor("db", db, tb.grad.numpy(), INDEPENDENT64)
