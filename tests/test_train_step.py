"""One training step in one process (refimpl.train.step): ``train_step`` with
SelfComm against the layers by hand, a NaN loss, and ``forward_backward`` /
``update``: what a trace needs, and errors. P ranks: test_parallel_mpi.py."""
import numpy as np
import pytest

from refimpl.oracle import check_tensor
from refimpl.method.targets import target_entries
from refimpl.oracle.dense import dense_cosine_softmax
from refimpl.parallel import SelfComm, cosine_softmax_backward, cosine_softmax_forward
from refimpl.train.step import forward_backward, train_step, update
from parallel_problem import ALPHA, N, TAU, make_problem, make_step, small_net, unit_rows
from tolerances import LAYER64, ROUNDINGS64, SHORT64


def test_train_step_updates_parameters():
    """One SelfComm step = the layers by hand, then p -= lr * grad."""
    net, clf, net_opt, clf_opt, x, labels = make_step()
    nb = make_problem(0)[3]
    p0, w0 = net.store.data.copy(), clf.weight.copy()
    targets = target_entries(labels, N, nb, ALPHA)
    loss, acc = train_step(net, clf, x, labels, SelfComm(), net_opt, clf_opt,
                           targets=targets, topk=(1,))
    assert type(loss) is float and np.isfinite(loss) and set(acc) == {1}
    # The same step by hand: network forward, classifier, network backward.
    ref = small_net()
    z_loss, _, cache = cosine_softmax_forward(ref.forward(x, train=True), labels, w0,
                                              SelfComm(), N, TAU, targets)
    dz, dW = cosine_softmax_backward(1.0, cache)
    ref.backward(dz)
    # the same functions in one process (measured 0); sum_bound(37, cond=10) = 8.2e-14
    # allows another blocking of the classes
    check_tensor("loss", loss, z_loss, 1e-13)
    check_tensor("net grad", net.store.grad, ref.store.grad, 1e-13)
    check_tensor("classifier grad", clf.grad, dW, 1e-13)
    assert np.abs(ref.store.grad).max() > 0 and np.abs(dW).max() > 0
    # First momentum step: p -= lr * grad (two roundings).
    check_tensor("params", net.store.data, p0 - 0.1 * net.store.grad, ROUNDINGS64)
    check_tensor("classifier", clf.weight, w0 - 0.1 * clf.grad, ROUNDINGS64)
    assert not np.array_equal(net.store.data, p0) and not np.array_equal(clf.weight, w0)


def test_train_step_nan_raises_before_any_update():
    """A NaN loss raises FloatingPointError naming the step; nothing is updated,
    and the BatchNorm running statistics and counters are put back."""
    net, clf, net_opt, clf_opt, x, labels = make_step()
    train_step(net, clf, x, labels, SelfComm(), net_opt, clf_opt)  # momentum is non-zero
    p0, w0 = net.store.data.copy(), clf.weight.copy()
    buffers0 = {n: np.array(v, copy=True) for n, v in net.store.buffers.items()}
    x[5, 1, 2, 3] = np.nan
    with pytest.raises(FloatingPointError, match="the loss is nan at step 7; no parameter"):
        train_step(net, clf, x, labels, SelfComm(), net_opt, clf_opt, step=7)
    np.testing.assert_array_equal(net.store.data, p0)
    np.testing.assert_array_equal(clf.weight, w0)
    for n, v in buffers0.items():
        np.testing.assert_array_equal(net.store.buffers[n], v, err_msg=n)
    assert clf.cache is None  # the exp buffer E is not kept alive by the failed step


def test_forward_backward_returns_what_a_trace_needs():
    """z, dz, the per-row log-sum-exp and the gradients, before any weight moves;
    update() then moves them; a bad learning rate is refused before anything moves."""
    net, clf, net_opt, clf_opt, x, labels = make_step()
    p0, w0 = net.store.data.copy(), clf.weight.copy()
    out = forward_backward(net, clf, x, labels, SelfComm(), topk=(1, 5))
    np.testing.assert_array_equal(net.store.data, p0)
    np.testing.assert_array_equal(clf.weight, w0)
    ref = small_net()
    z = ref.forward(x, train=True)
    check_tensor("z", out.z, z, SHORT64)  # the same forward in one process (measured 0)
    loss, dz, dW, acc = dense_cosine_softmax(z, labels, w0, TAU, topk=(1, 5))
    check_tensor("loss", out.loss, loss, 1e-13)  # 37 classes: sum_bound(37, cond=10) = 8.2e-14
    check_tensor("dz", out.dz, dz, LAYER64)
    check_tensor("classifier grad", clf.grad, dW, LAYER64)
    assert out.acc == acc
    L = unit_rows(z) @ unit_rows(w0).T / TAU
    lse = np.log(np.exp(L - L.max(1, keepdims=True)).sum(1)) + L.max(1)
    check_tensor("logsumexp", out.logsumexp, lse, SHORT64)  # logits of 8 terms, 37 exps
    for bad in (float("nan"), -0.1, float("inf")):
        with pytest.raises(ValueError, match="learning rate must be finite and >= 0"):
            update(net, SelfComm(), net_opt, clf_opt, lr=bad)
    np.testing.assert_array_equal(net.store.data, p0)
    update(net, SelfComm(), net_opt, clf_opt, lr=0.1)
    check_tensor("params", net.store.data, p0 - 0.1 * net.store.grad, ROUNDINGS64)
