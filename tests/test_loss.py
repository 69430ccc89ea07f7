"""Softmax cross-entropy: finite differences, PyTorch parity, stability, errors."""
import numpy as np
import pytest

from refimpl.oracle import check_tensor, numerical_grad
from refimpl.layers.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from tolerances import FD64, INDEPENDENT64, ROUNDINGS64, SHORT64


def make_inputs(seed, B=5, C=7, dtype=np.float64):
    """Logits, int labels, and smoothed soft targets (1 - a) e_i + a/K sum e_j."""
    r = np.random.default_rng(seed)
    logits = (r.standard_normal((B, C)) * 3).astype(dtype)
    labels = r.integers(0, C, B)
    soft = np.zeros((B, C))
    soft[np.arange(B), labels] = 0.8
    for b in range(B):
        others = r.choice(np.setdiff1d(np.arange(C), labels[b]), 2, replace=False)
        soft[b, others] += 0.1
    return logits, labels, soft.astype(dtype)


def reference_loss(logits, y):
    """-mean_b sum_j y_bj log softmax_bj, computed naively in float64."""
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return -(y * np.log(p)).sum() / logits.shape[0]


@pytest.mark.parametrize("kind", ["int", "soft"])
def test_values_and_gradient(kind):
    logits, labels, soft = make_inputs(0)
    target = labels if kind == "int" else soft
    y = np.eye(7)[labels] if kind == "int" else soft
    loss, cache = softmax_cross_entropy_forward(logits, target)
    assert isinstance(loss, np.ndarray) and loss.shape == () and loss.dtype == np.float64
    check_tensor("loss", loss, reference_loss(logits, y), SHORT64)  # 5 rows of 7 exp/log
    dout = 0.7  # a non-trivial upstream gradient
    dlogits = softmax_cross_entropy_backward(dout, cache)
    fd = numerical_grad(lambda l_: softmax_cross_entropy_forward(l_, target)[0],
                        logits.copy(), dout)
    check_tensor("dlogits", dlogits, fd, FD64)
    # Each row of (softmax - y) sums to 0, up to 7 terms <= 0.14 of ~4 roundings each
    # and the sum's 7: 28 u * 0.14 = 4e-16.
    assert np.abs(dlogits.sum(axis=1)).max() < 1e-15


def test_int_and_one_hot_agree():
    logits, labels, _ = make_inputs(1)
    loss_i, cache_i = softmax_cross_entropy_forward(logits, labels)
    loss_s, cache_s = softmax_cross_entropy_forward(logits, np.eye(7)[labels])
    # the label's log-probability picked, or summed with zeros: the same roundings
    check_tensor("loss", loss_i, loss_s, ROUNDINGS64)
    check_tensor("dlogits", softmax_cross_entropy_backward(1.0, cache_i),
                 softmax_cross_entropy_backward(1.0, cache_s), ROUNDINGS64)


def test_large_logits_are_stable():
    logits, labels, soft = make_inputs(2)
    for target in (labels, soft):
        ref, ref_cache = softmax_cross_entropy_forward(logits, target)
        # Softmax is shift-invariant; a naive exp(1e4) would overflow.
        big, big_cache = softmax_cross_entropy_forward(logits + 1e4, target)
        assert np.isfinite(big)
        # logits + 1e4 are rounded by up to u * 1e4 = 1.1e-12 each: a few of those
        check_tensor("loss", big, ref, 1e-10)
        check_tensor("dlogits", softmax_cross_entropy_backward(1.0, big_cache),
                     softmax_cross_entropy_backward(1.0, ref_cache), 1e-10)
    # A hopelessly wrong label gives a large finite loss, not inf.
    loss, _ = softmax_cross_entropy_forward(np.array([[0.0, 800.0]]), np.array([0]))
    check_tensor("loss", loss, 800.0, ROUNDINGS64)  # 800 + log(1 + e^-800): exact


def test_non_contiguous_logits():
    r = np.random.default_rng(3)
    logits = r.standard_normal((7, 10))[:, ::2].T                  # (5, 7), a view
    labels = r.integers(0, 7, 10)[::2]                             # (5,), strided
    assert not logits.flags.c_contiguous and not labels.flags.c_contiguous
    loss, cache = softmax_cross_entropy_forward(logits, labels)
    loss_c, cache_c = softmax_cross_entropy_forward(np.ascontiguousarray(logits),
                                                    np.ascontiguousarray(labels))
    # rows of 7: numpy adds fewer than 8 values in order, view or copy
    check_tensor("loss", loss, loss_c, ROUNDINGS64)
    d = softmax_cross_entropy_backward(1.3, cache)
    check_tensor("dlogits", d, softmax_cross_entropy_backward(1.3, cache_c), ROUNDINGS64)
    fd = numerical_grad(lambda l_: softmax_cross_entropy_forward(l_, labels)[0],
                        np.ascontiguousarray(logits), 1.3)
    check_tensor("dlogits vs fd", d, fd, FD64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["int", "soft"])
def test_dtype_and_no_mutation(dtype, kind):
    logits, labels, soft = make_inputs(4, dtype=dtype)
    target = labels if kind == "int" else soft
    saved = logits.copy(), target.copy()
    loss, cache = softmax_cross_entropy_forward(logits, target)
    probs_before = cache[0].copy()
    # A float64 0-d upstream gradient must not promote float32.
    for dout in (1.0, np.array(0.5), np.float64(2.0), np.array([1.5])):
        dlogits = softmax_cross_entropy_backward(dout, cache)
        assert dlogits.dtype == dtype
    assert loss.dtype == dtype and loss.shape == ()
    np.testing.assert_array_equal(cache[0], probs_before)   # backward keeps its cache
    np.testing.assert_array_equal(logits, saved[0])
    np.testing.assert_array_equal(target, saved[1])


def test_soft_target_in_other_dtype():
    logits, _, soft = make_inputs(5, dtype=np.float32)
    loss, cache = softmax_cross_entropy_forward(logits, soft.astype(np.float64))
    assert loss.dtype == np.float32
    assert softmax_cross_entropy_backward(1.0, cache).dtype == np.float32


def test_bad_labels_logits_and_soft_targets_are_refused_naming_the_problem():
    logits, labels, soft = make_inputs(6)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\)"):
        softmax_cross_entropy_forward(logits, np.array([0, 1, 7, 2, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\)"):
        softmax_cross_entropy_forward(logits, np.array([0, -1, 2, 2, 3]))
    with pytest.raises(ValueError, match="shape"):
        softmax_cross_entropy_forward(logits, labels[:4])
    with pytest.raises(ValueError, match="shape"):
        softmax_cross_entropy_forward(logits, labels.reshape(5, 1))
    with pytest.raises(ValueError, match="logits must be"):
        softmax_cross_entropy_forward(logits[0], labels[:1])
    with pytest.raises(ValueError, match="logits must be"):
        softmax_cross_entropy_forward(logits[:0], labels[:0])
    with pytest.raises(ValueError, match="soft targets must have shape"):
        softmax_cross_entropy_forward(logits, soft[:, :6])
    with pytest.raises(ValueError, match="soft targets must have shape"):
        softmax_cross_entropy_forward(logits, labels.astype(np.float64))
    with pytest.raises(ValueError, match="sum to 1"):
        softmax_cross_entropy_forward(logits, soft * 1.01)
    bad = soft.copy()
    bad[0, :2] += [0.5, -0.5]
    bad[0, np.argmin(bad[0])] = -0.1
    with pytest.raises(ValueError, match="non-negative"):
        softmax_cross_entropy_forward(logits, bad)
    nan = soft.copy()
    nan[1, 0] = np.nan
    with pytest.raises(ValueError, match="non-negative"):
        softmax_cross_entropy_forward(logits, nan)
    with pytest.raises(ValueError, match="dtype"):
        softmax_cross_entropy_forward(logits, labels > 3)
    with pytest.raises(ValueError, match="must be an array"):
        softmax_cross_entropy_forward(logits, [0, 1, 2, 3, 4])


def test_backward_refuses_a_non_scalar_dout():
    logits, labels, _ = make_inputs(6)
    _, cache = softmax_cross_entropy_forward(logits, labels)
    with pytest.raises(ValueError, match="scalar"):
        softmax_cross_entropy_backward(np.ones(2), cache)


def test_soft_targets_within_float32_rounding_of_summing_to_1_are_accepted():
    logits, _, soft = make_inputs(6)
    # Rows that sum to 1 within float32 rounding are accepted.
    softmax_cross_entropy_forward(logits.astype(np.float32),
                                  (soft * (1 + 1e-6)).astype(np.float32))


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["int", "soft"])
def test_matches_pytorch(kind):
    torch = pytest.importorskip("torch")
    logits, labels, soft = make_inputs(7, B=9, C=13)
    target = labels if kind == "int" else soft
    loss, cache = softmax_cross_entropy_forward(logits, target)
    dlogits = softmax_cross_entropy_backward(0.6, cache)
    tl = torch.tensor(logits, requires_grad=True)
    tloss = torch.nn.functional.cross_entropy(tl, torch.tensor(target))
    (tloss * 0.6).backward()
    check_tensor("loss", loss, tloss.detach().numpy(), INDEPENDENT64)
    check_tensor("dlogits", dlogits, tl.grad.numpy(), INDEPENDENT64)
